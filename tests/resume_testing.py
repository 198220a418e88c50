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
    """

    def __init__(self, step: int, signum: str, rank: int = 0, micro: int = -1, group: bool = False) -> None:
        self.step, self.signum, self.rank, self.micro, self.group = step, getattr(signal, signum), rank, micro, group
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
    """Kill the whole run (SIGKILL to the process group) in the middle of the checkpoint saved at ``step``.

    The callback's state is pickled into the checkpoint (rank 0's file; DeepSpeed's model-state file): at ``step`` it
    is an object whose pickling sleeps ``seconds`` and then kills, while the file (or folder) is being written.
    """

    def __init__(self, step: int, seconds: float = 1.0) -> None:
        self.step, self.seconds = step, seconds
        self._trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is not None and trainer.global_step == self.step and trainer.is_global_zero:
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
