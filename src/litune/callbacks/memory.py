"""Peak memory per device: CUDA max allocated on GPUs, process resident set size (RSS) on CPU."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback

from litune.callbacks.throughput import log_exact

GIB = 1024**3
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096  # /proc/<pid>/statm counts pages


class ResidentSet:
    """This process's resident set size (RSS), read cheaply enough to sample after every optimizer step.

    psutil's ``memory_info`` opens, reads and parses ``/proc/<pid>/statm`` and builds a named tuple on every call
    (~11 µs, several times that in a step's cold caches: a visible share of a tiny model's step). On Linux this keeps
    the file open and re-reads it in place (~1.5 µs), reopened after a fork; elsewhere it asks psutil.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._statm: int | None = None

    def bytes(self) -> int:
        """The RSS now, in bytes."""
        if self._pid != os.getpid():
            self.close()
            self._pid = os.getpid()  # opened once per process
            with contextlib.suppress(OSError):
                self._statm = os.open(f"/proc/{self._pid}/statm", os.O_RDONLY)
        if self._statm is None:
            return psutil.Process(self._pid).memory_info().rss
        return int(os.pread(self._statm, 128, 0).split()[1]) * _PAGE_SIZE  # fields: size, resident, ... (pages)

    def __getstate__(self) -> dict[str, Any]:
        return {"_pid": -1, "_statm": None}  # a copy (pickled, deep-copied) opens its own file

    def close(self) -> None:
        """Close the file (the next read opens it again)."""
        if self._statm is not None and self._pid == os.getpid():  # after a fork the parent's descriptor stays open
            os.close(self._statm)
        self._statm, self._pid = None, -1


def device_memory_bytes(device: torch.device, process: ResidentSet) -> int:
    """Memory in use on ``device`` now, or its peak where the backend tracks one.

    Args:
        device: the rank's root device.
        process: this process's RSS, for the CPU.

    Returns:
        ``torch.cuda.max_memory_allocated`` (the peak since start) on CUDA; the current RSS otherwise (Linux keeps no
        per-process peak that psutil exposes, so :class:`MemoryMonitor` keeps the running maximum).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process.bytes()


class MemoryMonitor(Callback):
    """Logs ``memory/peak_gib`` (the largest peak over all devices) and, with several devices,
    ``memory/peak_gib/rank<r>`` for each one, every ``trainer.log_every_n_steps`` optimizer steps.

    On CPU the "device" memory is the process RSS sampled after every optimizer step, so the peak is the largest
    sample (a spike inside a step can be missed; CUDA's own counter misses nothing).
    """

    def __init__(self) -> None:
        self._process = ResidentSet()
        self._peak = 0
        self._last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._process.close()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self._peak = max(self._peak, device_memory_bytes(trainer.strategy.root_device, self._process))
        if trainer.global_step % trainer.log_every_n_steps == 0:
            log_exact(pl_module, self._gather(trainer))

    def _gather(self, trainer: pl.Trainer) -> dict[str, float]:
        local = torch.tensor([self._peak / GIB], dtype=torch.float64, device=trainer.strategy.root_device)
        peaks = trainer.strategy.all_gather(local).reshape(-1).tolist()  # [world_size]
        metrics = {"memory/peak_gib": max(peaks)}
        if len(peaks) > 1:
            metrics.update({f"memory/peak_gib/rank{rank}": peak for rank, peak in enumerate(peaks)})
        return metrics
