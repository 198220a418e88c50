"""Helpers for the kill/resume tests: callbacks loaded into real ``litune fit`` runs by class path.

``StepLosses`` records every micro-batch's loss per rank (so two runs can be compared step by step), ``SignalAt``
sends a real signal to the run's own process (or process group) at a chosen point, and ``SlowSave`` makes a checkpoint
save slow and kills the run in the middle of it. Signals are delivered by the kernel as from any other sender; sending
them from inside the run only makes the moment deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class StepLosses(Callback):
    """Append ``{"epoch", "batch", "step", "loss"}`` per micro-batch to ``<directory>/losses-rank<r>.jsonl``.

    ``step`` is the optimizer step the micro-batch belongs to (1-based), ``loss`` its exact float value.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step + 1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"epoch": trainer.current_epoch, "batch": args[1], "step": self._step, "loss": float(outputs["loss"])}
        with open(self.directory / f"losses-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class SignalAt(Callback):
    """Send ``signum`` at the end of micro-batch ``micro`` (0-based) of optimizer step ``step`` on rank ``rank``.

    Args:
        step: the optimizer step (1-based) during which to send.
        signum: a signal name, e.g. ``"SIGKILL"``.
        rank: the global rank that sends (to itself).
        micro: which micro-batch of the step (``-1``: the last, i.e. after the optimizer step).
        group: send to the whole process group (every rank of a run started in its own session).
        stamp: a file to write the sending time (``time.time()``) into, first.
    """

    def __init__(
        self, step: int, signum: str, rank: int = 0, micro: int = -1, group: bool = False, stamp: str | None = None
    ) -> None:
        self.step, self.signum, self.rank, self.micro, self.group = step, getattr(signal, signum), rank, micro, group
        self.stamp = stamp
        self._micro = 0
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_rank != self.rank:
            return
        stepped = trainer.global_step != self._last_step and self._last_step >= 0
        self._last_step = trainer.global_step
        if self.micro == -1:
            due = trainer.global_step == self.step and stepped
        else:
            due = trainer.global_step == self.step - 1 and self._micro == self.micro
        self._micro = 0 if stepped else self._micro + 1
        if due:
            if self.stamp:
                Path(self.stamp).write_text(repr(time.time()))
            _send(self.signum, self.group)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step


def _send(signum: int, group: bool) -> None:
    if group:
        os.killpg(os.getpgid(0), signum)
    else:
        os.kill(os.getpid(), signum)


class _SlowPickle:
    """Sleeps, then kills the process group, when pickled: i.e. in the middle of writing a checkpoint."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> Any:
        time.sleep(self.seconds)
        os.killpg(os.getpgid(0), signal.SIGKILL)
        return (float, (0.0,))


class SlowSave(Callback):
    """Kill the whole run (SIGKILL to the process group) in the middle of the ``nth`` checkpoint saved at ``step``.

    The callback's state is pickled into the checkpoint (rank 0's file; DeepSpeed's model-state file): then it is an
    object whose pickling sleeps ``seconds`` and kills, while the file (or folder) is being written. ModelCheckpoint
    saves ``step<N>.ckpt`` first and ``last.ckpt`` second: ``nth=2`` kills while ``last`` is being rewritten.

    Args:
        stock_deepspeed_save: use Lightning's own DeepSpeed save (in place, not atomic), to show what the test catches.
    """

    def __init__(self, step: int, nth: int = 2, seconds: float = 1.0, stock_deepspeed_save: bool = False) -> None:
        self.step, self.nth, self.seconds, self.stock = step, nth, seconds, stock_deepspeed_save
        self._trainer: Trainer | None = None
        self._count = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.stock:
            from lightning.pytorch.strategies import DeepSpeedStrategy

            strategy = trainer.strategy
            strategy.save_checkpoint = DeepSpeedStrategy.save_checkpoint.__get__(strategy)  # type: ignore[method-assign]

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None or trainer.global_step != self.step:
            return {}
        self._count += 1
        if self._count == self.nth and trainer.is_global_zero:
            return {"slow": _SlowPickle(self.seconds)}
        return {}


def read_losses(directory: Path, rank: int = 0) -> dict[tuple[int, int], float]:
    """``{(step, batch): loss}`` of rank ``rank``; a later record of the same micro-batch (after a resume) wins."""
    out: dict[tuple[int, int], float] = {}
    path = directory / f"losses-rank{rank}.jsonl"
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[(r["step"], r["epoch"] * 10**6 + r["batch"])] = r["loss"]
    return out


def killed_run_resumes_like_the_whole_run(
    tmp_path: Path, fit_args: Callable[[Path, list[dict]], list[str]], kill_step: int
) -> dict[tuple[int, int], float]:
    """Run ``litune fit`` whole, and again killed by SIGKILL at the end of step ``kill_step`` then resumed with
    ``--ckpt_path=last``; ``fit_args(root, callbacks)`` gives a run's arguments (with a ``StepRecorder`` writing
    ``root / "record"``). Checks that the resumed run logged the whole run's micro-batch losses and ends with its
    parameters (both within 1e-6), and returns the whole run's losses."""
    import subprocess

    import torch

    from litune_testing import LITUNE, litune_env

    def run(root: Path, *extra: str, callbacks=(), expect: int | None = 0) -> subprocess.CompletedProcess:
        losses = {"class_path": "resume_testing.StepLosses", "init_args": {"directory": str(root / "losses")}}
        proc = subprocess.run([LITUNE, "fit", *fit_args(root, [losses, *callbacks]), *extra], env=litune_env(),
                              capture_output=True, text=True, timeout=900, start_new_session=True)  # fmt: skip
        if expect is not None:
            assert proc.returncode == expect, proc.stderr[-4000:]
        return proc

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(whole)
    killer = {"class_path": "resume_testing.SignalAt", "init_args": {"step": kill_step, "signum": "SIGKILL"}}
    assert run(broken, callbacks=[killer], expect=None).returncode == -9
    run(broken, "--ckpt_path=last")
    got, want = read_losses(broken / "losses"), read_losses(whole / "losses")
    assert sorted(got) == sorted(want)
    assert max(abs(got[k] - want[k]) for k in want) < 1e-6
    a, b = torch.load(broken / "record" / "record.pt"), torch.load(whole / "record" / "record.pt")
    assert max((a["params"][k] - b["params"][k]).abs().max().item() for k in b["params"]) < 1e-6
    return want
