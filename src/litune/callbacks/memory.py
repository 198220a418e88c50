"""Peak memory per device: CUDA max allocated on GPUs, the process's peak resident set size (RSS) on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback

from litune.callbacks.throughput import log_exact

GIB = 1024**3
PROC_SELF = Path("/proc/self")


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (``VmHWM``) of this process over from its current RSS (Linux >= 4.0).

    Returns:
        Whether the kernel keeps the peak for :func:`peak_rss_bytes` (False off Linux or where ``/proc`` is read-only).
    """
    try:
        (PROC_SELF / "clear_refs").write_text("5")  # 5: reset the peak RSS only (proc(5)); 1-4 touch page bits
        return peak_rss_bytes() is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak RSS since start or the last :func:`reset_peak_rss`, as the kernel counts it (every
    page mapped in, so a spike inside a step is included); ``None`` where ``/proc/self/status`` has no ``VmHWM``."""
    try:
        status = (PROC_SELF / "status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return None


class MemoryMonitor(Callback):
    """Logs ``memory/peak_gib`` (the largest peak over all devices) and, with several devices,
    ``memory/peak_gib/rank<r>`` for each one, every ``trainer.log_every_n_steps`` optimizer steps.

    The peak is taken over the training (from ``on_train_start``). On CUDA it is ``torch.cuda.max_memory_allocated``
    (the peak since start). On CPU it is the process's peak RSS as the kernel counts it, reset when training starts
    and read only at logging steps; where the kernel does not expose it (not Linux), the RSS is sampled after every
    optimizer step instead and a spike inside a step can be missed.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._peak = 0
        self._last_step = 0
        self._kernel_peak = False  # whether the kernel's VmHWM gives the CPU peak

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._kernel_peak = trainer.strategy.root_device.type == "cpu" and reset_peak_rss()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        logging_step = trainer.global_step % trainer.log_every_n_steps == 0
        if logging_step or not self._kernel_peak:  # the kernel keeps the peak between logs; psutil only samples
            self._peak = max(self._peak, self._device_peak(trainer.strategy.root_device))
        if logging_step:
            log_exact(pl_module, self._gather(trainer))

    def _device_peak(self, device: torch.device) -> int:
        """Bytes: CUDA's max allocated, the kernel's peak RSS, or the RSS now (a sample)."""
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        peak = peak_rss_bytes() if self._kernel_peak else None
        return peak if peak is not None else self._process.memory_info().rss

    def _gather(self, trainer: pl.Trainer) -> dict[str, float]:
        local = torch.tensor([self._peak / GIB], dtype=torch.float64, device=trainer.strategy.root_device)
        peaks = trainer.strategy.all_gather(local).reshape(-1).tolist()  # [world_size]
        metrics = {"memory/peak_gib": max(peaks)}
        if len(peaks) > 1:
            metrics.update({f"memory/peak_gib/rank{rank}": peak for rank, peak in enumerate(peaks)})
        return metrics
