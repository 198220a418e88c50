"""Running ``litune fit`` as a child process, the way the batch-size finder and the sweep drive their probes/trials."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from litune.runs import RUN_DIR_ENV


@dataclass
class ChildRun:
    """What a finished ``litune fit`` child left behind.

    Attributes:
        returncode: its exit status (negative: killed by that signal, e.g. -9 by the kernel's OOM killer).
        peak_rss_bytes: the largest resident set size of the child and the ranks it started (the kernel's own
            high-water mark, not a sample, read by :mod:`litune.tuning.peak_rss` so the parent's size is not in it).
        output: its stdout and stderr, interleaved.
    """

    returncode: int
    peak_rss_bytes: int
    output: str

    @property
    def out_of_memory(self) -> bool:
        """Killed by the kernel (SIGKILL, the OOM killer's signal) or a CUDA/CPU allocator out-of-memory error."""
        text = self.output.lower()
        return self.returncode == -9 or "out of memory" in text or "outofmemoryerror" in text

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def fit_command(args: list[str]) -> list[str]:
    """``python -m litune.cli fit ARGS`` with this interpreter, so the child runs the same installation."""
    return [sys.executable, "-m", "litune.cli", "fit", *args]


def run_fit(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> ChildRun:
    """Run ``litune fit ARGS`` to the end in a child process and measure its peak memory.

    Args:
        args: ``--config`` files and overrides, as for ``litune fit``.
        env: extra environment variables for the child (e.g. ``CUDA_VISIBLE_DEVICES``).
        log: where to keep the child's output as well (a sweep trial's log).
    """
    return run_child(fit_command(args), env=env, log=log)


def run_child(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> ChildRun:
    """Run ``command`` to the end in a child process (see :func:`run_fit`) and measure its peak memory."""
    child_env = {**os.environ, **(env or {})}
    child_env.pop(RUN_DIR_ENV, None)  # each child is a run of its own, never the parent's
    with tempfile.TemporaryDirectory(prefix="litune-peak-") as scratch:
        report = Path(scratch) / "peak_rss_bytes"
        measured = [sys.executable, "-m", "litune.tuning.peak_rss", str(report), "--", *command]
        proc = subprocess.Popen(
            measured, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env
        )
        assert proc.stdout is not None
        output = proc.stdout.read().decode("utf-8", errors="replace")
        proc.wait()
        peak_rss_bytes = int(report.read_text()) if report.exists() else 0
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    return ChildRun(returncode=proc.returncode, peak_rss_bytes=peak_rss_bytes, output=output)
