"""Peak memory per device: CUDA max allocated on GPUs, process resident set size (RSS) on CPU."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback

from litune.callbacks.throughput import log_exact

GIB = 1024**3


def device_memory_bytes(device: torch.device, process: psutil.Process) -> int:
    """Memory in use on ``device`` now, or its peak where the backend tracks one.

    Args:
        device: the rank's root device.
        process: this process, for RSS on CPU.

    Returns:
        ``torch.cuda.max_memory_allocated`` (the peak since start) on CUDA; the current RSS otherwise (Linux keeps no
        per-process peak that psutil exposes, so :class:`MemoryMonitor` keeps the running maximum).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process.memory_info().rss


class MemoryMonitor(Callback):
    """Logs ``memory/peak_gib`` (the largest peak over all devices) and, with several devices,
    ``memory/peak_gib/rank<r>`` for each one, every ``trainer.log_every_n_steps`` optimizer steps.

    On CPU the "device" memory is the process RSS sampled after every optimizer step, so the peak is the largest
    sample (a spike inside a step can be missed; CUDA's own counter misses nothing).
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._peak = 0
        self._last_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

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
