"""DeepSpeed ZeRO that runs wherever litune runs: stock Lightning on CUDA, DeepSpeed's CPU accelerator + gloo on CPU.

Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` refuses any accelerator but CUDA. DeepSpeed itself
runs on CPU when its accelerator is ``cpu`` (``DS_ACCELERATOR=cpu``) and its process group is gloo, which is what lets
CI train ZeRO-1/2/3 for real with two CPU processes. The subclass below changes only what stands in the way on CPU:

* ``setup_environment``: skip the CUDA-only check (on CUDA the stock check still runs);
* ``setup_distributed``: skip the CUDA device-index validation (CPU "devices" have no indices);
* ``root_device``: give the CPU device the local rank as index, which DeepSpeed reads as ``device_rank``.

``DS_ACCELERATOR`` must be set before ``deepspeed`` is first imported (DeepSpeed picks its accelerator once, at import),
and inherited by every rank. Importing ``deepspeed`` can happen early: jsonargparse, resolving the strategy's
signature while parsing the config, executes the ``if TYPE_CHECKING: import deepspeed`` block of Lightning's module.
So this module sets ``DS_ACCELERATOR=cpu`` when it is imported on a machine without CUDA (the only choice there; it is
what DeepSpeed's detection would pick, made explicit so that every rank agrees), and the constructor does it again
for an explicit ``accelerator="cpu"``. Lightning's launchers copy the environment to the ranks they spawn. A run on
CPU on a machine *with* CUDA must export ``DS_ACCELERATOR=cpu`` itself; the strategy says so if it was not done.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.utilities.types import LRSchedulerConfig

from litune.errors import ConfigError
from litune.strategies.atomic import atomic_directory
from litune.strategies.checkpoint import check_resume_world_size
from litune.strategies.checks import (
    DS_ACCELERATOR_ENV,
    check_deepspeed_installed,
    check_run,
    resolve_accelerator,
    select_deepspeed_accelerator,
)
from litune.strategies.optimizers import offloads_optimizer, to_deepspeed_cpu_adam

if TYPE_CHECKING:
    from collections.abc import Generator

if not torch.cuda.is_available():
    select_deepspeed_accelerator("cpu")


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, made to run on CPU too (ZeRO-1/2/3, optimizer/parameter offload).

    Takes every argument of :class:`lightning.pytorch.strategies.DeepSpeedStrategy` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config``, ...). On CUDA it behaves exactly like the stock strategy.

    Args:
        *args: forwarded to Lightning's ``DeepSpeedStrategy``.
        **kwargs: forwarded to Lightning's ``DeepSpeedStrategy``.
    """

    strategy_name = "litune_deepspeed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_deepspeed_installed()
        accelerator = kwargs.get("accelerator")
        select_deepspeed_accelerator(accelerator if isinstance(accelerator, str) else None)
        super().__init__(*args, **kwargs)

    @property
    def on_cpu(self) -> bool:
        """Whether this run's accelerator is the CPU (set by the Trainer before any hook runs)."""
        return isinstance(self.accelerator, CPUAccelerator)

    def _configure_launcher(self) -> None:
        # Runs inside Trainer construction, before any process is spawned: the last moment to fail cheaply.
        self._check_machine()
        super()._configure_launcher()

    def _check_machine(self) -> None:
        precision = getattr(self.precision_plugin, "precision", None)
        processes = len(self.parallel_devices or []) or None
        check_run(resolve_accelerator(self.accelerator), processes, precision, deepspeed=True)
        if self.on_cpu:
            from deepspeed.accelerator import get_accelerator

            if get_accelerator().device_name() != "cpu":
                raise ConfigError(
                    "trainer.accelerator",
                    f"the run is on CPU but DeepSpeed was imported with its {get_accelerator().device_name()!r} "
                    f"accelerator ({DS_ACCELERATOR_ENV}={os.environ.get(DS_ACCELERATOR_ENV)!r})",
                    f"export {DS_ACCELERATOR_ENV}=cpu before starting litune, or run on GPUs",
                )

    @property
    def root_device(self) -> torch.device:
        if self.on_cpu:
            # DeepSpeed reads `root_device.index` as the rank's device number; CPU devices have none by default.
            return torch.device("cpu", self.local_rank)
        return super().root_device

    def setup_environment(self) -> None:
        if self.on_cpu:
            # Lightning's version raises for anything but CUDA; DDP's set-up (process group, ranks) is all CPU needs.
            _LightningDDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            super().setup_distributed()
            return
        # Same as Lightning's, minus the CUDA device-index validation.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_optimizers(self) -> tuple[torch.optim.Optimizer, LRSchedulerConfig | None]:
        optimizer, scheduler_config = super()._init_optimizers()
        if offloads_optimizer(self.config):
            optimizer = to_deepspeed_cpu_adam(optimizer)
            if scheduler_config is not None:
                scheduler_config.scheduler.optimizer = optimizer
        return optimizer, scheduler_config

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """DeepSpeed rewrites a checkpoint folder in place, shard by shard: a kill mid-save would leave a folder mixing
        two steps that still looks loadable. Each rank writes into a staging folder instead, which replaces the old
        checkpoint only once every rank is done (:func:`litune.strategies.atomic.atomic_directory`)."""
        filepath = self.broadcast(filepath)
        with atomic_directory(filepath, self.is_global_zero, self.barrier) as staged:
            super().save_checkpoint(checkpoint, staged, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not (self.load_full_weights and self.zero_stage_3):
            check_resume_world_size(checkpoint_path, self.world_size)
        return super().load_checkpoint(checkpoint_path, weights_only)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """Create the model in ``configure_model`` partitioned across ranks under ZeRO-3 (``deepspeed.zero.Init``).

        Also tells ``transformers`` that ZeRO-3 is on, so ``from_pretrained`` inside ``configure_model`` loads the
        checkpoint into the partitioned parameters instead of materializing the whole model on every rank.
        """
        from litune.strategies.zero3 import hf_zero3_context

        with super().model_sharded_context(), hf_zero3_context(self.config if self.zero_stage_3 else None):
            yield
