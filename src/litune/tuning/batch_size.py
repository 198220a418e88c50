"""``litune tune batch-size``: the largest micro batch that fits, found by doubling and then binary search.

Each probe is a real ``litune fit`` of a few optimizer steps in a child process, under the configured strategy,
precision and model. A probe fits when it finishes and its peak memory stays within the budget: on CPU the peak
resident set size the kernel recorded for the child (and the ranks it started); on GPU the run's own
``memory/peak_gib`` (CUDA's max allocated) when a budget is given, and in any case no CUDA out-of-memory error.

Why not Lightning's ``Tuner.scale_batch_size``: it refuses distributed strategies, recognises only CUDA out-of-memory
errors (on CPU a run that does not fit is killed by the kernel, or swaps, instead of raising), and keeps every probe
in one process, where the allocator's cached memory from a larger probe would count against the next, smaller one.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from litune.errors import ConfigError
from litune.tuning.runner import ChildRun, run_fit

GIB = 1024**3


@dataclass
class Probe:
    """One micro-batch size tried.

    Attributes:
        batch_size: sequences per device per forward pass.
        peak_gib: peak memory per process (CPU RSS, or CUDA max allocated), ``None`` when the run died first.
        fits: finished within the budget.
        reason: why it does not fit (empty when it does).
    """

    batch_size: int
    peak_gib: float | None
    fits: bool
    reason: str = ""


def probe_args(argv: list[str], batch_size: int, steps: int, runs_dir: Path) -> list[str]:
    """``litune fit`` arguments for a probe: the user's config, this micro batch, a few steps, nothing kept."""
    return [
        *argv,
        f"--data.init_args.batch_size={batch_size}",
        f"--trainer.max_steps={steps}",
        "--trainer.accumulate_grad_batches=1",  # memory does not depend on it; a global batch need not divide
        "--global_batch_size=null",
        "--model.lr_schedule.warmup_steps=0",  # the schedule does not change memory; a long warmup would not fit
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--validate_before_fit=false",
        "--loggers=[csv]",
        f"--runs_dir={runs_dir}",
        f"--experiment=bs{batch_size}",
    ]


def _cuda_peak_gib(runs_dir: Path) -> float | None:
    """The largest ``memory/peak_gib`` a probe's ``metrics.csv`` logged (CUDA max allocated over all ranks)."""
    peaks = []
    for metrics in runs_dir.glob("*/metrics.csv"):
        with metrics.open() as handle:
            peaks += [float(row["memory/peak_gib"]) for row in csv.DictReader(handle) if row.get("memory/peak_gib")]
    return max(peaks) if peaks else None


def run_probe(argv: list[str], batch_size: int, budget_gib: float | None, on_gpu: bool, steps: int = 3) -> Probe:
    """Train ``steps`` optimizer steps at ``batch_size`` in a child process and judge whether it fits.

    Raises:
        ConfigError: the probe failed for a reason other than memory (its last lines are shown).
    """
    runs_dir = Path(tempfile.mkdtemp(prefix=f"litune-bs{batch_size}-"))
    try:
        child: ChildRun = run_fit(probe_args(argv, batch_size, steps, runs_dir))
        peak = _cuda_peak_gib(runs_dir) if on_gpu else child.peak_rss_bytes / GIB
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return judge(batch_size, child, peak, budget_gib)


def judge(batch_size: int, child: ChildRun, peak_gib: float | None, budget_gib: float | None) -> Probe:
    """Whether a finished probe fits: it ended well and its peak (when known) is within the budget (when given).

    Args:
        child: the probe's ``litune fit``.
        peak_gib: its peak memory per process: CPU peak RSS, or on GPU the logged CUDA max allocated (``None``
            when the run logged none).

    Raises:
        ConfigError: the probe failed for a reason other than memory (its last lines are shown).
    """
    if child.returncode != 0:
        if child.out_of_memory:
            return Probe(batch_size, None, False, "out of memory")
        print(child.tail(), file=sys.stderr)
        raise ConfigError(
            "--config",
            f"a probe run at micro batch {batch_size} failed (exit {child.returncode}; its last lines are above)",
            "make `litune fit` run with the same arguments first",
        )
    if budget_gib is not None and peak_gib is not None and peak_gib > budget_gib:
        return Probe(batch_size, peak_gib, False, f"{peak_gib:.2f} GiB > budget {budget_gib:.2f} GiB")
    return Probe(batch_size, peak_gib, True)


def find_largest(
    fits: Callable[[int], Probe], start: int = 1, max_batch_size: int = 4096, precision: float = 0.05
) -> tuple[int, list[Probe]]:
    """Double from ``start`` until a size does not fit, then binary-search between the last fit and the first miss.

    The doubling stops at ``max_batch_size``, which is probed itself (start 1, max 20: 1, 2, 4, 8, 16, 20).

    Args:
        fits: runs one probe.
        start: the first size tried.
        max_batch_size: never try above this.
        precision: stop the binary search once the gap between a fit and a miss is at most this fraction of the
            fitting size (0: down to one sequence; 1: powers of two from ``start`` only). Memory measured from one
            probe to the next varies by a few percent, so searching finer than that finds noise, not capacity.

    Returns:
        The largest size that fit (0 when even ``start`` did not) and every probe in the order run.
    """
    probes: list[Probe] = []

    def tried(size: int) -> bool:
        probes.append(fits(size))
        return probes[-1].fits

    low, high = 0, None  # low: largest size known to fit; high: smallest size known not to
    size = start
    while size <= max_batch_size:
        if not tried(size):
            high = size
            break
        low = size
        if size == max_batch_size:
            return low, probes  # everything up to max_batch_size fit
        size = min(size * 2, max_batch_size)  # the last doubling is cut to max_batch_size, which is probed itself
    if high is None:
        return low, probes  # start > max_batch_size: nothing tried
    if low == 0:
        return 0, probes
    while high - low > max(1, int(low * precision)):
        middle = (low + high) // 2
        if tried(middle):
            low = middle
        else:
            high = middle
    return low, probes


def split_global_batch(global_batch: int, largest_micro: int, world_size: int) -> tuple[int, int]:
    """The largest micro batch ``<= largest_micro`` whose per-step total divides ``global_batch``.

    Returns:
        (micro batch, accumulation steps) with ``micro * world_size * accumulation == global_batch``.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of the world size.
    """
    if global_batch % world_size:
        raise ConfigError(
            "--global-batch-size",
            f"{global_batch} sequences cannot be split evenly over {world_size} processes",
            f"use a multiple of {world_size}",
        )
    per_rank = global_batch // world_size
    micro = max(m for m in range(1, min(largest_micro, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro
