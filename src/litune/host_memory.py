"""Host (CPU) memory allocation of training processes: keep freed buffers for the next step.

A training step allocates and frees the same large buffers every step (activations, logits, gradients). glibc's
``malloc`` serves blocks above its mmap threshold (128 KiB, adjusted up to 32 MiB as blocks are freed) with fresh
``mmap`` calls and gives the top of its heap back to the kernel once more than its trim threshold is free there, so a
CPU training step keeps mapping new pages, which the kernel zero-fills on first touch. Measured on a 2-layer GPT-2
(``docs/benchmarks.md``), ``litune fit`` spent about a quarter of each CPU step in those page faults.

PyTorch's CPU performance guide answers this by preloading another allocator (jemalloc, tcmalloc); glibc's own
``mallopt`` does the same in-process, with no extra package and before any tensor is allocated. The price: a training
process keeps up to :data:`TRIM_THRESHOLD` bytes of freed memory mapped. ``LITUNE_HOST_ALLOCATOR=default`` leaves
glibc as it is (as does another allocator, or any ``MALLOC_*`` variable the user set).

Scope: only a process that *is* litune's command (the ``litune`` console script or ``python -m litune.cli``, which mark
it with :func:`mark_cli_process`), and only a run on the CPU accelerator (:func:`tune_cli_run`, called by every
``litune fit``/``validate``/``test``, by ``tune lr`` and by the ranks they start, which run the same command line). A
program that imports litune (a notebook, the tests) keeps its allocator as it is, and so does a GPU run, whose steps
allocate on the device.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap, where a freed block is reused next step
TRIM_THRESHOLD = 2**30  # free bytes at the top of the heap before it is handed back to the kernel
TOP_PAD = 64 * 2**20  # extra bytes the heap grows by, so a growing step does not fault page by page
ENV = "LITUNE_HOST_ALLOCATOR"
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(TOP_PAD),
}
"""The same settings as environment variables, which glibc reads at start-up: they give any process (a hand-written
loop, ``transformers.Trainer``) what litune's command sets itself; litune leaves them as they are."""

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


_cli_process = False  # set by litune.cli.main for the process whose own command line it runs
applied = False
"""Whether this process's malloc got the settings (read by the run's ``env.json`` and by the tests)."""


def mark_cli_process() -> None:
    """Mark this process as litune's own command (the console script or ``python -m litune.cli``)."""
    global _cli_process
    _cli_process = True


def tune_cli_run(accelerator: str) -> bool:
    """Apply :func:`keep_freed_host_memory` when this process is litune's command and the run is on the CPU.

    Args:
        accelerator: the run's resolved accelerator (``"cpu"``, ``"cuda"``, ...).

    Returns:
        Whether the settings are in effect in this process (also when an earlier call applied them).
    """
    global applied
    if _cli_process and accelerator == "cpu" and not applied:
        applied = keep_freed_host_memory()
    return applied


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (Linux with glibc only).

    Returns:
        Whether the settings were applied: False elsewhere, with ``LITUNE_HOST_ALLOCATOR=default``, when the user
        set ``MALLOC_*`` variables of their own, or when another allocator is preloaded.
    """
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "") == "default":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user chose their own allocator settings
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune this way
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
