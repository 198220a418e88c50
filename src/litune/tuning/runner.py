"""Running ``litune fit`` as a child process, the way the batch-size finder and the sweep drive their probes/trials."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from litune.runs import RUN_DIR_ENV


@dataclass
class ChildRun:
    """What a finished ``litune fit`` child left behind.

    Attributes:
        returncode: its exit status (negative: killed by that signal, e.g. -9 by the kernel's OOM killer).
        peak_rss_bytes: the largest resident set size of the child and the ranks it started (``wait4``'s
            ``ru_maxrss``: the kernel's own high-water mark, not a sample).
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
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env
    )
    assert proc.stdout is not None
    output = proc.stdout.read().decode("utf-8", errors="replace")
    # wait4 (not Popen.wait) gives this child's own rusage: ru_maxrss is its peak RSS in KiB on Linux, and covers the
    # other ranks it launched and waited for (DDP on CPU starts rank 1..N-1 as its own children).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(output)
    return ChildRun(returncode=proc.returncode, peak_rss_bytes=usage.ru_maxrss * 1024, output=output)
