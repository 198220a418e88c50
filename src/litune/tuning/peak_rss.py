"""Run one command and report its peak resident memory, measured from a small parent.

``python -m litune.tuning.peak_rss REPORT -- COMMAND...`` runs COMMAND, writes its peak RSS in bytes to REPORT and
exits with COMMAND's exit status (or dies by the same signal).

Why a separate process: Linux keeps the pre-``exec`` memory high-water mark in a process's ``ru_maxrss``, and a child
started by ``fork``/``vfork``/``posix_spawn`` from a large process (a test runner, a sweep holding Optuna and torch)
inherits that mark, so ``wait4`` on it reports the *parent's* size whenever that is larger (two probes at different
batch sizes then read the same 1.5 GiB). Started from this small interpreter instead, the command's mark starts at a
few MiB and ``RUSAGE_CHILDREN`` here is the command's own peak, covering the ranks it started and waited for.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def main(argv: list[str]) -> int:
    report, separator, *command = argv
    if separator != "--" or not command:
        print("usage: python -m litune.tuning.peak_rss REPORT -- COMMAND...", file=sys.stderr)
        return 2
    child = subprocess.Popen(command)
    for forwarded in FORWARDED_SIGNALS:  # a sweep's timeout or a user's Ctrl-C reaches the run, not just this process
        signal.signal(forwarded, lambda signum, _frame: child.send_signal(signum))
    returncode = child.wait()
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    Path(report).write_text(str(peak_kib * 1024))
    if returncode < 0:  # die by the same signal, so the caller sees e.g. -9 from the OOM killer
        if -returncode != signal.SIGKILL:  # SIGKILL's action cannot be set, and is always to die
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
