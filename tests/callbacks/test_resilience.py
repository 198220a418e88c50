"""Runs that survive: real ``litune fit`` processes killed with real signals, resumed with ``--ckpt_path last``, and
compared micro-batch by micro-batch with an uninterrupted run (CPU, fp32, dropout on)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from litune.callbacks.preemption import EXIT_PREEMPTED
from litune_testing import LITUNE, REPO, TINY, litune_env
from resume_testing import read_losses

STEPS = 8  # optimizer steps of every run here
EVERY = 2  # checkpoint cadence (optimizer steps)
TOL = 1e-6


def fit_cmd(root: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str, callbacks: list | None = None) -> list[str]:
    """``litune fit`` on the tiny GPT-2 (dropout 0.1 on), accumulation 2, checkpoints every ``EVERY`` steps, a
    validation at step 0 and every 3 steps, losses recorded per micro-batch into ``root/losses``."""
    cbs = [{"class_path": "resume_testing.StepLosses", "init_args": {"directory": str(root / "losses")}}]
    cbs += callbacks or []
    return [
        LITUNE, "fit", "--config", str(TINY),
        f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        "--data.init_args.batch_size=4", "--global_batch_size=8",
        f"--runs_dir={root / 'runs'}", "--experiment=surv",
        f"--trainer.max_steps={STEPS}", "--trainer.precision=32-true",
        "--trainer.val_check_interval=6", "--trainer.limit_val_batches=2", "--validate_before_fit=true",
        f"--checkpoint.every_n_train_steps={EVERY}",
        f"--trainer.callbacks={json.dumps(cbs)}",
        *extra,
    ]  # fmt: skip


def run(cmd: list[str], expect: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    # Own session: a SIGKILL sent to the process group takes every rank, and never this test process.
    proc = subprocess.run(
        cmd, env=litune_env(), capture_output=True, text=True, timeout=timeout, start_new_session=True
    )
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def assert_same_losses(got_dir: Path, want_dir: Path, ranks: int = 1) -> float:
    """Every micro-batch of every rank has the uninterrupted run's loss; returns the largest difference."""
    worst = 0.0
    for rank in range(ranks):
        got, want = read_losses(got_dir, rank), read_losses(want_dir, rank)
        assert sorted(got) == sorted(want), f"rank {rank}: different micro-batches {sorted(set(got) ^ set(want))}"
        worst = max(worst, *(abs(got[k] - want[k]) for k in want))
    assert worst < TOL, f"max |dloss| = {worst}"
    return worst


def metrics_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    """The logged steps of the rows of ``metrics.csv`` that have ``key``."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    run(fit_cmd(root, corpus_dir, tokenizer_dir))
    return root


def the_run(root: Path) -> Path:
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


def test_sigkill_then_resume_last_continues_exactly(uninterrupted, tmp_path, corpus_dir, tokenizer_dir) -> None:
    kill_step = random.Random().randint(EVERY + 1, STEPS - 1)  # after a checkpoint, before the end
    killer = {"class_path": "resume_testing.SignalAt", "init_args": {"step": kill_step, "signum": "SIGKILL"}}
    killed = run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, callbacks=[killer]), expect=None)
    assert killed.returncode == -9, f"not killed at step {kill_step}: {killed.returncode}"
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, "--ckpt_path=last"))
    worst = assert_same_losses(tmp_path / "losses", uninterrupted / "losses")
    print(f"1 process, SIGKILL at step {kill_step}: max |dloss| = {worst:.3g}")
    steps = metrics_steps(the_run(tmp_path))
    assert steps == list(range(STEPS)), steps  # one row per step, no stale tail
    # The step-0 validation is not repeated by the resumed run, and no validation row is doubled.
    assert len(metrics_steps(the_run(uninterrupted), "val/loss")) == 4  # at step 0, after steps 3 and 6, at the end
    assert metrics_steps(the_run(tmp_path), "val/loss") == metrics_steps(the_run(uninterrupted), "val/loss")


@pytest.mark.parametrize("signum", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_preemption_saves_at_the_next_step_and_resumes_exactly(
    signum, uninterrupted, tmp_path, corpus_dir, tokenizer_dir
) -> None:
    # Sent after the first micro-batch of step 5 (inside the accumulation window): the save waits for step 5's end.
    sender = {"class_path": "resume_testing.SignalAt", "init_args": {"step": 5, "signum": signum, "micro": 0}}
    stopped = run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, callbacks=[sender]), expect=EXIT_PREEMPTED)
    assert "preempted" in stopped.stderr + stopped.stdout
    ckpt = torch.load(the_run(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, "--ckpt_path=last"))
    worst = assert_same_losses(tmp_path / "losses", uninterrupted / "losses")
    print(f"1 process, {signum} mid-step 5: max |dloss| = {worst:.3g}")
    steps = metrics_steps(the_run(tmp_path))
    assert steps == list(range(STEPS)), steps


STRATEGY_ARGS = {
    "ddp": ("--trainer.devices=2", "--trainer.strategy=ddp"),
    "zero2": ("--trainer.devices=2", "--config", str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")),
    "zero3": ("--trainer.devices=2", "--config", str(REPO / "configs" / "strategy" / "deepspeed_zero3.yaml")),
}


@pytest.fixture(scope="module")
def uninterrupted_2p(tmp_path_factory, corpus_dir, tokenizer_dir):
    """``uninterrupted_2p(strategy)``: the uninterrupted 2-process run with that strategy, run once per module."""
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            root = tmp_path_factory.mktemp(f"uninterrupted-{strategy}")
            run(fit_cmd(root, corpus_dir, tokenizer_dir, *STRATEGY_ARGS[strategy]))
            done[strategy] = root
        return done[strategy]

    return get


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_processes_sigkill_then_resume_continue_exactly(
    strategy, uninterrupted_2p, tmp_path, corpus_dir, tokenizer_dir
) -> None:
    kill_step = random.Random().randint(EVERY + 1, STEPS - 1)
    # Every rank at once (the process group), as when a node dies.
    killer = {
        "class_path": "resume_testing.SignalAt",
        "init_args": {"step": kill_step, "signum": "SIGKILL", "group": True},
    }
    args = STRATEGY_ARGS[strategy]
    killed = run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, callbacks=[killer]), expect=None)
    assert killed.returncode == -9, f"not killed at step {kill_step}: {killed.returncode}\n{killed.stderr[-3000:]}"
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, "--ckpt_path=last"))
    worst = assert_same_losses(tmp_path / "losses", uninterrupted_2p(strategy) / "losses", ranks=2)
    print(f"2 processes {strategy}, SIGKILL at step {kill_step}: max |dloss| = {worst:.3g}")
    assert metrics_steps(the_run(tmp_path)) == list(range(STEPS))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_processes_sigterm_to_rank0_saves_on_every_rank_and_resumes(
    strategy, uninterrupted_2p, tmp_path, corpus_dir, tokenizer_dir
) -> None:
    # Only rank 0 (the process a user or scheduler signals) gets it; the other rank learns at the next step boundary.
    sender = {"class_path": "resume_testing.SignalAt", "init_args": {"step": 5, "signum": "SIGTERM", "rank": 0}}
    # The time trigger too is due at every step (60 us), on each rank's own clock: the ranks agree on it and on the
    # preemption flag in the step's one all-reduce (litune.callbacks.step_votes) and save together, odd steps by time.
    args = (*STRATEGY_ARGS[strategy], "--checkpoint.every_n_minutes=0.000001")
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, callbacks=[sender]), expect=EXIT_PREEMPTED)
    kept = sorted(int(p.name[4:10]) for p in (the_run(tmp_path) / "checkpoints").glob("step*.ckpt"))
    assert kept[-1] >= 4 and kept == list(range(kept[-1] - 2, kept[-1] + 1)), kept  # keep_last 3, one per step
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, "--ckpt_path=last"))
    worst = assert_same_losses(tmp_path / "losses", uninterrupted_2p(strategy) / "losses", ranks=2)
    print(f"2 processes {strategy}, SIGTERM to rank 0 at step 5: max |dloss| = {worst:.3g}")
    assert metrics_steps(the_run(tmp_path)) == list(range(STEPS))


def kill_during_save_then_resume(root: Path, corpus_dir: Path, tokenizer_dir: Path, *args: str, stock: bool = False):
    """Kill every rank while step 4's ``last.ckpt`` is being written; then ``--ckpt_path last``."""
    slow = {"class_path": "resume_testing.SlowSave", "init_args": {"step": 4, "stock_deepspeed_save": stock}}
    killed = run(fit_cmd(root, corpus_dir, tokenizer_dir, *args, callbacks=[slow]), expect=None)
    assert killed.returncode == -9, f"not killed during the save: {killed.returncode}\n{killed.stderr[-3000:]}"
    return run(fit_cmd(root, corpus_dir, tokenizer_dir, *args, "--ckpt_path=last"), expect=None)


def test_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(
    uninterrupted, tmp_path, corpus_dir, tokenizer_dir
) -> None:
    resumed = kill_during_save_then_resume(tmp_path, corpus_dir, tokenizer_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_resumed = [json.loads(line)["step"] for line in (tmp_path / "losses" / "losses-rank0.jsonl").open()]
    assert first_resumed.count(3) == 4, "steps 3-4 trained twice: the resume started from step 2's checkpoint"
    worst = assert_same_losses(tmp_path / "losses", uninterrupted / "losses")
    print(f"1 process, SIGKILL while saving step 4: resumed from step 2, max |dloss| = {worst:.3g}")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stock", [False, True], ids=["atomic", "stock-lightning-save-fails"])
def test_zero2_kill_during_a_save(stock, uninterrupted_2p, tmp_path, corpus_dir, tokenizer_dir) -> None:
    resumed = kill_during_save_then_resume(tmp_path, corpus_dir, tokenizer_dir, *STRATEGY_ARGS["zero2"], stock=stock)
    if stock:  # DeepSpeed rewrote last.ckpt in place: what is left there is half of step 4
        assert resumed.returncode != 0, "the in-place save should have left an unloadable checkpoint"
        return
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    worst = assert_same_losses(tmp_path / "losses", uninterrupted_2p("zero2") / "losses", ranks=2)
    print(f"2 processes zero2, SIGKILL while saving step 4: max |dloss| = {worst:.3g}")


DEAD_RANK_TIMEOUT = 5.0  # --dist_timeout of the dead-rank tests, seconds


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_rank_ends_the_run_with_an_error_then_it_resumes(how, tmp_path, corpus_dir, tokenizer_dir) -> None:
    """Rank 1 dies (SIGKILL: its sockets close) or hangs like a vanished node (SIGSTOP: they stay open) at step 5:
    rank 0 must exit with an error instead of waiting forever, within ``--dist_timeout``, and the run resumes."""
    stamp = tmp_path / "signalled"
    dead = {
        "class_path": "resume_testing.SignalAt",
        "init_args": {"step": 5, "signum": how, "rank": 1, "stamp": str(stamp)},
    }
    args = (*STRATEGY_ARGS["ddp"], f"--dist_timeout={DEAD_RANK_TIMEOUT}")
    log = (tmp_path / "out.log").open("w")
    proc = subprocess.Popen(
        fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, callbacks=[dead]),
        env=litune_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        code = proc.wait(timeout=600)  # rank 0 is the process we started; rank 1 is its child
        exited = time.time()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank, if any
    output = (tmp_path / "out.log").read_text()
    assert stamp.exists(), f"rank 1 never reached step 5:\n{output[-3000:]}"
    took = exited - float(stamp.read_text())
    print(f"rank 1 {how} at step 5: rank 0 exited with {code} after {took:.1f} s (--dist_timeout={DEAD_RANK_TIMEOUT})")
    assert code != 0, output[-3000:]
    assert took < DEAD_RANK_TIMEOUT + 60, "rank 0 waited far beyond the timeout"
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, *args, "--ckpt_path=last"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "losses" / "losses-rank0.jsonl").open()]
    assert steps[-1] == STEPS and steps.count(5) == 2, "resumed from step 4's checkpoint and finished"


@pytest.mark.slow
def test_without_the_saved_random_states_the_resume_drifts(uninterrupted, tmp_path, corpus_dir, tokenizer_dir) -> None:
    """The exact-resume test's teeth: the same kill and resume, with the RNG states taken out of the checkpoint."""
    killer = {"class_path": "resume_testing.SignalAt", "init_args": {"step": 5, "signum": "SIGKILL"}}
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, callbacks=[killer]), expect=None)
    last = the_run(tmp_path) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert len(ckpt["callbacks"]["ExactResume"]["rng_states"]) == 1
    ckpt["callbacks"]["ExactResume"]["rng_states"] = []
    torch.save(ckpt, last)
    run(fit_cmd(tmp_path, corpus_dir, tokenizer_dir, "--ckpt_path=last"))
    got, want = read_losses(tmp_path / "losses"), read_losses(uninterrupted / "losses")
    worst = max(abs(got[k] - want[k]) for k in want)
    print(f"1 process, resumed without RNG states: max |dloss| = {worst:.3g}")
    assert worst > 100 * TOL, "dropout draws other masks: the losses after the resume differ"
