"""Adapters (LoRA, DoRA, QLoRA) through peft: frozen bases, adapter-only checkpoints, peft folders, merged export,
resume and the strategies, trained for real (in-process Trainer for the weight checks, ``litune fit`` for the rest).

The CLI runs fine-tune the tiny pretrained GPT-2 (``tiny_gpt2_dir``) with ``configs/peft/*.yaml`` on real text, with
the probe callback of ``litune_testing`` recording the live model's logits on a fixed batch, so the adapter folder,
the merged export, the resumed run and the 2-process runs are each compared with what was trained.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from litune.cli import main
from litune.commands.export import export
from litune.errors import ConfigError
from litune.models.adapters import Adapters, add_adapters, count_parameters, peft_model_of
from litune.models.hf import DeferredHFCausalLM, HFCausalLM
from litune.models.seq2seq import Seq2SeqLM
from litune.models.transformer import DecoderLM
from litune.module import LitLM
from litune_testing import (
    FIRST,
    LITUNE,
    REPO,
    SECOND,
    TINY,
    assert_matches,
    fit_args,
    fit_in_process,
    litune_env,
    probe,
    probe_input_ids,
    random_batches,
    run_litune,
    the_run,
)

VOCAB = 512
LORA = str(REPO / "configs" / "peft" / "lora.yaml")
# tiny GPT-2 (n_embd 32, 2 layers), r=8 on c_attn (32->96), attn.c_proj (32->32), c_fc (32->128), mlp.c_proj (128->32)
LORA_PARAMS = 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))


def batches() -> DataLoader:
    return random_batches(VOCAB)


def fit(system: LitLM, steps: int, precision: str = "32-true") -> None:
    fit_in_process(system, steps, VOCAB, precision)


def networks(tiny_gpt2_dir: Path) -> dict[str, callable]:
    small = {"d_model": 32, "nhead": 2, "vocab_size": VOCAB, "max_seq_len": 32, "gradient_checkpointing": True}
    return {
        "hf": lambda: HFCausalLM(pretrained=str(tiny_gpt2_dir), gradient_checkpointing=True),
        "decoder": lambda: DecoderLM(num_decoder_layers=2, dropout=0.1, **small),
        "seq2seq": lambda: Seq2SeqLM(num_encoder_layers=1, num_decoder_layers=1, **small),
    }


@pytest.mark.parametrize(
    ("family", "method", "precision"),
    [("hf", "lora", "bf16-mixed"), ("decoder", "dora", "32-true"), ("seq2seq", "lora", "bf16-mixed")],
)
def test_adapters_leave_every_base_weight_bit_identical(family, method, precision, tiny_gpt2_dir) -> None:
    """AdamW with weight decay, gradient checkpointing, dropout: only adapter weights may move, every base weight not
    by one bit (weight decay on a frozen weight that reached the optimizer would move it)."""
    torch.manual_seed(0)
    network = networks(tiny_gpt2_dir)[family]()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    system = LitLM(
        network,
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        adapters=Adapters(method=method, dropout=0.1),
    )
    fit(system, steps=3, precision=precision)
    after = network.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert set(base) == set(before)
    changed = [k for k in before if not torch.equal(before[k], base[k])]
    assert changed == []
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: the adapters did train
    trainable, total = count_parameters(network)
    assert trainable == sum(p.numel() for p in network.parameters() if p.requires_grad) and trainable < total / 2


def test_without_adapters_the_same_training_moves_the_base(tiny_gpt2_dir) -> None:
    """The bit-identity test above has teeth: the same run without adapters changes the weights."""
    network = HFCausalLM(pretrained=str(tiny_gpt2_dir))
    before = network.model.transformer.h[0].attn.c_attn.weight.clone()
    fit(LitLM(network, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)), steps=3)
    assert not torch.equal(before, network.model.transformer.h[0].attn.c_attn.weight)


def test_presets_and_names_resolve_to_peft_targets(tiny_gpt2_dir) -> None:
    cases = {
        "all-linear": ["c_attn", "c_fc", "c_proj"],
        "attention": ["attn.c_proj", "c_attn"],
        "mlp": ["c_fc", "mlp.c_proj"],
    }
    for preset, want in cases.items():
        network = HFCausalLM(pretrained=str(tiny_gpt2_dir))
        add_adapters(network, Adapters(target_modules=preset))
        assert sorted(peft_model_of(network).peft_config["default"].target_modules) == want
        assert network.model.lm_head.weight.requires_grad is False  # the output head is never a LoRA target
    seq2seq = networks(tiny_gpt2_dir)["seq2seq"]()
    add_adapters(seq2seq, Adapters(target_modules=["q_attn"]))  # only the cross-attention queries
    assert sorted(n for n, p in seq2seq.named_parameters() if p.requires_grad) == [
        "decoder.h.0.crossattention.q_attn.lora_A.default.weight",
        "decoder.h.0.crossattention.q_attn.lora_B.default.weight",
    ]


def test_a_deferred_network_gets_its_adapters_once_its_weights_exist(tiny_gpt2_dir) -> None:
    """LitLM adds adapters to a DeferredHFCausalLM in configure_model, not at construction (no layer exists then:
    before the fix LitLM asked for a removed `deferred` flag and the all-linear preset found no layer)."""
    system = LitLM(DeferredHFCausalLM(pretrained=str(tiny_gpt2_dir)), adapters=Adapters())
    assert peft_model_of(system.network) is None
    system.configure_model()
    assert sorted(peft_model_of(system.network).peft_config["default"].target_modules) == ["c_attn", "c_fc", "c_proj"]


def test_bad_adapter_settings_are_config_errors(tiny_gpt2_dir) -> None:
    with pytest.raises(ConfigError, match="model.adapters.r"):
        Adapters(r=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        Adapters(target_modules="everything")
    with pytest.raises(ConfigError, match=r"\['q_proj'\] name no linear layer.*c_attn"):
        add_adapters(HFCausalLM(pretrained=str(tiny_gpt2_dir)), Adapters(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="ties its token embedding"):
        add_adapters(networks(tiny_gpt2_dir)["decoder"](), Adapters(train_embeddings=True))
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}, quantize="nf4")


def test_qlora_trains_adapters_on_a_4bit_base(tmp_path) -> None:
    """bitsandbytes >= 0.50 runs NF4 on CPU: the base loads in 4 bits, stays untouched, adapters train in bf16."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    # bitsandbytes' CPU kernels need in_features >= its 64-wide quantization block: n_embd=64 (tiny_gpt2_dir has 32).
    tiny_gpt2_dir = tmp_path / "base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=VOCAB)).save_pretrained(
        tiny_gpt2_dir
    )

    network = HFCausalLM(pretrained=str(tiny_gpt2_dir), quantize="nf4")
    c_attn = network.model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Linear4bit" and c_attn.weight.dtype == torch.uint8
    with pytest.raises(ConfigError, match="quantized"):
        LitLM(network)  # a 4-bit base cannot be trained without adapters
    eye = torch.eye(64)
    with torch.no_grad():  # bitsandbytes repacks CPU weights on first use: compare what the layer computes
        before = c_attn(eye)
    system = LitLM(network, optimizer=partial(torch.optim.AdamW, lr=1e-2), adapters=Adapters(r=4))
    fit(system, steps=2, precision="bf16-mixed")
    with torch.no_grad():
        assert torch.equal(before, network.model.transformer.h[0].attn.c_attn.base_layer(eye))
    peft_model_of(network).save_pretrained(tmp_path / "adapter")
    # The folder loads with peft onto a freshly quantized base: the same adapter weights, the same model up to bf16
    # round-off (bitsandbytes' CPU kernels repack the weights on first use, which reorders the bf16 sums).
    fresh = HFCausalLM(pretrained=str(tiny_gpt2_dir), quantize="nf4").model
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    trained = {k: v for k, v in network.model.state_dict().items() if "lora_" in k}
    assert trained and all(torch.equal(v, loaded.base_model.model.state_dict()[k]) for k, v in trained.items())
    ids = probe_input_ids(VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, network.eval()(input_ids=ids).logits, atol=1e-2, rtol=1e-2)
    with pytest.raises(ConfigError, match="4-bit"):
        from litune.models.adapters import merge_adapters

        merge_adapters(network)


def lora_args(tiny_gpt2_dir: Path, *extra: str) -> tuple[str, ...]:
    """Fine-tune the pretrained tiny GPT-2 (instead of tiny.yaml's from-scratch config) with LoRA, no dropout."""
    return (
        f"--model.network.init_args.pretrained={tiny_gpt2_dir}",
        "--model.network.init_args.config=null",
        "--config",
        LORA,
        "--model.adapters.dropout=0.0",
        "--model.optimizer.init_args.lr=0.03",
        *extra,
    )


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_gpt2_dir, tmp_path_factory) -> Path:
    """The tiny pretrained GPT-2 without dropout: runs on 1 and 2 processes and a resumed run can then agree exactly
    (Lightning does not checkpoint the dropout RNG)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2-no-dropout")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus_dir, tokenizer_dir, tiny_gpt2_dir) -> Path:
    """One process, ``FIRST`` steps, global batch 8 (micro-batch 4 x 2 accumulation)."""
    root = tmp_path_factory.mktemp("lora-1-process")
    run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, "--trainer.devices=1", *lora_args(tiny_gpt2_dir)))
    return root


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(probe_input_ids(VOCAB)).logits


def test_checkpoint_holds_only_adapters_and_the_run_folder_loads_with_peft(lora_run, tiny_gpt2_dir) -> None:
    run = the_run(lora_run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == LORA_PARAMS
    assert len(ckpt["optimizer_states"][0]["state"]) == len(keys)  # AdamW moments for the adapters only
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (run / "adapter").iterdir()}
    # The adapter folder on top of the pretrained base computes what the live model computed at the last step.
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, run / "adapter"), probe(lora_run, FIRST)["logits"])
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    row = next(line.split(",") for line in metrics[1:] if line.split(",")[header.index("params/trainable")])
    assert float(row[header.index("params/trainable")]) == LORA_PARAMS
    assert float(row[header.index("params/total")]) == LORA_PARAMS + sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).parameters()
    )


def test_merged_export_equals_the_adapter_model_and_generate_agrees(lora_run, tiny_gpt2_dir, tmp_path, capsys) -> None:
    run = the_run(lora_run)
    merged = export(run, tmp_path / "merged", merge_adapters=True)
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # a plain HF folder: no peft needed
    with torch.no_grad():
        merged_logits = model(probe_input_ids(VOCAB)).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)(probe_input_ids(VOCAB)).logits
    adapter_logits = peft_logits(tiny_gpt2_dir, run / "adapter")
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    # Teeth: the adapters changed the model far beyond that tolerance (the base alone would fail the check).
    assert (base_logits - adapter_logits).abs().max() > 1e-2

    folder = export(run, tmp_path / "adapter")  # without the flag: the adapter folder, with the tokenizer
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, folder), adapter_logits)

    texts = set()
    for source in (run, run / "adapter", folder, merged):
        assert main(["generate", "--checkpoint", str(source), "--prompt", "def", "--max-length", "24"]) == 0
        texts.add(capsys.readouterr().out.split("--- sequence 0 ---", 1)[1].strip())
    assert len(texts) == 1  # greedy decoding of the same model, however it is stored


def test_merge_without_adapters_and_generate_on_a_litune_adapter_folder_say_how(tmp_path, capsys) -> None:
    from litune.commands.generate import load_for_generation

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None, "peft_type": "LORA"}))
    with pytest.raises(ConfigError, match="--merge-adapters"):
        load_for_generation(str(folder))


@pytest.fixture(scope="module")
def lora_straight(tmp_path_factory, corpus_dir, tokenizer_dir, tiny_gpt2_dir) -> Path:
    """One process, ``SECOND`` steps without a break: what every resumed adapter run must compute."""
    root = tmp_path_factory.mktemp("lora-straight")
    lora = ("--trainer.devices=1", *lora_args(tiny_gpt2_dir))
    run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *lora, steps=SECOND))
    return root


@pytest.mark.slow
def test_resume_is_exact(tmp_path, lora_straight, corpus_dir, tokenizer_dir, tiny_gpt2_dir) -> None:
    """``--ckpt_path=last`` from the adapter-only checkpoint continues as an uninterrupted run of ``SECOND`` steps."""
    lora = ("--trainer.devices=1", *lora_args(tiny_gpt2_dir))
    legs = tmp_path / "legs"
    run_litune("fit", *fit_args(legs, corpus_dir, tokenizer_dir, *lora, steps=2))
    run_litune("fit", *fit_args(legs, corpus_dir, tokenizer_dir, *lora, "--ckpt_path=last", steps=SECOND))
    resumed, uninterrupted = probe(legs, SECOND), probe(lora_straight, SECOND)
    torch.testing.assert_close(resumed["logits"], uninterrupted["logits"], atol=1e-6, rtol=1e-6)
    assert (resumed["logits"] - probe(legs, 1)["logits"]).abs().max() > 1e-3  # the second leg did train


def two_process_run(
    root: Path, strategy: str, corpus_dir, tokenizer_dir, tiny_gpt2_dir, *extra: str, steps: int = FIRST
) -> None:
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    args = ("--config", fragment, "--trainer.devices=2", "--model.network.init_args.gradient_checkpointing=true")
    lora = lora_args(tiny_gpt2_dir)
    # 2 processes on a loaded 2-core machine: allow more than the default 300 s.
    run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *lora, *args, *extra, steps=steps), timeout=900)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "ddp", "deepspeed_zero3"])
def test_two_process_adapters_match_one_process(
    strategy, lora_run, tmp_path, corpus_dir, tokenizer_dir, tiny_gpt2_dir
) -> None:
    """2 processes x micro-batch 4 with gradient checkpointing = 1 process x 4 x 2 accumulation, with adapters; the
    checkpoint (a DeepSpeed directory under ZeRO-2/3) holds no frozen weight and exports merged to the trained logits.
    Under ZeRO-3 the adapter weights are partitioned too: the ranks gather them to write the adapter folder. (FSDP2:
    the next test.)"""
    two_process_run(tmp_path, strategy, corpus_dir, tokenizer_dir, tiny_gpt2_dir)
    check_adapter_run(tmp_path, lora_run, tiny_gpt2_dir)


def check_adapter_run(tmp_path: Path, lora_run: Path, tiny_gpt2_dir: Path) -> None:
    """The 2-process adapter run under ``tmp_path`` computed the 1-process one; its adapter folder is its model, its
    sharded checkpoint holds no frozen weight, and its merged export gives its logits."""
    assert_matches(tmp_path, lora_run, FIRST)
    run = the_run(tmp_path)
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, run / "adapter"), probe(tmp_path, FIRST)["logits"])
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # DeepSpeed and FSDP2 write the module states themselves: the frozen base is left out
        keys = sharded_checkpoint_module_keys(last)
        assert keys and all("lora_" in k for k in keys), keys
    merged = export(run, tmp_path / "merged", merge_adapters=True)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(merged)(probe_input_ids(VOCAB)).logits
    assert (logits - probe(tmp_path, FIRST)["logits"]).abs().max() < 1e-4


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_adapters_match_one_process_resume_exactly_and_export(
    lora_run, lora_straight, tmp_path, corpus_dir, tokenizer_dir, tiny_gpt2_dir
) -> None:
    """FSDP2 with LoRA: the adapters are sharded with their blocks (the frozen base too) and train what 1 process
    trains; the DCP checkpoint holds only the adapters and their optimizer state, exports merged, and resumes on 2
    processes to what 1 process computes in ``SECOND`` steps straight; the adapter folder written at the end equals
    the resumed model."""
    deferred = "--model.network.class_path=litune.models.DeferredHFCausalLM"
    two_process_run(tmp_path, "fsdp2", corpus_dir, tokenizer_dir, tiny_gpt2_dir, deferred)
    check_adapter_run(tmp_path, lora_run, tiny_gpt2_dir)
    assert (the_run(tmp_path) / "checkpoints" / "last.ckpt").is_dir()  # a DCP folder: its keys were checked
    two_process_run(
        tmp_path, "fsdp2", corpus_dir, tokenizer_dir, tiny_gpt2_dir, deferred, "--ckpt_path=last", steps=SECOND
    )
    assert_matches(tmp_path, lora_straight, SECOND)
    assert (probe(tmp_path, SECOND)["logits"] - probe(tmp_path, FIRST)["logits"]).abs().max() > 1e-3  # it trained
    adapter = the_run(tmp_path) / "adapter"
    torch.testing.assert_close(peft_logits(tiny_gpt2_dir, adapter), probe(tmp_path, SECOND)["logits"])


def sharded_checkpoint_module_keys(folder: Path) -> list[str]:
    """The module weights a DeepSpeed checkpoint folder (every rank's ``*model_states.pt``) or an FSDP2 DCP folder
    (its ``.metadata``) holds."""
    states = sorted(folder.rglob("*model_states.pt"))  # one per rank under ZeRO-3
    if states:
        return [k for path in states for k in torch.load(path, weights_only=False)["module"]]
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return [k.removeprefix("state_dict.") for k in saved if k.startswith("state_dict.")]


@pytest.mark.gpu
def test_qlora_fit_on_a_gpu(tmp_path, corpus_dir, tokenizer_dir, tiny_gpt2_dir) -> None:
    """QLoRA through ``litune fit`` on CUDA: 4-bit base on the GPU, bf16-mixed, adapters exported and loadable."""
    qlora = str(REPO / "configs" / "peft" / "qlora.yaml")
    args = fit_args(tmp_path, corpus_dir, tokenizer_dir, "--trainer.accelerator=gpu", "--trainer.devices=1")
    run_litune(
        "fit",
        *args,
        f"--model.network.init_args.pretrained={tiny_gpt2_dir}",
        "--model.network.init_args.config=null",
        "--config",
        qlora,
        "--trainer.precision=bf16-mixed",
    )
    run = the_run(tmp_path)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    proc = subprocess.run(
        [LITUNE, "generate", "--checkpoint", str(run), "--prompt", "def", "--max-length", "16"],
        env=litune_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_reports_bad_adapters_in_one_line(tmp_path, corpus_dir, tokenizer_dir, tiny_gpt2_dir, capsys) -> None:
    args = fit_args(
        tmp_path, corpus_dir, tokenizer_dir, *lora_args(tiny_gpt2_dir, "--model.adapters.target_modules=[nope]")
    )
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "model.adapters.target_modules" in err and "Traceback" not in err


QLORA = str(REPO / "configs" / "peft" / "qlora.yaml")


@pytest.fixture(scope="module")
def wide_gpt2_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained-style GPT-2 folder (config, safetensors, tokenizer: what `litune export` writes) 64 wide: the
    narrowest bitsandbytes' CPU 4-bit kernels take (its quantization block is 64 inputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("wide-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def qlora_fit_args(root: Path, corpus_dir: Path, tokenizer_dir: Path, pretrained: Path) -> list[str]:
    """The documented QLoRA command on the tiny experiment: ``--config X --config configs/peft/qlora.yaml``, with the
    validation before training on (which is what broke it on CPU) and one at the end."""
    return [
        "fit", "--config", str(TINY), f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={root / 'runs'}",
        f"--model.network.init_args.pretrained={pretrained}", "--model.network.init_args.config=null",
        "--config", QLORA,
        "--validate_before_fit=true", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
    ]  # fmt: skip


@pytest.mark.slow  # ~20 s: the default suite's budget; CI runs the slow suite too
def test_qlora_through_litune_fit_on_cpu(tmp_path, corpus_dir, tokenizer_dir, wide_gpt2_dir) -> None:
    """`litune fit --config ... --config configs/peft/qlora.yaml` on a pretrained folder, as the README documents it.

    It crashed on CPUs with AVX512-BF16 at the first training step (bitsandbytes repacked the 4-bit weights for
    inference during the step-0 validation; see HFCausalLM's keep_4bit_layers_trainable). A CPU without that
    instruction set never repacks, so there this test passes with or without the fix.
    """
    pytest.importorskip("bitsandbytes")
    proc = run_litune(*qlora_fit_args(tmp_path, corpus_dir, tokenizer_dir, wide_gpt2_dir))
    assert "val/loss at step 0" in proc.stdout and "val/loss at step 2" in proc.stdout, proc.stdout[-2000:]
    run = the_run(tmp_path)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32


def test_a_4bit_layer_passes_gradients_after_an_inference_forward() -> None:
    """The cause of the crash above, with teeth: after a no-grad eval forward (a validation), the gradient through a
    4-bit layer equals the gradient through its dequantized weight; with bitsandbytes' CPU repacking on, it fails."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

    from litune.models.hf import keep_4bit_layers_trainable

    def gradient_error(repacking: bool) -> float:
        torch.manual_seed(0)
        layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(64, 32).state_dict())
        layer = layer.to("cpu")  # quantizes
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        if not repacking:
            keep_4bit_layers_trainable(layer)
        with torch.no_grad():
            layer.eval()(torch.randn(4, 64))  # what a validation step does
        x = torch.randn(4, 64, requires_grad=True)
        try:
            layer.train()(x).float().sum().backward()
        except RuntimeError:
            return float("inf")
        if x.grad is None:
            return float("inf")
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # [out, in]
        return (x.grad - torch.ones(4, 32) @ weight).abs().max().item()

    assert gradient_error(repacking=False) < 0.05
    if has_avx512bf16():
        assert gradient_error(repacking=True) > 0.05  # the bug this guards against, on CPUs where it exists


def test_qlora_without_bitsandbytes_stops_at_start_with_the_fix(tmp_path, corpus_dir, tokenizer_dir, wide_gpt2_dir):
    """bitsandbytes is installed here, so its absence is simulated: a ``sitecustomize`` on PYTHONPATH makes Python's
    path finder not find it (``find_spec`` gives None, ``import bitsandbytes`` raises ModuleNotFoundError), as on a
    machine where it was never installed."""
    shim = tmp_path / "no-bitsandbytes"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "# Simulates a machine without bitsandbytes (tests/models/test_adapters.py).\n"
        "import importlib.machinery\n"
        "_find_spec = importlib.machinery.PathFinder.find_spec\n"
        "def _hidden(name, path=None, target=None):\n"
        "    return None if name.split('.')[0] == 'bitsandbytes' else _find_spec(name, path, target)\n"
        "importlib.machinery.PathFinder.find_spec = staticmethod(_hidden)\n"
    )
    env = litune_env()
    env["PYTHONPATH"] = f"{shim}:{env['PYTHONPATH']}"
    check = "import importlib.util; assert importlib.util.find_spec('bitsandbytes') is None; import bitsandbytes"
    absent = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60)
    assert absent.returncode == 1 and "No module named 'bitsandbytes'" in absent.stderr, absent.stderr
    args = qlora_fit_args(tmp_path, corpus_dir, tokenizer_dir, wide_gpt2_dir)
    proc = subprocess.run([LITUNE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "model.network.init_args.quantize" in proc.stderr and "pip install 'bitsandbytes" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "runs").glob("*"))  # no run folder
