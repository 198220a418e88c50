"""The non-finite guard: a step whose loss or gradient norm is NaN/Inf on any rank is skipped (weights and optimizer
state untouched on every rank) or stops training with a message naming the step and the last good checkpoint.

The network (``litune_testing.NaNAtStep``) returns NaN logits at a chosen optimizer step, on one chosen rank.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from litune.cli import main
from litune_testing import LITUNE, NETWORK, REPO, TINY, litune_env


def guard_args(root: Path, corpus_dir: Path, tokenizer_dir: Path, nan_at: int, *extra: str, **network) -> list[str]:
    """4 steps of the tiny run (SGD + momentum, so the optimizer has state) with NaN at optimizer step ``nan_at``."""
    callbacks = [{"class_path": "litune_testing.StepRecorder",
                  "init_args": {"directory": str(root / "record"), "snapshots": True}}]  # fmt: skip
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}}
    init_args = {"config": NETWORK, "nan_at": nan_at, **network}
    return [
        "--config", str(TINY), f"--model.tokenizer={tokenizer_dir}",
        f"--model.network={json.dumps({'class_path': 'litune_testing.NaNAtStep', 'init_args': init_args})}",
        f"--model.optimizer={json.dumps(optimizer)}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={root / 'runs'}",
        "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--checkpoint.every_n_train_steps=1",
        f"--trainer.callbacks={json.dumps(callbacks)}", *extra,
    ]  # fmt: skip


def fit_in_process(args: list[str]) -> int:
    try:
        return main(["fit", *args])
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)


def same(a: dict[str, torch.Tensor] | list[torch.Tensor], b: dict[str, torch.Tensor] | list[torch.Tensor]) -> bool:
    pairs = zip(a.values(), b.values(), strict=True) if isinstance(a, dict) else zip(a, b, strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def assert_step_two_skipped(record: dict) -> None:
    assert record["steps"][1]["train/skipped_steps"] == 0
    assert record["steps"][2]["train/skipped_steps"] == record["steps"][4]["train/skipped_steps"] == 1
    params, optimizer = record["params_at"], record["optimizer_at"]
    assert same(params[2], params[1]) and same(optimizer[2], optimizer[1]), "the skipped step changed nothing"
    assert optimizer[1], "SGD with momentum has state to protect"
    assert not same(params[3], params[2]), "training goes on after the skipped step"
    assert all(torch.isfinite(t).all() for t in record["params"].values())


def test_a_nan_step_is_skipped_with_a_warning(tmp_path, corpus_dir, tokenizer_dir) -> None:
    with pytest.warns(UserWarning, match="optimizer step 2: the loss or the gradient norm is NaN or Inf"):
        assert fit_in_process(guard_args(tmp_path, corpus_dir, tokenizer_dir, 2)) == 0
    assert_step_two_skipped(torch.load(tmp_path / "record" / "record.pt"))


def test_a_nan_step_stops_naming_the_step_and_the_last_good_checkpoint(
    tmp_path, corpus_dir, tokenizer_dir, capsys
) -> None:
    assert fit_in_process(guard_args(tmp_path, corpus_dir, tokenizer_dir, 3, "--model.nonfinite=stop")) == 1
    err = capsys.readouterr().err
    assert "optimizer step 3: the loss or the gradient norm is NaN or Inf" in err and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("litune: training stopped")]
    checkpoint = Path(line.split("Last good checkpoint: ")[1].split(". Lower")[0])
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in torch.load(checkpoint, weights_only=False)["state_dict"].values())


@pytest.mark.distributed
def test_ranks_agree_to_skip_a_step_that_is_nan_on_one_rank(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """Only rank 1 sees NaN; both ranks skip (their weights stay equal) and carry on."""
    ddp = ("--config", str(REPO / "configs" / "strategy" / "ddp.yaml"), "--trainer.devices=2")
    args = guard_args(tmp_path, corpus_dir, tokenizer_dir, 2, *ddp, nan_rank=1)
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "record" / name) for name in ("record.pt", "record-rank1.pt"))
    assert_step_two_skipped(rank0)
    assert same(rank0["params"], rank1["params"]) and same(rank0["optimizer_at"][4], rank1["optimizer_at"][4])


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_agree_to_stop_on_a_step_that_is_nan_on_one_rank(tmp_path, corpus_dir, tokenizer_dir) -> None:
    ddp = ("--config", str(REPO / "configs" / "strategy" / "ddp.yaml"), "--trainer.devices=2")
    args = guard_args(tmp_path, corpus_dir, tokenizer_dir, 3, *ddp, "--model.nonfinite=stop", nan_rank=1)
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "optimizer step 3: the loss or the gradient norm is NaN or Inf" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_skips_a_step_that_is_nan_on_one_rank(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """Under ZeRO-2 the engine finds the non-finite gradient norm itself (all ranks agree); litune counts the skip."""
    zero2 = ("--config", str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml"), "--trainer.devices=2")
    args = guard_args(tmp_path, corpus_dir, tokenizer_dir, 2, *zero2, nan_rank=1)
    proc = subprocess.run([LITUNE, "fit", *args], env=litune_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "record" / name) for name in ("record.pt", "record-rank1.pt"))
    assert rank0["steps"][1]["train/skipped_steps"] == 0 and rank0["steps"][4]["train/skipped_steps"] == 1
    assert same(rank0["params_at"][2], rank0["params_at"][1]) and not same(rank0["params_at"][3], rank0["params_at"][2])
    assert same(rank0["params"], rank1["params"])
    assert all(torch.isfinite(t).all() for t in rank0["params"].values())
