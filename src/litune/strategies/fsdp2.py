"""FSDP2 (``torch.distributed.fsdp.fully_shard``): PyTorch's native sharding, through Lightning's ModelParallelStrategy.

Every rank keeps ``1/N`` of each parameter, its gradient and its optimizer state (as ZeRO-3 does) as a ``DTensor``
sharded on dim 0; a transformer block's parameters are all-gathered just before the block runs and freed after it.
Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` provides the process group, the launcher and
DCP (``torch.distributed.checkpoint``) checkpoints, but expects the user's ``configure_model`` to apply the sharding
and builds a data-parallel x tensor-parallel mesh. :class:`FSDP2Strategy` adds what a litune run needs:

* the sharding itself: each network names its transformer blocks through ``sharding_units()`` (one hook that every
  network family implements), the strategy shards each block and then the network (the root, which keeps the
  embeddings, final norm and output head);
* a data-parallel mesh: full sharding over all ranks (1-D), or hybrid sharding (HSDP, 2-D: shard within a group of
  ``shard_size`` ranks, by default a node, and replicate across groups);
* mixed precision from the trainer's precision flag: ``bf16-mixed`` computes with bf16 copies of the gathered
  parameters and reduces gradients in fp32 (``MixedPrecisionPolicy``); the sharded master parameters stay fp32;
* CPU offload of the sharded parameters, gradients and optimizer state (``CPUOffloadPolicy``; the step runs on CPU);
* the machine checks of :mod:`litune.strategies.checks` before any process is spawned;
* atomic checkpoints: the DCP folder is written under a staging name and renamed once every rank has finished
  (:mod:`litune.strategies.atomic`), so a kill during a save never leaves a half-written folder behind ``last.ckpt``;
  DCP's ``.metadata`` file, written by the coordinator once every shard is on disk, is required to load one;
* resuming on a different world size: DCP reshards the parameters and the optimizer state on load.

Tensor parallelism (``tensor_parallel_size: N``, ``configs/strategy/fsdp2_tp2.yaml``): the mesh becomes
``data_parallel x tensor_parallel``; each network's plan (``tensor_parallel_plan()``, beside ``sharding_units()``,
see :mod:`litune.models.tensor_parallel`) splits its layers over a tensor-parallel group, then FSDP2 shards the result
over the data-parallel axis (skipped when that axis has one rank). The ranks of a tensor-parallel group read the same
rows (the samplers see the data-parallel size and rank), and the objective counts each row once
(``batch_replicas``).

Sequence parallelism (``sequence_parallel_size: N``, ``configs/strategy/fsdp2_sp2.yaml``): Ulysses
(:mod:`litune.models.sequence_parallel`). The ranks of a sequence group (consecutive global ranks) read the same rows
and each keeps ``1/N`` of every sequence; attention exchanges the sequence for the heads with an all-to-all. FSDP2
shards over all ranks (``data_parallel x sequence_parallel`` flattened): a sequence rank's gradient is its slice's
share, so averaging over every rank and dividing by the data-parallel size (``gradient_divisor``) gives the gradient
of the whole batch. Composed with tensor parallelism it is refused (not implemented).

Gradient clipping by norm works as in DDP: ``clip_grad_norm_`` over DTensor gradients all-reduces the shards' norms,
so the clipped gradient is the one a single process would clip (tested against a 1-process run).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from litune.errors import NETWORK_FIELD, ConfigError, check_group_divides
from litune.lightning_private import LIGHTNING_META_FILE
from litune.strategies.atomic import atomic_directory
from litune.strategies.checks import check_run, resolve_accelerator

DCP_METADATA = ".metadata"
"""The file ``torch.distributed.checkpoint`` writes last, once every rank's shard is on disk: a save's commit mark."""

CHECKPOINT_KEY = "fsdp2"
"""Entry of ``meta.pt`` that records the world size a checkpoint was saved with."""

Sharding = Literal["full", "hybrid"]


def is_fsdp2_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete FSDP2 (DCP) checkpoint folder: DCP's ``.metadata`` and Lightning's ``meta.pt``."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / LIGHTNING_META_FILE).is_file()


def sharding_units(network: nn.Module) -> list[nn.Module]:
    """The sub-modules a network wants sharded one by one (its transformer blocks), in forward order.

    Raises:
        ConfigError: when the network does not implement the ``sharding_units()`` hook.
    """
    hook = network_hook(
        network,
        "sharding_units",
        "does not say how FSDP2 should shard it",
        "implement `sharding_units()` returning the network's transformer blocks, or use a DDP/DeepSpeed config",
    )
    return list(hook())


def network_hook(network: nn.Module, name: str, why: str, fix: str) -> Callable[..., Any]:
    """The network's method ``name`` that a strategy calls (``sharding_units``, ``split_sequences``).

    Raises:
        ConfigError: naming ``model.network``, when the network has no such method: ``why`` it is needed, and ``fix``.
    """
    hook = getattr(network, name, None)
    if not callable(hook):
        raise ConfigError(NETWORK_FIELD, f"{type(network).__name__} {why} (no `{name}()` method)", fix)
    return hook


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied to ``module`` (it becomes an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_adapters(tensor_parallel_size: int, quantized: bool) -> None:
    """Refuse the adapter layouts FSDP2 does not shard: the CLI calls it before spawning, :meth:`FSDP2Strategy.setup`
    as a guard.

    LoRA/DoRA on a full-precision base are sharded with the blocks they sit in (``fully_shard`` keeps the frozen and
    the trainable parameters of a block in one group; only the trainable ones get gradients and optimizer state).
    Tensor parallelism would have to split each adapter's ``A``/``B`` with its base layer (peft's layers are not in
    the networks' plans), and a 4-bit base's packed weights cannot be split on dim 0.
    """
    if tensor_parallel_size > 1:
        raise ConfigError(
            "model.adapters",
            "adapters are not split by tensor parallelism (peft's layers are not in the networks' plans)",
            "use tensor_parallel_size: 1 (FSDP2 shards the adapters with their blocks), or drop model.adapters",
        )
    if quantized:
        raise ConfigError(
            "model.adapters",
            "FSDP2 cannot shard a 4-bit (QLoRA) base: its packed weights do not split row by row",
            "use LoRA on a full-precision base under FSDP2, or QLoRA with configs/strategy/ddp.yaml",
        )


def check_tensor_parallel_size(size: object, sharding: str = "full") -> None:
    """Raise a :class:`ConfigError` unless ``size`` is a positive integer (and, above 1, sharding is full)."""
    field = "trainer.strategy.init_args.tensor_parallel_size"
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(field, f"tensor_parallel_size={size!r} must be a positive integer", "use 1 (off), 2, 4 or 8")
    if size > 1 and sharding != "full":
        raise ConfigError(
            field,
            f"tensor parallelism is composed with full sharding only, not sharding={sharding!r}",
            "set sharding: full with tensor_parallel_size, or tensor_parallel_size: 1 for hybrid sharding",
        )


SEQUENCE_FIELD = "trainer.strategy.init_args.sequence_parallel_size"


def check_sequence_parallel_layout(size: object, tensor_parallel_size: int = 1, sharding: str = "full") -> None:
    """Raise a :class:`ConfigError` unless ``size`` is a positive integer, and (above 1) refuse the layouts sequence
    parallelism is not composed with: tensor parallelism and hybrid sharding."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(SEQUENCE_FIELD, f"sequence_parallel_size={size!r} must be a positive integer", "use 1, 2, 4")
    if size > 1 and tensor_parallel_size > 1:
        raise ConfigError(
            SEQUENCE_FIELD,
            f"sequence parallelism is not composed with tensor_parallel_size={tensor_parallel_size} (not implemented)",
            "use one of them: sequence_parallel_size for long sequences, tensor_parallel_size for wide layers",
        )
    if size > 1 and sharding != "full":
        raise ConfigError(
            SEQUENCE_FIELD,
            f"sequence parallelism is composed with full sharding only, not sharding={sharding!r}",
            "set sharding: full with sequence_parallel_size, or sequence_parallel_size: 1 for hybrid sharding",
        )


def split_sequences(network: nn.Module, group: Any) -> None:
    """Turn on Ulysses sequence parallelism over ``group`` in ``network`` (its ``split_sequences(group)`` hook).

    Raises:
        ConfigError: when the network has no such hook.
    """
    hook = network_hook(
        network,
        "split_sequences",
        "cannot split its sequences",
        "use litune.models.transformer.DecoderLM or litune.models.HFCausalLM, or sequence_parallel_size: 1",
    )
    hook(group)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) for every litune network, on GPUs (NCCL) and on CPU (gloo).

    Args:
        sharding: ``"full"`` shards over all ranks; ``"hybrid"`` shards within groups of ``shard_size`` ranks and
            replicates across groups (HSDP: gradients are reduce-scattered in a group and all-reduced across groups,
            so the slow inter-node links carry only ``1/shard_size`` of the gradient).
        shard_size: ranks per shard group for ``"hybrid"``; default: the processes of one node.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory and step the
            optimizer there (``CPUOffloadPolicy``); the device holds only the blocks being computed.
        reshard_after_forward: free each block's gathered parameters after its forward (re-gathered for backward).
            False keeps them until the backward (ZeRO-2-like memory, less communication).
        tensor_parallel_size: ranks of a tensor-parallel group (1: FSDP2 alone); must divide the number of
            processes, and the network's heads, hidden units and vocabulary.
        sequence_parallel_size: ranks of a Ulysses sequence-parallel group (1: off), each holding ``1/N`` of every
            sequence; must divide the number of processes and the network's attention (and key/value) heads.
        process_group_backend: ``"nccl"``/``"gloo"``; default: NCCL on CUDA, gloo on CPU.
        timeout: collective timeout.
    """

    strategy_name = "litune_fsdp2"
    reshards_checkpoints = True
    """DCP checkpoints load onto any world size (LitLM refuses a world-size change under other strategies)."""

    def __init__(
        self,
        sharding: Sharding = "full",
        shard_size: int | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        tensor_parallel_size: int = 1,
        sequence_parallel_size: int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if sharding not in ("full", "hybrid"):
            raise ConfigError(
                "trainer.strategy.init_args.sharding", f"sharding={sharding!r} is not known", "use 'full' or 'hybrid'"
            )
        if shard_size is not None and (sharding != "hybrid" or shard_size < 1):
            raise ConfigError(
                "trainer.strategy.init_args.shard_size",
                f"shard_size={shard_size} needs sharding='hybrid' and a positive size",
                "remove shard_size, or set sharding: hybrid and a shard_size that divides the world size",
            )
        check_tensor_parallel_size(tensor_parallel_size, sharding)
        check_sequence_parallel_layout(sequence_parallel_size, tensor_parallel_size, sharding)
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend, timeout=timeout)
        self.sharding = sharding
        self.shard_size = shard_size
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward
        self.tensor_parallel_size = tensor_parallel_size
        self.sequence_parallel_size = sequence_parallel_size
        self.sequence_mesh: Any = None  # (data_parallel x sequence_parallel) under sequence parallelism

    # ---- set-up -------------------------------------------------------------------------------------------------

    def _configure_launcher(self) -> None:
        # Runs inside Trainer construction, before any process is spawned: the last moment to fail cheaply.
        processes = len(self.parallel_devices or []) or None
        check_run(resolve_accelerator(self.accelerator), processes, getattr(self.precision_plugin, "precision", None))
        super()._configure_launcher()

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The device mesh: ``((N,), ("data_parallel",))``, ``((replicas, shard), ("replicate", "shard"))``, or with
        tensor parallelism ``((N / tp, tp), ("data_parallel", "tensor_parallel"))``. Under sequence parallelism FSDP2
        shards over all ``N`` ranks (``data_parallel`` spans the sequence groups, see :meth:`setup_environment`)."""
        world = self.world_size
        tp = self.tensor_parallel_size
        sp = self.sequence_parallel_size
        check_group_divides("sequence_parallel_size", sp, world)
        if tp > 1:
            check_group_divides("tensor_parallel_size", tp, world)
            return (world // tp, tp), ("data_parallel", "tensor_parallel")
        if self.sharding == "full":
            return (world,), ("data_parallel",)
        shard = self.shard_size or self.num_processes
        if world % shard:
            raise ConfigError(
                "trainer.strategy.init_args.shard_size",
                f"hybrid sharding in groups of {shard} ranks does not divide the world size {world}",
                f"set shard_size to a divisor of {world}",
            )
        return (world // shard, shard), ("replicate", "shard")

    def setup_environment(self) -> None:
        # Lightning's version builds a data-parallel x tensor-parallel mesh; FSDP2 alone needs the mesh above.
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()
        shape, names = self.mesh_shape()
        self._device_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        sp = self.sequence_parallel_size
        if sp > 1:  # the sequence groups: consecutive ranks, as the samplers count them
            dims = ("data_parallel", "sequence_parallel")
            self.sequence_mesh = init_device_mesh(
                self.root_device.type, (self.world_size // sp, sp), mesh_dim_names=dims
            )
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def batch_replicas(self) -> int:
        """Ranks that read the same rows (a tensor- or sequence-parallel group): the look-ahead counts them once."""
        return self.tensor_parallel_size * self.sequence_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.batch_replicas

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank is a data-parallel rank (replicas and shards alike each take their own rows), except that the
        # ranks of a tensor- or sequence-parallel group (consecutive global ranks) share theirs.
        group = self.batch_replicas
        return {"num_replicas": self.world_size // group, "rank": self.global_rank // group}

    def fully_shard_kwargs(self) -> dict[str, Any]:
        """``fully_shard`` arguments: mesh, mixed-precision and offload policies from this run's settings."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        mesh = self.device_mesh["data_parallel"] if self.tensor_parallel_size > 1 else self.device_mesh
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if getattr(self.precision_plugin, "precision", None) == "bf16-mixed":
            # bf16 copies of the gathered parameters for compute; fp32 gradient reduction and fp32 sharded masters.
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            # Pinned host memory only helps (and only exists) with CUDA copies.
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        return kwargs

    def shard_network(self, network: nn.Module) -> nn.Module:
        """Apply ``fully_shard`` to each of the network's ``sharding_units()``, then to the network itself.

        Idempotent (Lightning may call ``configure_model`` again). Parameters still on the meta device stay there
        (their owner materializes them after sharding, see ``DeferredHFCausalLM``); real ones are split at once, so
        each rank frees the other ranks' rows.
        """
        from torch.distributed.fsdp import fully_shard

        if is_sharded(network) or getattr(network, "_litune_parallelized", False):
            return network
        if self.tensor_parallel_size > 1:
            from litune.models.tensor_parallel import apply_tensor_parallel

            if any(p.device.type == "meta" for p in network.parameters()):
                raise ConfigError(
                    "trainer.strategy.init_args.tensor_parallel_size",
                    f"{type(network).__name__} is built on the meta device, which tensor parallelism does not load yet",
                    "use litune.models.transformer.DecoderLM, or tensor_parallel_size: 1",
                )
            apply_tensor_parallel(network, self.device_mesh["tensor_parallel"])
            network._litune_parallelized = True
            if self.data_parallel_size == 1:
                return network  # one data-parallel rank: nothing for FSDP2 to shard
        kwargs = self.fully_shard_kwargs()
        for unit in sharding_units(network):
            fully_shard(unit, **kwargs)
        fully_shard(network, **kwargs)
        if any(p.device.type == "meta" for p in network.parameters()):
            self._materialize_shards(network)
        return network

    def _materialize_shards(self, network: nn.Module) -> None:
        """Give the shards of parameters created on ``meta`` storage (uninitialized: the owner fills them).

        ``to_empty`` also re-allocates buffers, which were created real (see ``parameters_on_meta``): their values are
        put back.
        """
        buffers = {name: b.detach().clone() for name, b in network.named_buffers()}
        # Offloaded shards live in host memory; FSDP2 copies them to the device block by block.
        network.to_empty(device=torch.device("cpu") if self.cpu_offload else self.root_device)
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                buffer.copy_(buffers[name])

    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None
        network = getattr(module, "network", None)
        if network is None:
            raise ConfigError("model", f"{type(module).__name__} has no `network` to shard", "use litune.module.LitLM")
        if getattr(module, "adapters", None) is not None:
            from litune.models.adapters import is_quantized

            check_adapters(self.tensor_parallel_size, is_quantized(network))
        if self.sequence_parallel_size > 1:
            split_sequences(network, self.sequence_mesh["sequence_parallel"].get_group())
        # LitLM.configure_model has built any deferred network (sharding it itself when it loads weights shard by
        # shard); the rest are sharded here, before Lightning materializes, converts and moves the module.
        self.shard_network(network)
        super().setup(trainer)

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            super().model_to_device()
            return
        # Offloaded shards stay in host memory (FSDP2 copies them to the device block by block); buffers (position
        # ids, masks) are not sharded and must sit on the device.
        assert self.model is not None
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.root_device)

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write the DCP folder so that it appears under its name only once every rank has written its shard.

        Lightning's version writes straight into the target; here every rank writes into a staging folder that
        replaces the old checkpoint after a barrier (:func:`litune.strategies.atomic.atomic_directory`, shared with
        the DeepSpeed strategy). DCP's ``.metadata`` (written by the coordinator after all shards) and Lightning's
        ``meta.pt`` are both required by the loader.
        """
        # The data-parallel size: what the loop's micro-batch counts depend on (tensor-parallel ranks share rows).
        checkpoint[CHECKPOINT_KEY] = {
            "world_size": self.data_parallel_size,
            "tensor_parallel_size": self.tensor_parallel_size,
            "sequence_parallel_size": self.sequence_parallel_size,
        }
        filepath = self.broadcast(str(filepath))
        with atomic_directory(filepath, self.is_global_zero, self.barrier) as staged:
            super().save_checkpoint(checkpoint, staged, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        if path.is_dir() and not is_fsdp2_checkpoint(path):
            raise ConfigError(
                "ckpt_path",
                f"{path} is a folder but not a complete FSDP2 checkpoint (no {DCP_METADATA} and {LIGHTNING_META_FILE})",
                "resume from another checkpoint of the run (e.g. a step*.ckpt beside it)",
            )
        # DCP loads the shards onto whatever mesh this run has: a different world size reshards.
        checkpoint = super().load_checkpoint(
            checkpoint_path, weights_only=False if weights_only is None else weights_only
        )
        dp = self.data_parallel_size
        saved = (checkpoint.get(CHECKPOINT_KEY) or {}).get("world_size", dp)
        if saved != dp:
            rank_zero_info(f"FSDP2: resharding a checkpoint of {saved} data-parallel ranks onto {dp}")
            rescale_batch_progress(checkpoint, saved, dp)
        return checkpoint


def rescale_batch_progress(checkpoint: dict[str, Any], saved_world_size: int, world_size: int) -> None:
    """Restate the epoch loop's micro-batch counters of a checkpoint for a run with another number of processes.

    Lightning counts micro-batches per process and decides where an accumulation window ends from that count, so
    after ``S`` optimizer steps a run of 2 processes (accumulation 1) has counted ``S`` batches and one of 1 process
    (accumulation 2) ``2S``. Carried over unchanged, the count would end the first resumed window after one
    micro-batch. The same rows have been consumed either way (the data module saves rows over all ranks), so the
    counters are scaled by ``saved_world_size / world_size``.

    Raises:
        ConfigError: when the saved count does not convert to whole micro-batches of the new world size.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    for scope in ("total", "current"):
        counters = progress[scope]
        processed = counters.get("processed", 0)
        rows = processed * saved_world_size
        if rows % world_size:
            raise ConfigError(
                "trainer.devices",
                f"the checkpoint was saved by {saved_world_size} processes after {processed} micro-batches each, "
                f"which is not a whole number of micro-batches for {world_size} processes",
                f"resume with {saved_world_size} processes, or from a checkpoint at another step",
            )
        for name, count in counters.items():
            # A checkpoint saved at the end of a batch counts that batch as processed but not yet as completed
            # (Lightning increments `completed` after the batch-end hooks, and its restart logic expects that lag):
            # the lag is kept as it is, only the whole micro-batches are restated.
            counters[name] = rows // world_size - (processed - count)
