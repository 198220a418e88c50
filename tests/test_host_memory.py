"""``litune.host_memory``: a process that allocates and frees the same large buffers every step reuses them.

Measured with the kernel's own count of minor page faults (``getrusage``) in fresh processes, on a step shaped like a
small model's: one 40 MiB buffer (logits) and eight of 4 MiB (activations). By default glibc maps the 40 MiB one
afresh every step (it is above 32 MiB, the largest mmap threshold glibc adapts to), so its pages are zero-filled
again each step; after ``keep_freed_host_memory()`` steps reuse the heap and fault nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from litune import host_memory
from litune.host_memory import ENV, MALLOC_ENV
from litune_testing import the_run

STEPS = 20
BIG_PAGES = 40 * 2**20 // 4096  # pages of the 40 MiB buffer
PROBE = f"""
import resource, sys, torch
from litune.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "tuned" else False
def step():  # what a training step does with its activations: allocate, touch, free
    buffers = [torch.ones(10 * 2**20)] + [torch.ones(2**20) for _ in range(8)]  # float32: 40 MiB + 8 x 4 MiB
    return sum(float(b[-1]) for b in buffers)
for _ in range(4):  # the heap settles (grows to what a step needs) in the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({STEPS}):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != ENV}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    applied, count = proc.stdout.split()
    return applied == "True", int(count)


def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    applied, tuned = faults("tuned")
    assert applied
    _, default = faults("default")
    assert default > STEPS * BIG_PAGES * 0.9  # glibc's default: each step maps (and zero-fills) the big buffer
    assert tuned < STEPS * BIG_PAGES / 20, (tuned, default)
    # The same settings through the environment (what bench/bench_overhead.py gives every side): the same reuse.
    applied, from_env = faults("tuned", **MALLOC_ENV)
    assert not applied and from_env < STEPS * BIG_PAGES / 20, from_env


def test_the_user_can_keep_glibc_defaults() -> None:
    assert faults("tuned", **{ENV: "default"})[0] is False
    assert faults("tuned", MALLOC_ARENA_MAX="2")[0] is False  # their own malloc settings win


def test_only_litunes_own_command_keeps_freed_memory_and_only_on_cpu(reference: Path, monkeypatch) -> None:
    """The reference run is a `litune fit` process on CPU; this test process only imports litune (and ran fits)."""
    assert json.loads((the_run(reference) / "env.json").read_text())["host_allocator"] == "keep_freed"
    assert host_memory.applied is False  # in-process fits of other tests (litune.cli.main([...])) left it alone
    monkeypatch.setattr(host_memory, "_cli_process", True)
    assert host_memory.tune_cli_run("cuda") is False  # a GPU run allocates on the device: glibc stays as it is
    monkeypatch.setattr(host_memory, "_cli_process", False)
    assert host_memory.tune_cli_run("cpu") is False  # not litune's own command
