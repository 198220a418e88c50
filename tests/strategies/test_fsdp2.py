"""FSDP2 for real on CPU: 2-process ``litune fit`` runs over gloo, against the 1-process reference of the same config.

As in ``test_strategies.py``: global batch 8 (micro-batch 4 x 2 processes vs. 4 x 2 accumulation steps), fp32, no
dropout, gradient clipping at 0.1 (active every step), so the sharded run must compute what the single process
computes. The 2-process runs recompute activations per block (gradient checkpointing), the reference does not. Then
the DCP checkpoint resumes on the same and on another world size (2 -> 1 and 1 -> 2, where DCP reshards), and exports
to a Hugging Face folder with the trained model's logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from litune.memory_model import ModelShape, RunShape, StrategyShape, estimate
from litune.strategies.fsdp2 import DCP_METADATA, is_fsdp2_checkpoint
from litune_testing import (
    FIRST,
    LITUNE,
    REPO,
    SECOND,
    TINY,
    assert_matches,
    fit_args,
    litune_env,
    probe,
    probe_input_ids,
    run_litune,
    the_run,
)

FRAGMENTS = REPO / "configs" / "strategy"


def fsdp2_args(fragment: str = "fsdp2", devices: int = 2, *extra: str) -> tuple[str, ...]:
    return (
        "--config", str(FRAGMENTS / f"{fragment}.yaml"), f"--trainer.devices={devices}",
        "--model.network.init_args.gradient_checkpointing=true", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """The 2-process FSDP2 run of ``FIRST`` steps (tiny HF GPT-2), shared by the tests below.

    A copy of it (``<root>-copy``) stays at ``FIRST`` steps for the tests that resume it on another world size.
    """
    root = tmp_path_factory.mktemp("fsdp2")
    run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *fsdp2_args()))
    shutil.copytree(root, root.with_name(root.name + "-copy"))
    return root


def model_state(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((the_run(root) / "model_state").glob("rank*.json"))]


def resume(root: Path, corpus_dir: Path, tokenizer_dir: Path, *args: str) -> None:
    run_litune("fit", *fit_args(root, corpus_dir, tokenizer_dir, *args, "--ckpt_path=last", steps=SECOND))


def assert_export_matches(root: Path, step: int) -> None:
    """``litune export`` of the run's last checkpoint computes the logits the trained model computed at ``step``."""
    from transformers import AutoModelForCausalLM

    out = root / "hf"
    run_litune("export", "--checkpoint", str(the_run(root)), "--output", str(out))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(probe_input_ids(model.config.vocab_size)).logits
    torch.testing.assert_close(logits, probe(root, step)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.distributed
def test_fsdp2_matches_one_process_resumes_and_exports(
    fsdp2_run, reference, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    root = fsdp2_run
    assert_matches(root, reference, FIRST)
    assert probe(root, FIRST)["gradient_checkpointing"]
    # The comparison has teeth: two optimizer steps move the logits far beyond its tolerance.
    assert (probe(reference, FIRST)["logits"] - probe(reference, 1)["logits"]).abs().max() > 1e-2

    # Each rank holds half of every parameter and of Adam's two moments (fp32): 16 bytes/param / 2, as predicted.
    reports = model_state(root)
    psi = reports[0]["num_params"]
    model = ModelShape(num_params=psi, n_layer=2, hidden=32, n_head=2, vocab_size=512)
    want = estimate(model, RunShape(32, 4, "32-true", devices=2), StrategyShape(fsdp=True))
    assert [r["rank"] for r in reports] == [0, 1]
    assert sum(r["params"] for r in reports) == 4 * psi  # the shards partition the model exactly
    for r in reports:
        assert r["params"] == pytest.approx(want.params, rel=0.01)
        assert r["optimizer"] == pytest.approx(want.optimizer, rel=0.01)

    # The checkpoint is a complete DCP folder, and nothing of the save's staging is left beside it.
    last = the_run(root) / "checkpoints" / "last.ckpt"
    assert is_fsdp2_checkpoint(last) and (last / DCP_METADATA).is_file()
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]

    resume(root, corpus_dir, tokenizer_dir, *fsdp2_args())
    assert_matches(root, resumed_reference, SECOND)
    assert_export_matches(root, SECOND)


@pytest.mark.distributed
def test_fsdp2_checkpoint_of_two_processes_resumes_exactly_on_one(
    fsdp2_run, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    """2 -> 1: DCP reshards parameters and Adam state; the loop's micro-batch count is restated for accumulation 2."""
    root = fsdp2_run.with_name(fsdp2_run.name + "-copy")
    resume(root, corpus_dir, tokenizer_dir, *fsdp2_args(devices=1))
    # Without the restated count the first resumed step takes one micro-batch (4 rows) instead of 8: the logits then
    # differ from the reference by 0.11 (measured by disabling `rescale_batch_progress`), far beyond the tolerance.
    assert_matches(root, resumed_reference, SECOND, world_size=1)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_checkpoint_of_one_process_resumes_exactly_on_two(
    tmp_path, reference, resumed_reference, corpus_dir, tokenizer_dir
) -> None:
    """1 -> 2: FSDP2 on a single process (a 1-rank mesh, accumulation 2), then continued by two processes."""
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(devices=1)))
    assert_matches(tmp_path, reference, FIRST, world_size=1)
    resume(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(devices=2))
    assert_matches(tmp_path, resumed_reference, SECOND, world_size=2)


DECODER = {"d_model": 32, "nhead": 2, "num_decoder_layers": 2, "vocab_size": 512, "max_seq_len": 64, "dropout": 0.0}


def decoder_args(root: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """``fit_args`` with litune's own decoder in place of the Hugging Face GPT-2."""
    network = {"class_path": "litune.models.transformer.DecoderLM", "init_args": DECODER}
    hf_network = "--model.network.init_args.config"
    args = [a for a in fit_args(root, corpus_dir, tokenizer_dir) if not a.startswith(hf_network)]
    return [*args, f"--model.network={json.dumps(network)}", *extra]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_trains_litune_decoder_like_one_process(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """The other network family: DecoderLM's blocks (its ``sharding_units()``) sharded, tied head in the root."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_litune("fit", *decoder_args(one, corpus_dir, tokenizer_dir, "--trainer.devices=1"))
    run_litune("fit", *decoder_args(two, corpus_dir, tokenizer_dir, *fsdp2_args()))
    assert_matches(two, one, FIRST)
    assert probe(two, FIRST)["gradient_checkpointing"]
    assert (probe(one, FIRST)["logits"] - probe(one, 1)["logits"]).abs().max() > 1e-2
    assert_export_matches(two, FIRST)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("fragment", ["fsdp2_hybrid", "fsdp2_offload"])
def test_fsdp2_hybrid_and_offload_match_one_process(fragment, tmp_path, reference, corpus_dir, tokenizer_dir) -> None:
    """Hybrid sharding on a (2 replicas x 1 shard) mesh holds whole parameters on each rank; offload the same shards
    as full sharding (on CPU the "host" is where they already were, so this checks the policy's plumbing and math)."""
    hybrid = fragment == "fsdp2_hybrid"
    extra = ("--trainer.strategy.init_args.shard_size=1",) if hybrid else ()
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(fragment, 2, *extra)))
    assert_matches(tmp_path, reference, FIRST)

    reports = model_state(tmp_path)
    psi = reports[0]["num_params"]
    model = ModelShape(num_params=psi, n_layer=2, hidden=32, n_head=2, vocab_size=512)
    run = RunShape(32, 4, "32-true", devices=2)
    if hybrid:  # shard groups of 1: every rank holds whole fp32 parameters and Adam moments, as predicted
        want = estimate(model, run, StrategyShape(fsdp=True, hybrid=True, shard_size=1))
        assert [r["params"] for r in reports] == [want.params] * 2 == [4 * psi] * 2
        assert [r["optimizer"] for r in reports] == [want.optimizer] * 2
    else:  # the device holds nothing; the host holds the half-size shards (gradients are not measured: 4 bytes)
        want = estimate(model, run, StrategyShape(fsdp=True, offload_optimizer=True, offload_params=True))
        assert want.params == want.grads == want.optimizer == 0
        for r in reports:
            assert r["params"] + r["optimizer"] == pytest.approx(want.host - 4 * psi / 2, rel=0.01)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_bf16_mixed_computes_in_bf16_with_fp32_masters(tmp_path, reference, corpus_dir, tokenizer_dir) -> None:
    """bf16-mixed: bf16 compute (the logits move off the fp32 reference by bf16 round-off), fp32 sharded masters."""
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(), "--trainer.precision=bf16-mixed"))
    got, want = probe(tmp_path, FIRST), probe(reference, FIRST)
    gap = (got["logits"] - want["logits"]).abs().max()
    assert 1e-4 < gap < 0.1, gap
    reports = model_state(tmp_path)
    assert sum(r["params"] for r in reports) == 4 * reports[0]["num_params"]  # fp32 masters, sharded


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_loads_a_pretrained_model_shard_by_shard(tmp_path, corpus_dir, tiny_gpt2_dir) -> None:
    """DeferredHFCausalLM under FSDP2 on 2 ranks: parameters born on meta, sharded, then filled from the safetensors
    file one tensor at a time; before any step the model computes the pretrained model's logits, and it exports."""
    from transformers import AutoModelForCausalLM

    args = fit_args(tmp_path, corpus_dir, tiny_gpt2_dir, *fsdp2_args(), steps=1)
    args += [
        "--model.network.class_path=litune_testing.ProbedDeferredHFCausalLM",
        f"--model.network.init_args.pretrained={tiny_gpt2_dir}",
        "--model.network.init_args.config=null",
    ]
    callbacks = [{"class_path": "litune_testing.FinalLogits", "init_args": {"directory": str(tmp_path / "probe"),
                                                                            "steps": [0, 1]}}]  # fmt: skip
    run_litune("fit", *args, f"--trainer.callbacks={json.dumps(callbacks)}")
    at_start = probe(tmp_path, 0)
    assert at_start["built_partitioned"] is True  # DTensor shards straight out of configure_model
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        logits = pretrained(probe_input_ids(pretrained.config.vocab_size)).logits
    torch.testing.assert_close(at_start["logits"], logits, atol=1e-5, rtol=1e-5)
    assert_export_matches(tmp_path, 1)


def test_fp16_with_fsdp2_fails_before_spawning(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """16-mixed under FSDP2: one paragraph naming bf16-mixed, exit 2, no process started."""
    args = fit_args(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(), "--trainer.precision=16-mixed")
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "FSDP2" in proc.stderr and "bf16-mixed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("fragment", "shards", "offloaded"),
    [("fsdp2", 8, False), ("fsdp2_hybrid", 4, False), ("fsdp2_offload", 8, True), ("fsdp2_tp2", 8, False)],
)
def test_estimate_reads_the_fsdp2_fragments(fragment, shards, offloaded, capsys) -> None:
    """`litune estimate` on 2 nodes x 4 devices: full sharding over 8, hybrid over a node's 4, offload to the host."""
    from litune.commands import estimate as command

    config = ["--config", str(TINY), "--config", str(FRAGMENTS / f"{fragment}.yaml")]
    assert command.main([*config, "--devices", "4", "--nodes", "2", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{") :])
    psi = data["model"]["num_params"]
    assert data["strategy"] == fragment
    device = data["per_device_bytes"]
    if offloaded:  # shards, gradients and Adam state all in host memory
        assert device["params"] == device["grads"] == device["optimizer"] == 0
        assert data["host_bytes_per_process"] == pytest.approx(16 * psi / shards)
    else:  # fp32 shards of weights and gradients, Adam's two fp32 moments (32-true)
        assert device["params"] + device["grads"] + device["optimizer"] == pytest.approx(16 * psi / shards)
    assert {"fsdp2", "fsdp2_hybrid", "fsdp2_offload"} <= set(data["total_by_strategy"])


@pytest.mark.gpu
@pytest.mark.parametrize("fragment", ["fsdp2", "fsdp2_offload"])
def test_fsdp2_bf16_mixed_on_a_gpu(fragment, tmp_path, corpus_dir, tokenizer_dir, reference) -> None:
    """GPU only (skipped without CUDA, never faked): bf16 compute with fp32 reduction on one GPU (a 1-rank mesh), and
    with the shards and optimizer state offloaded to pinned host memory; resumes from its DCP checkpoint."""
    extra = (*fsdp2_args(fragment, 1), "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed")
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *extra))
    gap = (probe(tmp_path, FIRST)["logits"] - probe(reference, FIRST)["logits"]).abs().max()
    assert gap < 0.1, gap  # bf16 round-off against the fp32 CPU run, not a different optimization
    resume(tmp_path, corpus_dir, tokenizer_dir, *extra)
    assert torch.isfinite(torch.tensor(probe(tmp_path, SECOND)["loss"]))


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_fsdp2_over_nccl_matches_one_process(tmp_path, corpus_dir, tokenizer_dir, reference) -> None:
    run_litune("fit", *fit_args(tmp_path, corpus_dir, tokenizer_dir, *fsdp2_args(), "--trainer.accelerator=gpu"))
    assert_matches(tmp_path, reference, FIRST)
