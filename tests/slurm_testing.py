"""A callback loaded into the SLURM jobs of tests/test_slurm.py by class path (the tests put ``tests/`` on PYTHONPATH).

It only observes and pauses: it records where each attempt of a job started (SLURM requeues a job under the same id,
with ``SLURM_RESTART_COUNT`` counting the attempts) and on which node each rank ran, and it can hold the first attempt
at an optimizer step until the test releases it (or until SLURM's own signal arrived), so that the signal or kill
reaches the job at a known point of training instead of at whatever moment the test happens to run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class Attempts(Callback):
    """Append one line per rank and attempt to ``<directory>/attempts.jsonl``; optionally hold the first attempt.

    Args:
        directory: where ``attempts.jsonl`` and the hold/release marker files live.
        hold_at_step: on the first attempt (``SLURM_RESTART_COUNT`` unset or 0), after this optimizer step every rank
            writes ``held-rank<r>`` and waits until a file ``release`` exists (at most ``max_hold_s``).
        until_signal: hold instead until the rank has received SIGUSR1 (SLURM's ``--signal`` before a time limit).
            The hold observes it by wrapping the installed handler (litune's), which it calls first; then it lets
            training go on to the step boundary where that handler acts.
        max_hold_s: give up waiting after this long, so that a broken test cannot hang a job forever.
    """

    def __init__(
        self, directory: str, hold_at_step: int | None = None, until_signal: bool = False, max_hold_s: float = 600.0
    ) -> None:
        self.directory = Path(directory)
        self.hold_at_step = hold_at_step
        self.until_signal = until_signal
        self.max_hold_s = max_hold_s
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        record = {
            "restart": self.restart,
            "job": os.environ.get("SLURM_JOB_ID"),
            "rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "node": os.environ.get("SLURMD_NODENAME"),
            "world_size": trainer.world_size,
            "start_step": trainer.global_step,
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "attempts.jsonl", "a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.restart or trainer.global_step != self.hold_at_step:
            return
        received: list[int] = []
        handler = signal.getsignal(signal.SIGUSR1)

        def observe(signum: int, frame: Any) -> None:
            if callable(handler):
                handler(signum, frame)
            received.append(signum)

        if self.until_signal:
            signal.signal(signal.SIGUSR1, observe)
        (self.directory / f"held-rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.max_hold_s
        # Sleeping in Python: a signal that arrives meanwhile runs its handler here, as it would during a step.
        while time.monotonic() < deadline:
            if received if self.until_signal else (self.directory / "release").exists():
                break
            time.sleep(0.1)
        if self.until_signal and signal.getsignal(signal.SIGUSR1) is observe:
            signal.signal(signal.SIGUSR1, handler)


def read_attempts(directory: Path) -> list[dict[str, Any]]:
    """The records :class:`Attempts` wrote, in order."""
    return [json.loads(line) for line in (directory / "attempts.jsonl").read_text().splitlines()]
