"""Optimizer parameter groups and learning-rate schedules.

The optimizer class itself is chosen in the config (``class_path: torch.optim.AdamW``); this module decides which
parameters get weight decay, runs Adam and AdamW with torch's fused kernel unless the config chose an implementation
(:func:`use_fast_kernels`), and builds the warmup + decay schedule.
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


FAST_KERNEL_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
"""Optimizers :func:`use_fast_kernels` switches to torch's fused kernel (what ``transformers.Trainer`` defaults to)."""


def _fused_devices() -> set[str]:
    """Device types with torch's fused Adam kernels (torch 2.13: cpu, cuda, mps, xpu, ...)."""
    try:  # private in torch, but the very list torch's Adam checks ``fused=True`` against
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return set(_get_fused_kernels_supported_devices())
    except ImportError:
        return {"cuda"}


def _chose_implementation(group: dict) -> bool:
    """Whether a parameter group (or the defaults) names an implementation: ``fused``/``foreach`` set, even to false."""
    return group.get("fused") is not None or group.get("foreach") is not None or bool(group.get("differentiable"))


def use_fast_kernels(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Switch a fresh Adam/AdamW to ``fused=True`` where torch has the kernel for every parameter, else ``foreach``.

    torch's own default (``fused=None, foreach=None``) is the per-parameter for-loop on CPU and ``foreach`` on CUDA;
    the fused kernel does the whole update in one pass per tensor group (about 5x faster on CPU for a 5 M-parameter
    GPT-2) and gives the same parameters within fp32 rounding (``tests/test_optim.py``). An optimizer whose config set
    ``fused`` or ``foreach`` (``false`` included) is left as configured, as is every other optimizer class.

    Why switch after construction instead of passing ``fused=True``: the config's optimizer is a callable that takes
    the parameter groups only, and which kernel fits depends on where the parameters are, known only here. The
    switch sets the groups' flags as ``Adam.__init__(fused=True)`` does; torch checks the parameters' device and dtype
    at the first step. It leaves ``_step_supports_amp_scaling`` unset, unlike ``Adam.__init__``: with it set, a
    GradScaler (fp16 mixed precision) would unscale inside the kernel, and Lightning refuses gradient clipping for such
    an optimizer; unset, the scaler unscales the gradients first, clipping works, and the kernel stays fused.
    DeepSpeed ZeRO wraps this optimizer and steps it over its fp32 partitions (fused there too); with the optimizer
    offloaded, :func:`litune.strategies.optimizers.to_deepspeed_cpu_adam` replaces it with DeepSpeed's CPU Adam.

    Args:
        optimizer: an optimizer with no state yet, whose parameters are already on their device (plain tensors or
            FSDP2's DTensors, whose local shards the kernel updates).

    Returns:
        The same optimizer object (schedulers built on it keep working).
    """
    if type(optimizer) not in FAST_KERNEL_OPTIMIZERS or optimizer.state:
        return optimizer
    groups = [optimizer.defaults, *optimizer.param_groups]
    if any(_chose_implementation(g) for g in groups):
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = _fused_devices()
    fused = all(p.device.type in devices and torch.is_floating_point(p) for p in params)
    for group in groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
    return optimizer


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
        self.check_run_length(total_steps)
        return _lambda_lr(optimizer, self.name, self.warmup_steps, int(total_steps), self.min_lr_ratio)

    def check_run_length(self, total_steps: int | float) -> None:
        """Refuse a decaying schedule for a run of no finite length, or one not longer than its warmup.

        Called before launch with ``trainer.max_steps`` (``litune fit``'s checks) and again with the step count
        Lightning estimates (a run bounded by epochs is only known then).
        """
        if self.name == "constant":
            return
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
