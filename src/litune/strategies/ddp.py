"""DDP with litune's start-up checks.

Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` unchanged, except that the machine checks of
:mod:`litune.strategies.checks` run while the Trainer is being built, before any process is spawned, so a run that
cannot work here (more CPU processes than cores, more GPUs than the node has) fails at once with what to change.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy

from litune.strategies.checks import check_run, resolve_accelerator


class DDPStrategy(_LightningDDPStrategy):
    """Distributed data parallel (gloo on CPU, NCCL on CUDA); takes every argument of Lightning's ``DDPStrategy``."""

    strategy_name = "litune_ddp"

    def _configure_launcher(self) -> None:
        processes = len(self.parallel_devices or []) or None
        check_run(resolve_accelerator(self.accelerator), processes, getattr(self.precision_plugin, "precision", None))
        super()._configure_launcher()
