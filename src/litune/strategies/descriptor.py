"""What a run's strategy is, parsed once: the one answer to "which strategy is this?".

A ``trainer.strategy`` setting comes in four forms: Lightning's registry names (``"ddp"``,
``"deepspeed_stage_2_offload"``), a ``class_path``/``init_args`` mapping (a config file), a jsonargparse Namespace of
that mapping, or a built ``Strategy`` object (inside the Trainer). :func:`describe` turns each into one
:class:`StrategySpec`: its kind, ZeRO stage, offload and world size, and what it can do. Everything else in litune reads
the spec; none of it matches class names or config strings, or sniffs a strategy's attributes.

Classes are told apart by their Lightning base class (a ``class_path`` is imported, a registry name is looked up in
Lightning's ``StrategyRegistry``), so a user's subclass of ``DeepSpeedStrategy`` is a ZeRO strategy too.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    ModelParallelStrategy,
    ParallelStrategy,
    Strategy,
    StrategyRegistry,
)

from litune.errors import ConfigError
from litune.memory_model import StrategyShape

FIELD = "trainer.strategy"


class Kind(str, Enum):
    """How a strategy places model state: ``single`` device, ``ddp`` replicas, DeepSpeed ``zero`` (with a stage),
    ``fsdp2`` full sharding, ``hybrid`` FSDP2 sharding within groups and replication across them."""

    SINGLE = "single"
    DDP = "ddp"
    ZERO = "zero"
    FSDP2 = "fsdp2"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class StrategySpec:
    """One strategy, described.

    Args:
        kind: see :class:`Kind`.
        stage: the ZeRO stage (1-3) for ``Kind.ZERO``, else 0.
        offload_optimizer: optimizer state (with its gradient partition) kept in host memory.
        offload_params: parameters kept in host memory (ZeRO-3 and FSDP2).
        shard_size: ranks per shard group for ``Kind.HYBRID`` (None: one node's processes).
        world_size: processes over all nodes, when known.
        tensor_parallel_size: ranks of a tensor-parallel group (FSDP2 ``tensor_parallel_size``; 1: none).
        sequence_parallel_size: ranks of a Ulysses sequence group (FSDP2 ``sequence_parallel_size``; 1: none).
    """

    kind: Kind
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    shard_size: int | None = None
    world_size: int | None = None
    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1

    @property
    def batch_replicas(self) -> int:
        """Ranks that read the same batch rows (a tensor- or sequence-parallel group): the objective counts the rows'
        tokens once."""
        return self.tensor_parallel_size * self.sequence_parallel_size

    @property
    def loss_replicas(self) -> int:
        """Ranks that compute the same loss (a tensor-parallel group; the ranks of a sequence group each take their
        own slice's): the objective counts their summed losses once, and gradients are averaged over the others."""
        return self.tensor_parallel_size

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed runs the optimizer step and accumulation (its engine divides the loss once more)."""
        return self.kind is Kind.ZERO

    @property
    def fsdp2(self) -> bool:
        """FSDP2, fully or hybrid sharded (``litune.strategies.FSDP2Strategy``)."""
        return self.kind in (Kind.FSDP2, Kind.HYBRID)

    @property
    def reshards_checkpoints(self) -> bool:
        """Its checkpoints (DCP folders) load onto any world size."""
        return self.fsdp2

    @property
    def shards_network(self) -> bool:
        """It lends ``shard_network`` so that a pretrained network is loaded straight into shards."""
        return self.fsdp2

    @property
    def excludes_frozen_parameters(self) -> bool:
        """It writes its own module states and can leave frozen (adapter base) parameters out of them."""
        return self.deepspeed

    @property
    def gathers_parameters_per_call(self) -> bool:
        """Parameters are partitioned and gathered in hooks around each module call (ZeRO-3): no ``torch.compile``."""
        return self.deepspeed and self.stage == 3

    @property
    def checkpoint_kind(self) -> str:
        """The checkpoint it writes: ``"deepspeed"`` (ZeRO shards), ``"fsdp2"`` (a DCP folder) or ``"file"``."""
        return "deepspeed" if self.deepspeed else "fsdp2" if self.fsdp2 else "file"

    @property
    def label(self) -> str:
        """A short name for messages: ``"DeepSpeed"``, ``"FSDP2"``, ``"DDP"``, ``"one device"``."""
        return {Kind.ZERO: "DeepSpeed", Kind.FSDP2: "FSDP2", Kind.HYBRID: "FSDP2", Kind.DDP: "DDP"}.get(
            self.kind, "one device"
        )

    def loads(self, checkpoint_kind: str) -> bool:
        """Whether this strategy can resume a checkpoint of ``checkpoint_kind`` (see :attr:`checkpoint_kind`).

        A sharded checkpoint loads only under the strategy that wrote it; FSDP2 also loads a full single-file one.
        """
        return checkpoint_kind == self.checkpoint_kind or (checkpoint_kind == "file" and self.fsdp2)

    def memory_shape(self) -> StrategyShape:
        """The shape :mod:`litune.memory_model` computes per-device memory from."""
        return StrategyShape(
            stage=self.stage,
            deepspeed=self.deepspeed,
            offload_optimizer=self.offload_optimizer,
            offload_params=self.offload_params,
            fsdp=self.fsdp2,
            hybrid=self.kind is Kind.HYBRID,
            shard_size=self.shard_size,
            tensor_parallel=self.tensor_parallel_size,
            sequence_parallel=self.sequence_parallel_size,
        )


def describe(strategy: Any, world_size: int | None = None) -> StrategySpec:
    """The :class:`StrategySpec` of a ``trainer.strategy`` setting or of a built strategy.

    Args:
        strategy: ``None``/``"auto"``, a registry name, a ``class_path``/``init_args`` mapping or Namespace, or a
            Lightning ``Strategy`` object.
        world_size: processes over all nodes when known (a built strategy knows its own).
    """
    if isinstance(strategy, Strategy):
        return _of_object(strategy)
    if hasattr(strategy, "as_dict"):  # a jsonargparse Namespace holding class_path/init_args
        strategy = strategy.as_dict()
    if isinstance(strategy, Mapping):
        return _of_class(
            _import_class(str(strategy.get("class_path", ""))), strategy.get("init_args") or {}, world_size
        )
    if strategy is None or strategy == "auto" or strategy not in StrategyRegistry:
        # "auto" (and a name Lightning will refuse itself, with its list of names, when it builds the Trainer)
        return StrategySpec(
            Kind.DDP if world_size is not None and world_size > 1 else Kind.SINGLE, world_size=world_size
        )
    entry = StrategyRegistry[strategy]
    return _of_class(entry["strategy"], entry["init_params"], world_size)


def _import_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    candidates = [module] if module else ["lightning.pytorch.strategies", "litune.strategies"]
    for candidate in candidates:
        try:
            found = getattr(importlib.import_module(candidate), name, None)
        except ImportError:
            found = None
        if isinstance(found, type):
            return found
    raise ConfigError(f"{FIELD}.class_path", f"{class_path!r} is not an importable class", "name a Strategy class")


def _of_class(cls: type, args: Mapping[str, Any], world_size: int | None) -> StrategySpec:
    """The spec of ``cls(**args)`` without building it (building one may spawn nothing, but imports DeepSpeed)."""
    if issubclass(cls, DeepSpeedStrategy):
        stage = int(args.get("stage", 2))
        offload_params = bool(args.get("offload_parameters", False))
        return StrategySpec(
            Kind.ZERO, stage, bool(args.get("offload_optimizer", False)), offload_params, None, world_size
        )
    if issubclass(cls, ModelParallelStrategy):
        offload = bool(args.get("cpu_offload", False))
        hybrid = args.get("sharding", "full") == "hybrid"
        shard_size = int(args["shard_size"]) if args.get("shard_size") else None
        tp = int(args.get("tensor_parallel_size", 1) or 1)
        sp = int(args.get("sequence_parallel_size", 1) or 1)
        kind = Kind.HYBRID if hybrid else Kind.FSDP2
        return StrategySpec(kind, 0, offload, offload, shard_size, world_size, tp, sp)
    if issubclass(cls, ParallelStrategy):
        return StrategySpec(Kind.DDP, world_size=world_size)
    return StrategySpec(Kind.SINGLE, world_size=world_size)


def _of_object(strategy: Strategy) -> StrategySpec:
    """The spec of a built strategy, read from its settings (a DeepSpeed config may come from a JSON file)."""
    world_size = strategy.world_size if isinstance(strategy, ParallelStrategy) else 1
    if isinstance(strategy, DeepSpeedStrategy):
        zero = strategy.config.get("zero_optimization", {})
        args = {
            "stage": zero.get("stage", 0),
            "offload_optimizer": "offload_optimizer" in zero,
            "offload_parameters": "offload_param" in zero,
        }
        return _of_class(type(strategy), args, world_size)
    # FSDP2Strategy's own settings; Lightning's ModelParallelStrategy has none of them (full sharding, no offload).
    args = {
        "sharding": getattr(strategy, "sharding", "full"),
        "shard_size": getattr(strategy, "shard_size", None),
        "cpu_offload": getattr(strategy, "cpu_offload", False),
        "tensor_parallel_size": getattr(strategy, "tensor_parallel_size", 1),
        "sequence_parallel_size": getattr(strategy, "sequence_parallel_size", 1),
    }
    return _of_class(type(strategy), args, world_size)
