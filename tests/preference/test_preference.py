"""The preference objective through the real Trainer: exactness, references, chunked log-probs, data, bad input.

Tiny real networks (litune's decoder, a Hugging Face GPT-2, the encoder-decoder) train on token-level pairs whose
prompts and responses have uneven lengths, in fp32, with SGD + momentum (a wrongly weighted gradient shows in the
weights; Adam would hide a constant factor). Nothing is mocked.
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from litune.cli import main
from litune.commands.fit import check_preference_reference_strategy, parse_config
from litune.errors import ConfigError
from litune.models.adapters import Adapters
from litune.models.hf import HFCausalLM
from litune.models.output import IGNORE_INDEX
from litune.models.seq2seq import Seq2SeqLM
from litune.models.transformer import DecoderLM
from litune.module import LitLM
from litune.preference.data import PreferenceCollator, PreferenceDataModule
from litune.preference.logps import sequence_logps, token_logps
from litune.preference.objective import Preference

REPO = Path(__file__).resolve().parents[2]
VOCAB = 61
TOLERANCE = 1e-5


def token_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of random tokens: prompts of 1-9 tokens, responses of 1-24 (very uneven), seeded."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    ids = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(rand(1, 10)), "chosen_ids": ids(rand(1, 25)), "rejected_ids": ids(rand(1, 25))}
            for _ in range(n)]  # fmt: skip


def decoder() -> DecoderLM:
    return DecoderLM(d_model=16, nhead=2, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=64, dropout=0.1)


def hf_gpt2() -> HFCausalLM:
    return HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": VOCAB,
                              "n_positions": 64})  # fmt: skip


def system(preference: Preference, seed: int = 0, adapters: Adapters | None = None, net=decoder) -> LitLM:
    torch.manual_seed(seed)
    network = net()
    return LitLM(network, optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9), preference=preference,
                 adapters=adapters)  # fmt: skip


def fit(module: LitLM, data, batch_size: int, accumulate: int, steps: int, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )  # fmt: skip
    if isinstance(data, L.LightningDataModule):
        trainer.fit(module, data)
    else:
        trainer.fit(module, DataLoader(data, batch_size=batch_size, collate_fn=PreferenceCollator(0)))
    return trainer


def params(module: LitLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.network.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("family", ["decoder", "hf-gpt2", "seq2seq"])
def test_chunked_logps_equal_the_plain_ones_in_value_and_gradient(family: str) -> None:
    torch.manual_seed(0)
    if family == "seq2seq":
        network = Seq2SeqLM(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, vocab_size=VOCAB,
                            max_seq_len=64, dropout=0.0)  # fmt: skip
        batch = {"input_ids": torch.randint(1, VOCAB, (3, 7)), "labels": torch.randint(1, VOCAB, (3, 9))}
        batch["labels"][0, 5:] = IGNORE_INDEX
    else:
        network = decoder() if family == "decoder" else hf_gpt2()
        network.eval()
        batch = PreferenceCollator(0)(token_pairs(3))
    results = []
    for chunk in (7, None):
        network.zero_grad()
        logps, mask = token_logps(network, batch, chunk)
        (logps.sum(-1) * torch.arange(1.0, logps.size(0) + 1)).sum().backward()
        results.append((logps.detach(), mask, [p.grad.clone() for p in network.parameters() if p.grad is not None]))
    (chunked, mask, grads), (plain, plain_mask, plain_grads) = results
    assert torch.equal(mask, plain_mask) and mask.sum() > 0
    assert (chunked[~mask] == 0).all()
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for g, h in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- exactness
RPO = Preference(loss="sigmoid", beta=0.5, nll_weight=1.0, logps_chunk_size=16)


@pytest.fixture(scope="module")
def trained() -> dict:
    """2 optimizer steps of 4 pairs (RPO: DPO + token-weighted NLL) at micro-batch 4, 2 x 2 and 1 x 4."""
    data = token_pairs(8)
    out = {}
    for micro, acc in ((4, 1), (2, 2), (1, 4)):
        module = system(RPO)
        initial = params(module)
        fit(module, data, micro, acc, steps=2)
        out[micro] = {"module": module, "params": params(module), "initial": initial}
    return out


def test_micro_batch_and_accumulation_train_the_same_parameters(trained: dict) -> None:
    moved = max_diff(trained[4]["params"], trained[4]["initial"])
    assert moved > 1e-2, "training moved the weights"
    for micro in (2, 1):
        diff = max_diff(trained[micro]["params"], trained[4]["params"])
        print(f"\nmicro {micro} x accumulation {4 // micro} vs micro 4: max parameter difference {diff:.3g}")
        assert diff < TOLERANCE


def test_the_mean_of_means_would_differ_far_beyond_the_tolerance() -> None:
    """Teeth: each micro-batch's own mean (pairs and chosen tokens per micro-batch) gives another gradient."""
    module = system(RPO)
    batch = PreferenceCollator(0)(token_pairs(4))
    grads = []
    for parts in (1, 4):
        module.network.zero_grad()
        for i in range(parts):
            rows = token_pairs(4)[i * 4 // parts : (i + 1) * 4 // parts]
            b = PreferenceCollator(0)(rows)
            pair_sum, nll_sum, stats = module.preference.terms(module.network, b, b)
            units, tokens = stats[8], stats[9]
            ((pair_sum / units + nll_sum / tokens) / parts).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.network.parameters()]))
    assert batch["input_ids"].size(0) == 8
    assert (grads[0] - grads[1]).abs().max() > 1000 * TOLERANCE * grads[0].abs().max()


def test_dpo_starts_at_ln2_and_the_reference_is_never_trained_or_saved(trained: dict) -> None:
    fresh = system(RPO)
    batch = PreferenceCollator(0)(token_pairs(4))
    pair_sum, _, stats = fresh.preference.terms(fresh.network, batch, batch)
    assert pair_sum.item() / 4 == pytest.approx(math.log(2), abs=1e-6), "dropout is off: policy == reference"
    assert stats[2].item() == stats[3].item() == 0.0  # both rewards are 0 at the start
    module = trained[4]["module"]
    reference = module.preference.reference.state_dict()
    assert all(torch.equal(reference[k], trained[4]["initial"][k]) for k in reference), "bit-identical after training"
    assert not any("reference" in k for k in module.state_dict()), "the reference is not checkpointed"
    assert not any(p.requires_grad for p in module.preference.reference.parameters())


# ---------------------------------------------------------------------------------------------- references
def test_adapters_as_reference_train_what_an_explicit_frozen_copy_trains() -> None:
    adapters = Adapters(r=4, alpha=8, target_modules="all-linear")
    data = token_pairs(8, seed=1)
    runs = {}
    for mode in ("adapters", "copy"):
        module = system(Preference(beta=0.5, reference=mode, logps_chunk_size=16), adapters=adapters)
        fit(module, data, 4, 1, steps=2)
        runs[mode] = module
    diff = max_diff(params(runs["adapters"]), params(runs["copy"]))
    assert diff < TOLERANCE
    assert runs["adapters"].preference.reference is None, "no second copy of the weights"
    batch = PreferenceCollator(0)(data[:4])
    ref_a = runs["adapters"].preference.reference_logps(runs["adapters"].network, batch)
    ref_c = runs["copy"].preference.reference_logps(runs["copy"].network, batch)
    torch.testing.assert_close(ref_a, ref_c, rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from litune.preference.stdlib_pairs import stdlib_pairs

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stdlib_pairs(24)))
    return path


def test_precomputed_reference_trains_what_the_live_one_trains_and_is_cached(pair_file, tokenizer_dir, tmp_path):
    def data() -> PreferenceDataModule:
        return PreferenceDataModule(str(tokenizer_dir), str(pair_file), max_length=64, max_prompt_length=32,
                                    batch_size=4, val_fraction=0, cache_dir=str(tmp_path), shuffle=False)  # fmt: skip

    def gpt2() -> HFCausalLM:
        return HFCausalLM(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 512,
                                  "n_positions": 64})  # fmt: skip

    runs = {}
    for mode in ("precomputed", "copy"):
        module = system(Preference(beta=0.5, reference=mode, logps_chunk_size=16), net=gpt2)
        fit(module, data(), 4, 1, steps=3)
        runs[mode] = params(module)
    assert max_diff(runs["precomputed"], runs["copy"]) < TOLERANCE
    cached = list(tmp_path.glob("data/*/reference-*/train.pt"))
    assert len(cached) == 1 and torch.load(cached[0]).shape == (24, 2)
    # A second run finds the cached log-probs: the reference is never run again.
    module = system(Preference(beta=0.5, reference="precomputed", logps_chunk_size=16), net=gpt2)
    dm = data()
    dm.setup("fit")
    dm.attach_reference_logps(lambda batch: pytest.fail("recomputed"), module.preference.fingerprint())
    assert "ref_logps" in dm.train_set.column_names


# ---------------------------------------------------------------------------------------------- KTO
def _hand_logp(network: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    """float64 ``sum_t log p(response_t | prompt, response_<t)`` of one unpadded row, from the network's logits."""
    ids = torch.tensor([prompt + response])
    logps = network(ids).logits[0].double().log_softmax(-1)  # position t predicts token t + 1
    return sum(float(logps[len(prompt) + t - 1, tok]) for t, tok in enumerate(response))


def test_kto_trains_on_unpaired_examples() -> None:
    """The logged KTO loss and ``z0`` of a step whose policy differs from the reference equal a float64 hand
    computation of Ethayarajh et al.'s eq. 7 (TRL's ``kto_loss``) from the networks' own logits: ``z0`` is the mean
    log-ratio of each prompt with the next example's completion, clamped at 0 (positive here, so the clamp is not what
    holds), and each example's loss is ``w_d (1 - s(b (r - z0)))`` or ``w_u (1 - s(b (z0 - r)))``. A KTO without
    ``z0``, or with the weights swapped, is shown to miss the logged value."""
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": torch.randint(1, VOCAB, (3,), generator=g).tolist(),
             "completion_ids": torch.randint(1, VOCAB, (1 + i % 5,), generator=g).tolist(), "desirable": i % 3 != 0}
            for i in range(8)]  # fmt: skip
    beta, w_d, w_u = 0.5, 1.0, 1.7
    module = system(Preference(loss="kto", beta=beta, undesirable_weight=w_u, logps_chunk_size=16))
    with torch.no_grad():  # move the frozen reference copy away from the policy (noise makes it worse: z0 > 0)
        for p in module.preference.reference.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    policy, reference = copy.deepcopy(module.network).double(), copy.deepcopy(module.preference.reference).double()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, DataLoader(rows, batch_size=8, collate_fn=PreferenceCollator(0, unpaired=True, max_length=64)))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def ratio(prompt: list[int], response: list[int]) -> float:
        return _hand_logp(policy, prompt, response) - _hand_logp(reference, prompt, response)

    with torch.no_grad():
        mismatched = [ratio(r["prompt_ids"], rows[(i + 1) % 8]["completion_ids"]) for i, r in enumerate(rows)]
        ratios = [ratio(r["prompt_ids"], r["completion_ids"]) for r in rows]
    z0 = max(sum(mismatched) / 8, 0.0)
    assert z0 > 0.05  # the clamp is not what holds
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731

    def kto_mean(z: float, good_w: float, bad_w: float) -> float:
        return sum(good_w * (1 - sig(beta * (r - z))) if row["desirable"] else bad_w * (1 - sig(beta * (z - r)))
                   for r, row in zip(ratios, rows, strict=True)) / 8  # fmt: skip

    assert abs(metrics["train/kl"] - z0) < 1e-4 * max(1.0, z0)
    assert abs(metrics["train/loss"] - kto_mean(z0, w_d, w_u)) < 1e-5
    desirable = [r["desirable"] for r in rows]
    rewards = [beta * r for r in ratios]
    chosen = sum(x for x, d in zip(rewards, desirable, strict=True) if d) / 8
    assert abs(metrics["train/rewards/chosen"] - chosen) < 1e-5
    for wrong in (kto_mean(0.0, w_d, w_u), kto_mean(z0, w_u, w_d), kto_mean(-z0, w_d, w_u)):  # teeth
        assert abs(metrics["train/loss"] - wrong) > 1e-3


# ---------------------------------------------------------------------------------------------- encoder-decoder
def seq2seq() -> Seq2SeqLM:
    return Seq2SeqLM(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, vocab_size=VOCAB, max_seq_len=64,
                     dropout=0.1)  # fmt: skip


def test_dpo_on_an_encoder_decoder_scores_the_decoder_responses_and_lowers_the_loss() -> None:
    """Prompt -> encoder, chosen/rejected -> decoder targets: each row's log-prob equals a float64 sum over the
    response of log_softmax of the network's own unpadded logits; 4 DPO steps lower the DPO loss from ln 2 and leave
    the reference untouched."""
    data = token_pairs(8)
    batch = PreferenceCollator(0, encoder_decoder=True)(data)
    rows = [(r["prompt_ids"], r["chosen_ids"]) for r in data] + [(r["prompt_ids"], r["rejected_ids"]) for r in data]
    assert batch["input_ids"].shape == (16, max(len(p) for p, _ in rows))
    assert batch["labels"].shape == (16, max(len(r) for _, r in rows))
    module = system(Preference(beta=0.5, logps_chunk_size=7), net=seq2seq)
    network, reference = module.network, module.preference.reference
    double = copy.deepcopy(network).double()
    with torch.no_grad():
        got = sequence_logps(network, batch, 7)
        hand = []
        for prompt, response in rows:
            target = torch.tensor([response])
            logits = double(input_ids=torch.tensor([prompt]), decoder_input_ids=double.shift_right(target)).logits
            hand.append(float(logits[0].log_softmax(-1).gather(-1, target[0, :, None]).sum()))
    assert got.tokens.tolist() == [len(r) for _, r in rows]
    torch.testing.assert_close(got.logps.double(), torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-5)

    before = {k: v.clone() for k, v in reference.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=8, collate_fn=PreferenceCollator(0, encoder_decoder=True)))

    def dpo_loss() -> float:
        with torch.no_grad():
            policy, ref = sequence_logps(network, batch, 7).logps, sequence_logps(reference, batch, 7).logps
        ratios = policy - ref
        return float(-torch.nn.functional.logsigmoid(0.5 * (ratios[:8] - ratios[8:])).mean())

    assert dpo_loss() < math.log(2) - 0.05
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())


def test_preference_data_for_an_encoder_decoder(pair_file, tokenizer_dir, tmp_path) -> None:
    """The same data module gives seq2seq batches (prompt as source, response as target), and a layout that does
    not match the network is refused before training, naming the field."""
    dm = PreferenceDataModule(str(tokenizer_dir), str(pair_file), max_length=64, max_prompt_length=32,
                              val_fraction=0, batch_size=2, shuffle=False, cache_dir=str(tmp_path),
                              encoder_decoder=True)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    row = dm.train_set[0]
    assert batch["input_ids"][0, : len(row["prompt_ids"])].tolist() == row["prompt_ids"]
    assert batch["labels"][0, : len(row["chosen_ids"])].tolist() == row["chosen_ids"]
    assert batch["labels"][2, : len(row["rejected_ids"])].tolist() == row["rejected_ids"]
    module = system(Preference(beta=0.5))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        trainer.fit(module, dm)
    assert err.value.field == "data.init_args.encoder_decoder" and "encoder_decoder: false" in str(err.value)


# ---------------------------------------------------------------------------------------------- data
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_truncation_keeps_the_prompt_end_and_the_response_start(tokenizer_dir, tmp_path) -> None:
    rows = [{"prompt": "one two three four five six seven eight nine ten", "chosen": "alpha beta gamma delta epsilon",
             "rejected": "x"}]  # fmt: skip
    dm = PreferenceDataModule(str(tokenizer_dir), str(write_rows(tmp_path / "p.jsonl", rows)), max_prompt_length=4,
                              max_length=7, val_fraction=0, cache_dir=str(tmp_path))  # fmt: skip
    dm.setup("fit")
    row, tok = dm.train_set[0], dm.tokenizer
    full_prompt = tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    full_chosen = tok(rows[0]["chosen"], add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"] == full_prompt[-4:]
    assert row["chosen_ids"] == full_chosen[:3]
    assert row["rejected_ids"] == tok("x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = dm.collator()([row])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"][:, :4] == IGNORE_INDEX).all()


def test_chat_messages_are_rendered_with_the_chat_template(tokenizer_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "chat-tokenizer"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    tok.save_pretrained(folder)
    rows = [{"prompt": [{"role": "user", "content": "hi there"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]  # fmt: skip
    dm = PreferenceDataModule(str(folder), str(write_rows(tmp_path / "c.jsonl", rows)), val_fraction=0,
                              cache_dir=str(tmp_path))  # fmt: skip
    dm.setup("fit")
    row = dm.train_set[0]
    assert tok.decode(row["prompt_ids"]) == "<user>hi there</s><assistant>"
    assert tok.decode(row["chosen_ids"][:-1]) == "hello</s>" and row["chosen_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize(
    ("row", "settings", "words"),
    [
        ({"prompt": "p", "chosen": "a"}, {}, ["row 2", "'rejected'", "rejected_column"]),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, {}, ["row 2", "'rejected'", "missing or empty"]),
        ({"prompt": "a b c d e f g h", "chosen": "a", "rejected": "b"}, {"max_prompt_length": None, "max_length": 4},
         ["row 2", "'chosen'", "no token left after truncation", "max_length"]),
    ],
)  # fmt: skip
def test_bad_rows_are_refused_with_file_row_and_field(row, settings, words, tokenizer_dir, tmp_path) -> None:
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
    dm = PreferenceDataModule(str(tokenizer_dir), str(path), val_fraction=0, cache_dir=str(tmp_path), **settings)
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(path) in message and "Fix:" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"beta": 0.0}, "model.preference.beta", ["positive"]),
        ({"beta": -1.0}, "model.preference.beta", ["positive"]),
        ({"loss": "simpo", "reference": "copy"}, "model.preference.reference", ["reference-free"]),
        ({"loss": "sigmoid", "reference": "none"}, "model.preference.reference", ["needs a reference"]),
        ({"logps_chunk_size": 0}, "model.preference.logps_chunk_size", []),
    ],
)
def test_bad_preference_settings_name_the_field_and_the_fix(settings, field, words) -> None:
    with pytest.raises(ConfigError) as err:
        Preference(**settings)
    assert err.value.field == field and err.value.fix
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed_zero3"])
def test_what_zero3_and_fsdp2_cannot_serve_is_refused_before_any_process_starts(
    strategy, tokenizer_dir, tmp_path, capsys
) -> None:
    """A copy (or precomputed log-probs) of a network loaded straight into shards (DeferredHFCausalLM): exit 2,
    nothing written. The frozen copy of a network built whole is sharded with the policy (tests/preference/
    test_preference_slow.py trains it on 2 processes), and a reference-free loss keeps no copy: both accepted."""
    args = ["fit", "--config", str(REPO / "configs" / "dpo.yaml"), "--config",
            str(REPO / "configs" / "strategy" / f"{strategy}.yaml"), f"--model.tokenizer={tokenizer_dir}",
            f"--runs_dir={tmp_path / 'runs'}"]  # fmt: skip
    deferred = "--model.network.class_path=litune.models.DeferredHFCausalLM"
    assert main([*args, deferred, "--model.preference.reference=precomputed"]) == 2
    err = capsys.readouterr().err
    assert "model.preference.reference" in err and "straight into shards" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(ConfigError, match="straight into shards") as refused:
        check_preference_reference_strategy(parse_config([*args[1:], deferred]))
    assert refused.value.field == "model.preference.reference" and "HFCausalLM" in refused.value.fix
    for accepted in ("copy", "precomputed"):  # the copy sharded like the policy; precomputed: whole, then dropped
        check_preference_reference_strategy(parse_config([*args[1:], f"--model.preference.reference={accepted}"]))
    simpo = parse_config([*args[1:], "--config", str(REPO / "configs" / "preference" / "simpo.yaml")])
    check_preference_reference_strategy(simpo)


def test_the_cli_refuses_a_bad_preference_config_before_training(tokenizer_dir, tmp_path, capsys) -> None:
    args = ["fit", "--config", str(REPO / "configs" / "dpo.yaml"), f"--model.tokenizer={tokenizer_dir}",
            "--model.preference.loss=orpo", "--model.preference.reference=copy",
            f"--runs_dir={tmp_path / 'runs'}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.preference.reference" in err and "reference-free" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_deferred_network_gets_its_adapters_and_reference_copy_when_it_is_built(tiny_gpt2_dir: Path) -> None:
    """A ``DeferredHFCausalLM`` creates its weights in ``configure_model``: its adapters and its frozen reference copy
    are made then. (Made from the unbuilt network, the adapters found no layer and the copy was never built.)"""
    from litune.models.adapters import peft_model_of
    from litune.models.hf import DeferredHFCausalLM

    with_adapters = LitLM(
        DeferredHFCausalLM(pretrained=str(tiny_gpt2_dir)), preference=Preference(), adapters=Adapters()
    )
    with_copy = LitLM(DeferredHFCausalLM(pretrained=str(tiny_gpt2_dir)), preference=Preference(reference="copy"))
    assert peft_model_of(with_adapters.network) is None and with_copy.preference.reference is None
    for module in (with_adapters, with_copy):
        module.configure_model()
    assert peft_model_of(with_adapters.network) is not None and with_adapters.preference.mode == "adapters"
    reference = with_copy.preference.reference
    assert reference is not None and reference.is_built and reference is not with_copy.network
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, with_copy.network(input_ids=ids).logits)
