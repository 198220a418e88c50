"""Finding runs and checkpoints: ``--ckpt_path last`` (exact experiment names, job-named folders, first start of a
job) and the atomic-commit helpers that guarantee ``last`` only ever names a complete checkpoint."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
import torch

from litune.errors import ConfigError
from litune.runs import resolve_run_dir
from litune.strategies.atomic import COMMIT_MARKER, AtomicCheckpointIO, atomic_directory, recover, staging_path


def make_run(runs: Path, name: str, age_s: float = 0.0) -> Path:
    last = runs / name / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_text(name)
    stamp = time.time() - age_s
    os.utime(last, (stamp, stamp))
    return last


@pytest.fixture
def no_job(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LITUNE_RUN_DIR", "LITUNE_RUN_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def test_last_matches_the_experiment_name_exactly_and_finds_job_folders(tmp_path: Path, no_job) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "20260101-000000-start", age_s=300)
    make_run(runs, "20260101-000100-quickstart", age_s=10)  # newer, but another experiment ending in "start"
    make_run(runs, "quickstart-job77", age_s=0)
    run_dir, ckpt = resolve_run_dir(str(runs), "start", "last")
    assert run_dir.name == "20260101-000000-start" and ckpt == str(run_dir / "checkpoints" / "last.ckpt")
    run_dir, _ = resolve_run_dir(str(runs), "quickstart", "last")
    assert run_dir.name == "quickstart-job77", "the most recently saved run of the experiment, job-named or not"
    with pytest.raises(ConfigError, match="no run of experiment 'art'"):
        resolve_run_dir(str(runs), "art", "last")


def test_in_a_job_last_is_that_jobs_checkpoint_or_a_fresh_start(tmp_path: Path, no_job, monkeypatch) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "20260101-000000-exp")  # an older run of the experiment is not what a new job continues
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir, ckpt = resolve_run_dir(str(runs), "exp", "last")
    assert run_dir == runs / "exp-job4242" and ckpt is None, "first start of the job: a new run"
    last = make_run(runs, "exp-job4242")  # ... preempted after saving, requeued with the same job id
    assert resolve_run_dir(str(runs), "exp", "last") == (runs / "exp-job4242", str(last))


def test_last_takes_the_newest_complete_checkpoint_whatever_its_name(tmp_path: Path, no_job, capsys) -> None:
    """A run killed before its first cadence save has only best-step*.ckpt: `last` takes the newest of any name,
    never a save in progress (hidden name) or an empty file, and says which one it took."""
    runs = tmp_path / "runs"
    best = make_run(runs, "20260101-000000-exp", age_s=30).with_name("best-step000050.ckpt")
    (best.parent / "last.ckpt").rename(best)
    newer_partial = best.with_name(".step000060.ckpt.tmp-123")
    newer_partial.write_text("half")
    (best.parent / "step000070.ckpt").write_bytes(b"")  # cut off before any byte: not complete
    run_dir, ckpt = resolve_run_dir(str(runs), "exp", "last")
    assert ckpt == str(best) and run_dir == best.parent.parent
    assert f"resuming from {best}" in capsys.readouterr().err
    cadence = best.with_name("step000060.ckpt")
    cadence.write_text("newer")
    assert resolve_run_dir(str(runs), "exp", "last")[1] == str(cadence)
    stamp = cadence.stat().st_mtime
    (best.parent / "last.ckpt").write_text("same time")
    os.utime(best.parent / "last.ckpt", (stamp, stamp))
    assert resolve_run_dir(str(runs), "exp", "last")[1] == str(best.parent / "last.ckpt")  # ties: last.ckpt


def test_atomic_directory_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"

    def save(step: int, fail: bool = False) -> None:
        with atomic_directory(target, is_writer=True, barrier=lambda: None) as staged:
            (staged / "model.pt").write_text(f"model {step}")
            if fail:
                raise KeyboardInterrupt  # stands for a kill: nothing after this line runs
            (staged / "optim.pt").write_text(f"optim {step}")

    save(1)
    assert (target / "optim.pt").read_text() == "optim 1" and (target / COMMIT_MARKER).is_file()
    with pytest.raises(KeyboardInterrupt):
        save(2, fail=True)
    recover(target)
    assert (target / "model.pt").read_text() == "model 1", "the half-written step 2 never became visible"
    save(3)
    assert (target / "model.pt").read_text() == "model 3" and not staging_path(target).exists()

    # A kill between the two renames of the swap: the old folder is aside, the new one committed but not renamed.
    os.rename(target, target.with_name(".last.ckpt.old"))
    recover(target)
    assert (target / "model.pt").read_text() == "model 3"


class _Unpicklable:
    def __reduce__(self):
        raise KeyboardInterrupt  # a kill in the middle of writing the file


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3), "x": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file left behind"


TINY = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")


def fit_tiny(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> Path:
    from litune.cli import main

    args = [
        "fit", "--config", TINY, f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={tmp_path / 'runs'}",
        "--trainer.max_steps=7", *extra,
    ]  # fmt: skip
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir / "checkpoints"


def test_cadence_every_n_steps_keeps_the_last_n_the_best_and_the_final_step(
    tmp_path, corpus_dir, tokenizer_dir, no_job
) -> None:
    ckpts = fit_tiny(
        tmp_path, corpus_dir, tokenizer_dir,
        "--checkpoint.every_n_train_steps=3", "--checkpoint.every_n_minutes=null", "--checkpoint.keep_last=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
    )  # fmt: skip
    names = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("best"))
    assert names == ["last.ckpt", "step000006.ckpt", "step000007.ckpt"], "saved at 3, 6 and the end; 2 kept"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 7
    (best,) = ckpts.glob("best-step*.ckpt")  # save_top_k=1 of the validations after steps 2, 4 and 6
    with open(ckpts.parent / "metrics.csv", newline="") as f:
        val_losses = [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    assert len(val_losses) == 3
    best_ckpt = torch.load(best, weights_only=True)
    (state,) = [v for k, v in best_ckpt["callbacks"].items() if k.startswith("BestCheckpoints")]
    assert float(state["best_model_score"]) == pytest.approx(min(val_losses), rel=1e-6)
    assert best.name == f"best-step{best_ckpt['global_step']:06d}.ckpt"


def test_cadence_every_m_minutes(tmp_path, corpus_dir, tokenizer_dir, no_job) -> None:
    # 60 microseconds: shorter than any optimizer step, so the time trigger alone saves each of the 7 steps.
    ckpts = fit_tiny(
        tmp_path, corpus_dir, tokenizer_dir,
        "--checkpoint.every_n_train_steps=null", "--checkpoint.every_n_minutes=0.000001", "--checkpoint.keep_last=-1",
    )  # fmt: skip
    steps = sorted(int(p.name[4:10]) for p in ckpts.glob("step*.ckpt"))
    assert steps == list(range(1, 8)), steps


def test_checkpoint_callbacks_keep_lightnings_state_key_while_the_time_trigger_is_swapped(tmp_path: Path) -> None:
    """Checkpoints name a callback's state by ``ModelCheckpoint.state_key``: the cached key must be that string, for
    the configured interval even while ``on_train_batch_end`` hides it, and follow a change of the settings."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from litune.callbacks.checkpointing import BestCheckpoints, Checkpointing

    every = Checkpointing(every_n_train_steps=5, every_n_minutes=2.0, dirpath=tmp_path)
    expected = ModelCheckpoint.state_key.fget(every)  # type: ignore[attr-defined]  # Lightning's formula
    assert "'train_time_interval': datetime.timedelta(seconds=120)" in expected
    assert every.state_key == expected
    every._train_time_interval = None  # as on_train_batch_end swaps it around Lightning's check
    assert every.state_key == expected
    every.monitor = "val/loss"  # teeth: a key formatted once and never again would miss this
    assert "val/loss" in every.state_key
    best = BestCheckpoints(dirpath=tmp_path)
    assert best.state_key == ModelCheckpoint.state_key.fget(best)  # type: ignore[attr-defined]


def test_multinode_launcher_names_each_job_uniquely(tmp_path: Path) -> None:
    """launch/torchrun_multinode.sh takes the scheduler's job id as run id, and refuses to guess one for several nodes.

    A stand-in ``torchrun`` on PATH prints what it is given (the real 2-node launch is tests/test_launch.py's)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "launch" / "torchrun_multinode.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "torchrun").chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MASTER_ADDR": "n0", "NPROC_PER_NODE": "1"}

    def launch(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), "--x=1"], env={**base, **env}, capture_output=True, text=True)

    assert "--rdzv_id=977" in launch(NNODES="2", SLURM_JOB_ID="977").stdout
    assert "--rdzv_id=12.pbs" in launch(NNODES="2", PBS_JOBID="12.pbs").stdout
    refused = launch(NNODES="2")
    assert refused.returncode == 2 and "set RUN_ID" in refused.stderr
    first, second = launch(NNODES="1").stdout, launch(NNODES="1").stdout
    assert "--rdzv_id=" in first and first != second, "a single node gets an id of its own per launch"
