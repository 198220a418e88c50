"""Measure the model state a rank actually holds: parameters, fp32 master copies and optimizer moments, in bytes.

This is the measured side of ``litune estimate``: ZeRO's claim is about exactly these tensors (stage 1 partitions the
master weights and moments, stage 3 the parameters too), so we sum ``numel * element_size`` over the tensors the rank
owns rather than reading a process's RSS, which on CPU mixes in the Python heap, the data and the allocator's caches.
Gradients are not measured: DeepSpeed frees or reuses them between steps, so there is no stable tensor set to count.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from litune.strategies.descriptor import describe


def _local(t: torch.Tensor) -> torch.Tensor:
    # An FSDP2 parameter (and its Adam moments) is a DTensor whose numel() is the whole tensor's: count the local shard.
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(_local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # Only tensors with elements per parameter: Adam's scalar `step` counters are not model state.
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.ndim]


def model_state_bytes(trainer: Trainer) -> dict[str, Any]:
    """The bytes of model state held by this rank, split as in the ZeRO paper.

    Returns:
        ``{"rank", "world_size", "strategy", "stage", "num_params", "params", "master", "optimizer"}``: ``params`` are
        the training-precision parameters this rank stores (its shard under ZeRO-3 and FSDP2), ``master`` the fp32
        master copy (DeepSpeed only), ``optimizer`` the optimizer's per-parameter states (Adam's two moments).
    """
    strategy = trainer.strategy
    module = trainer.lightning_module
    report: dict[str, Any] = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(strategy).__name__,
        "stage": 0,
    }
    engine = strategy.deepspeed_engine if describe(strategy).deepspeed else None
    if engine is None:
        params = list(module.parameters())
        report.update(
            num_params=sum(p.numel() for p in params),  # a DTensor's numel() is the unsharded count
            params=_bytes(params),
            master=0,
            optimizer=sum(_bytes(_state_tensors(opt)) for opt in trainer.optimizers),
        )
        return report
    zero = engine.optimizer
    stage = engine.zero_optimization_stage()
    report["stage"] = stage
    params = list(engine.module.parameters())
    if stage == 3:
        report["num_params"] = sum(p.ds_numel for p in params)
        report["params"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        report["master"] = _bytes(zero.fp32_partitioned_groups_flat)
    else:
        report["num_params"] = sum(p.numel() for p in params)
        report["params"] = _bytes(params)
        report["master"] = _bytes(zero.single_partition_of_fp32_groups)
    report["optimizer"] = _bytes(_state_tensors(zero.optimizer))
    return report


class ModelStateReport(Callback):
    """Write each rank's measured model-state bytes to ``<run folder>/model_state/rank<R>.json`` after training.

    Compare with ``litune estimate`` for the same config. Add it with
    ``--trainer.callbacks+=litune.callbacks.model_state.ModelStateReport``.

    Args:
        directory: where to write; defaults to ``<trainer.default_root_dir>/model_state``.
    """

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(self.directory or Path(trainer.default_root_dir) / "model_state")
        folder.mkdir(parents=True, exist_ok=True)
        report = model_state_bytes(trainer)
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2) + "\n")
