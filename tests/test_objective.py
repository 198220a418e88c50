"""The token-weighted objective: the same global batch trains the same model whatever the micro-batch, accumulation
and number of processes.

One padded instruction data set (loss on the responses only) whose rows have very uneven target counts (1 to ~40
tokens) trains the tiny GPT-2 for 3 optimizer steps of 4 rows each, in fp32 without dropout, with SGD + momentum (so a
wrongly scaled gradient shows in the weights: Adam would hide a constant factor) and gradient clipping at a norm the
first steps exceed. The parameters of every topology must agree within 1e-5 with one process at micro-batch 4, and the
pre-clipping gradient norms (DeepSpeed's own, read from its engine) within round-off, which checks the scale that
clipping sees. The mean of means (each micro-batch's own mean) moves the same weights far more than the tolerance.
"""

from __future__ import annotations

import csv
import json
import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from litune.cli import main
from litune.data.sampler import even_eval_shards
from litune.errors import ConfigError
from litune.models.hf import HFCausalLM
from litune.models.output import IGNORE_INDEX
from litune.module import LitLM
from litune.objective import step_objective
from litune_testing import NETWORK, REPO, TINY, run_litune

TOLERANCE = 1e-5
WORDS = "def return class import lambda yield while for if else try except with as pass raise".split()


def write_instructions(path: Path, rows: int = 24) -> Path:
    """Prompt/response rows whose responses have 1 to ~40 tokens (seeded), prompts 1 to 8 words."""
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for i in range(rows):
            prompt_words = 1 + int(torch.randint(0, 8, (), generator=gen))
            response_words = [1, 2, 20, 3, 25, 1, 8, 14][i % 8] + int(torch.randint(0, 3, (), generator=gen))
            pick = torch.randint(0, len(WORDS), (prompt_words + response_words,), generator=gen).tolist()
            words = [WORDS[j] for j in pick]
            row = {"prompt": " ".join(words[:prompt_words]), "response": " ".join(words[prompt_words:])}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("instructions") / "rows.jsonl")


def objective_args(root: Path, data: Path, tokenizer_dir: Path, micro: int, *extra: str, mean_of_means=False) -> list:
    """``litune fit`` arguments: 3 steps of global batch 4 on the instruction rows with micro-batch ``micro``."""
    callbacks = [
        {
            "class_path": "litune_testing.StepRecorder",
            "init_args": {"directory": str(root / "record"), "mean_of_means": mean_of_means},
        }
    ]
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5, "momentum": 0.9}}
    return [
        "--config", str(TINY),
        f"--model.tokenizer={tokenizer_dir}",
        f"--model.network.init_args.config={json.dumps(NETWORK)}",
        f"--model.optimizer={json.dumps(optimizer)}",
        f"--data.init_args.path={data}", "--data.init_args.format=instruction", "--data.init_args.layout=pad",
        "--data.init_args.block_size=64", "--data.init_args.val_fraction=0",
        f"--data.init_args.batch_size={micro}", "--global_batch_size=4",
        f"--runs_dir={root / 'runs'}",
        "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.precision=32-true",
        "--trainer.gradient_clip_val=1.4",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *extra,
    ]  # fmt: skip


def fit_in_process(args: list[str]) -> None:
    try:
        assert main(["fit", *args]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)


def record(root: Path) -> dict:
    return torch.load(root / "record" / "record.pt")


def max_param_diff(a: dict, b: dict) -> float:
    assert a["params"].keys() == b["params"].keys()
    return max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, instructions, tokenizer_dir):
    """``one_process(micro, mean_of_means=False)``: the 1-process run with that micro-batch (accumulation 4/micro)."""
    done: dict[tuple[int, bool], dict] = {}

    def run(micro: int, mean_of_means: bool = False) -> dict:
        if (micro, mean_of_means) not in done:
            root = tmp_path_factory.mktemp(f"one-process-micro{micro}{'-mean-of-means' if mean_of_means else ''}")
            fit_in_process(objective_args(root, instructions, tokenizer_dir, micro, mean_of_means=mean_of_means))
            done[micro, mean_of_means] = record(root)
        return done[micro, mean_of_means]

    return run


def assert_same_training(got: dict, want: dict) -> float:
    """Same parameters (max abs difference < 1e-5), same step losses, grad norms and token counts; returns the diff."""
    diff = max_param_diff(got, want)
    assert diff < TOLERANCE, f"max parameter difference {diff:.3g}"
    assert got["steps"].keys() == want["steps"].keys() == {1, 2, 3}
    for step, metrics in want["steps"].items():
        assert got["steps"][step]["train/tokens_seen"] == metrics["train/tokens_seen"]
        assert got["steps"][step]["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-5)
        assert got["steps"][step]["train/grad_norm"] == pytest.approx(metrics["train/grad_norm"], rel=1e-4)
    return diff


def test_accumulation_trains_what_one_big_micro_batch_trains(one_process) -> None:
    big, accumulated = one_process(4), one_process(1)
    diff = assert_same_training(accumulated, big)
    print(f"\n1 process micro 4 vs micro 1 x accumulation 4: max parameter difference {diff:.3g}")
    grad_norms = [m["train/grad_norm"] for m in big["steps"].values()]
    assert grad_norms[0] > 1.4 > grad_norms[-1], "the first step is clipped, the last is not: both see the scale"
    tokens = [m["train/tokens_seen"] for m in big["steps"].values()]
    per_step = [b - a for a, b in zip([0.0, *tokens], tokens, strict=False)]
    assert max(per_step) > 1.5 * min(per_step) > 0, "the steps' target counts differ: the data is uneven"


def test_mean_of_means_differs_far_beyond_the_tolerance(one_process) -> None:
    """The objective litune had before (and Lightning's default): micro-batch size changes the trained weights."""
    diff = max_param_diff(one_process(1, mean_of_means=True), one_process(4, mean_of_means=True))
    print(f"\nmean of means, micro 4 vs micro 1 x accumulation 4: max parameter difference {diff:.3g}")
    assert diff > 1000 * TOLERANCE
    # At micro-batch 4 without accumulation on one process, both objectives are the same mean over the batch's tokens.
    assert max_param_diff(one_process(4, mean_of_means=True), one_process(4)) < TOLERANCE


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_two_processes_train_what_one_process_trains(strategy, tmp_path, instructions, tokenizer_dir, one_process):
    """2 processes x micro-batch 1 x accumulation 2 (DeepSpeed divides by its accumulation steps once more)."""
    fragment = str(REPO / "configs" / "strategy" / f"{strategy}.yaml")
    args = objective_args(tmp_path, instructions, tokenizer_dir, 1, "--config", fragment, "--trainer.devices=2")
    run_litune("fit", *args)
    got = record(tmp_path)
    assert got["world_size"] == 2
    diff = assert_same_training(got, one_process(4))
    print(f"\n2 processes {strategy} micro 1 x accumulation 2 vs 1 process micro 4: max parameter diff {diff:.3g}")


def tiny_system(seed: int = 0) -> LitLM:
    torch.manual_seed(seed)
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64}
    network = HFCausalLM(config={**config, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    return LitLM(network, optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9))


def python_fit(system: LitLM, rows: list[dict], batch_size: int, accumulate: int, steps: int) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(system, DataLoader(rows, batch_size=batch_size))
    return trainer


def test_a_micro_batch_without_targets_adds_zero_loss_and_zero_gradient() -> None:
    system = tiny_system()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    out = system.network(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.num_targets == 0 and out.loss_sum == 0 and out.loss == 0  # 0, not the 0/0 = NaN of a mean
    out.loss_sum.backward()
    assert all(p.grad is None or not p.grad.any() for p in system.parameters())

    # Through the Trainer: a step of [rows, prompt-only rows] (accumulation 2) trains exactly what [rows] alone does.
    rows = [{"input_ids": r, "labels": r.clone()} for r in ids]
    empty = [{"input_ids": r, "labels": torch.full_like(r, IGNORE_INDEX)} for r in ids]
    with_empty, alone = tiny_system(), tiny_system()
    python_fit(with_empty, rows + empty, batch_size=2, accumulate=2, steps=1)
    python_fit(alone, rows, batch_size=2, accumulate=1, steps=1)
    for (name, a), b in zip(with_empty.named_parameters(), alone.parameters(), strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert with_empty.tokens_seen == alone.tokens_seen == 2 * 9


def test_prepare_drops_and_reports_rows_without_a_target(tmp_path, tokenizer_dir, capsys) -> None:
    """An instruction whose prompt fills block_size keeps no response token after truncation: dropped, counted."""
    data = write_instructions(tmp_path / "rows.jsonl", rows=6)
    with data.open("a") as f:
        for _ in range(2):
            f.write(json.dumps({"prompt": " ".join(WORDS * 6), "response": "pass"}) + "\n")
    args = ["--config", str(TINY), f"--model.tokenizer={tokenizer_dir}", f"--data.init_args.path={data}",
            "--data.init_args.format=instruction", "--data.init_args.layout=pad", "--data.init_args.block_size=64",
            "--data.init_args.val_fraction=0", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(["prepare", *args]) == 0
    out = capsys.readouterr().out
    assert "rows without a target token dropped: 2" in out and "train: 6 rows" in out, out


def validate_args(root: Path, data: Path, held_out: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(TINY), f"--model.tokenizer={tokenizer_dir}",
        f"--model.network.init_args.config={json.dumps(NETWORK)}",
        f"--data.init_args.path={data}", f"--data.init_args.validation_split={held_out}",
        "--data.init_args.format=instruction", "--data.init_args.layout=pad", "--data.init_args.block_size=64",
        "--data.init_args.batch_size=2", "--trainer.limit_val_batches=1.0", "--loggers=[csv]",
        f"--runs_dir={root / 'runs'}", *extra,
    ]  # fmt: skip


def val_metrics(root: Path) -> dict[str, float]:
    (run,) = sorted((root / "runs").iterdir())
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


@pytest.mark.distributed
@pytest.mark.slow
def test_validation_on_two_processes_equals_one_process(tmp_path, instructions, tokenizer_dir) -> None:
    """7 held-out rows of uneven target counts on 2 ranks: 4 rows each, the 8th a copy that must weigh nothing."""
    held_out = write_instructions(tmp_path / "held-out.jsonl", rows=7)
    one, two = tmp_path / "one", tmp_path / "two"
    try:
        assert main(["validate", *validate_args(one, instructions, held_out, tokenizer_dir)]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)
    ddp = ("--config", str(REPO / "configs" / "strategy" / "ddp.yaml"), "--trainer.devices=2")
    run_litune("validate", *validate_args(two, instructions, held_out, tokenizer_dir, *ddp))
    want, got = val_metrics(one), val_metrics(two)
    assert set(want) == set(got) == {"val/loss", "val/ppl"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_eval_shards_are_equal_and_their_padding_weighs_nothing() -> None:
    rows = [{"input_ids": [i, i + 1, i + 2], "labels": [IGNORE_INDEX, i + 1, i + 2]} for i in range(5)]
    shards = []
    for rank in range(4):
        dataset, sampler = even_eval_shards(rows, rank, 4)
        shards.append([dataset[i] for i in sampler])
    assert [len(s) for s in shards] == [2, 2, 2, 2]  # every rank runs the same number of batches
    trained = [r for s in shards for r in s if any(t != IGNORE_INDEX for t in r["labels"])]
    assert sorted(r["input_ids"][0] for r in trained) == [0, 1, 2, 3, 4]  # each real row once, no duplicate
    assert even_eval_shards(rows, 0, 1) == (rows, None)


def test_nonfinite_must_be_skip_or_stop() -> None:
    with pytest.raises(ConfigError, match="model.nonfinite"):
        LitLM(tiny_system().network, nonfinite="ignore")


def test_step_objective_gives_the_same_bits_and_gradient_with_the_count_on_the_host_or_the_device() -> None:
    torch.manual_seed(0)
    for n in [0, 1, 3, 7, 10, 49, 512, 4097, 100_003, 3 * 2**20 + 1]:
        for divisor in [1, 2, 3, 6, 8]:
            loss_sum = (torch.rand(()) * 1e4).requires_grad_()
            on_host = step_objective(loss_sum, n, divisor)
            (grad_host,) = torch.autograd.grad(on_host, loss_sum)
            on_device = step_objective(loss_sum, torch.tensor(n), divisor)
            (grad_device,) = torch.autograd.grad(on_device, loss_sum)
            assert on_host.item() == on_device.item() and grad_host.item() == grad_device.item(), (n, divisor)
    # Teeth: the plain host formula (divisor / N in float64) misses the device's bits for some N.
    loss_sum = torch.tensor(1234.5678)
    naive = [(loss_sum * (6 / n)).item() for n in range(1, 400)]
    assert naive != [step_objective(loss_sum, torch.tensor(n), 6).item() for n in range(1, 400)]
