"""Optimizers under DeepSpeed: torch's own normally, DeepSpeed's CPU Adam when the optimizer is offloaded.

With ZeRO-Offload the optimizer step runs on the CPU over fp32 master weights. DeepSpeed refuses a torch optimizer
there (it would be a slow per-tensor loop) and wants ``DeepSpeedCPUAdam`` (a vectorised C++ op, compiled on first use
by DeepSpeed's op builder). Users configure their optimizer once (``torch.optim.AdamW`` in the model config), so the
strategy converts it here rather than asking for a second, DeepSpeed-only optimizer setting.
"""

from __future__ import annotations

import torch

from litune.errors import ConfigError


def offloads_optimizer(config: dict) -> bool:
    """Whether a DeepSpeed config puts the optimizer state on the CPU (or NVMe)."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def to_deepspeed_cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Rebuild a torch Adam/AdamW as ``DeepSpeedCPUAdam`` over the same parameter groups.

    The new optimizer shares the ``param_groups`` dicts of the old one, so an LR scheduler built on the old optimizer
    keeps steering the learning rate (re-point ``scheduler.optimizer`` anyway, for schedulers that read it).

    Args:
        optimizer: a fresh ``torch.optim.Adam`` or ``torch.optim.AdamW`` (no state yet).

    Raises:
        ConfigError: for any other optimizer, which DeepSpeed cannot run offloaded.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(
            "model.optimizer",
            f"{type(optimizer).__name__} cannot run with ZeRO optimizer offload (DeepSpeed's CPU optimizer is Adam)",
            "use torch.optim.AdamW or torch.optim.Adam, or a strategy without offload (configs/strategy/"
            "deepspeed_zero2.yaml or deepspeed_zero3.yaml)",
        )
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    # torch.optim.Adam with weight_decay is L2 regularisation, AdamW is decoupled decay: keep the user's choice.
    adamw_mode = isinstance(optimizer, torch.optim.AdamW) or bool(defaults.get("decoupled_weight_decay", False))
    return DeepSpeedCPUAdam(
        optimizer.param_groups,
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
        amsgrad=defaults.get("amsgrad", False),
        adamw_mode=adamw_mode,
    )
