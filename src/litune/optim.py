"""Optimizer parameter groups and learning-rate schedules.

The optimizer class itself is chosen in the config (``class_path: torch.optim.AdamW``); this module only decides which
parameters get weight decay and builds the warmup + decay schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from litune.errors import ConfigError


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """LitLM's optimizer when none is configured: AdamW, lr 3e-4, weight decay 0.1."""
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)


def param_groups(network: nn.Module) -> list[dict]:
    """Split trainable parameters into a weight-decayed group and a group without weight decay.

    Matrices (linear and embedding weights, ``ndim >= 2``) are decayed; biases and norm weights (``ndim < 2``) are
    not, since shrinking them toward zero only fights the normalization. The first group keeps the optimizer's own
    ``weight_decay``; the second overrides it with 0.

    Returns:
        ``[{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]`` (empty groups dropped).
    """
    decay, no_decay = [], []
    for param in network.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class LRSchedule:
    """Linear warmup, then cosine or linear decay, or a constant rate; stepped once per optimizer step.

    Attributes:
        name: ``cosine`` (to ``min_lr_ratio`` × peak), ``linear`` (to 0) or ``constant``.
        warmup_steps: optimizer steps of linear warmup from 0 to the peak rate.
        min_lr_ratio: with ``cosine``, the final rate as a fraction of the peak.
    """

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("model.lr_schedule.warmup_steps", f"{self.warmup_steps} is negative", "use 0 or more")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("model.lr_schedule.min_lr_ratio", f"{self.min_lr_ratio} is outside [0, 1]", "use 0..1")

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int | float) -> torch.optim.lr_scheduler.LambdaLR:
        """Build the scheduler for a run of ``total_steps`` optimizer steps."""
        if self.name == "constant":
            return _lambda_lr(optimizer, self.name, self.warmup_steps, total_steps=1, min_lr_ratio=1.0)
        if not math.isfinite(total_steps):
            raise ConfigError(
                "trainer.max_steps",
                "a decaying schedule needs a finite run length",
                "set trainer.max_steps or max_epochs",
            )
        if self.warmup_steps >= total_steps:
            raise ConfigError(
                "model.lr_schedule.warmup_steps",
                f"{self.warmup_steps} warmup steps for a run of {int(total_steps)} optimizer steps",
                "use fewer warmup steps than trainer.max_steps",
            )
        return _lambda_lr(optimizer, self.name, self.warmup_steps, int(total_steps), self.min_lr_ratio)


def _lambda_lr(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose multiplier is :func:`lr_multiplier`.

    Written out instead of calling transformers' ``get_*_schedule_with_warmup``: importing
    ``transformers.optimization`` imports ``trainer_utils``, which imports peft and bitsandbytes, about 1 s of every
    litune process's start on CPU. The formulas are transformers' (``tests/test_module.py`` checks them against
    transformers' functions step by step). A ``partial`` of a module-level function, as transformers uses: its
    arguments are not saved with the scheduler's state, so a resumed run follows the schedule of its own config.
    """
    multiplier = partial(
        lr_multiplier, name=name, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def lr_multiplier(step: int, *, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the peak: linear warmup from 0 over
    ``warmup_steps``, then constant, linear decay to 0 at ``total_steps``, or cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if name == "constant":
        return 1.0
    decay_steps = float(max(1, total_steps - warmup_steps))
    if name == "linear":
        return max(0.0, float(total_steps - step) / decay_steps)
    progress = float(step - warmup_steps) / decay_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, cosine * (1 - min_lr_ratio) + min_lr_ratio)
