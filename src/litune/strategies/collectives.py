"""Collectives and host-to-device copies that keep the host from waiting on the device.

Lightning's ``strategy.reduce`` puts a barrier before each all-reduce and ``torch.tensor(value, device="cuda")`` copies
from pageable memory: under CUDA both make the host wait until the device has run its queue. A training step that
calls them every step loses the overlap of host and device work; these two helpers queue like any kernel instead.
Used by the step's token count (:meth:`litune.module.LitLM._start_window`) and its one agreement over the ranks
(:mod:`litune.callbacks.step_votes`).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def distributed(trainer: pl.Trainer) -> bool:
    """Whether the trainer runs on several processes with a process group up (collectives then reduce)."""
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_over_ranks(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) ``tensor`` in place over the trainer's ranks; no-op on one process (as ``strategy.reduce``).

    Lightning's ``strategy.reduce`` puts a ``barrier`` before each all-reduce, which under NCCL blocks the host until
    the device has run its queue: a host sync of its own. The collective alone is ordered on the device like a kernel.
    """
    if distributed(trainer):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def host_to_device(value: int | list[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of host values (0-d for a number, ``[len(value)]`` for a list) on ``device``, without making the host
    wait for the device's queue.

    ``torch.tensor(value, device="cuda")`` copies from pageable memory and synchronizes the stream; a copy from pinned
    memory with ``non_blocking=True`` is queued like any kernel.
    """
    tensor = torch.tensor(value, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
