"""The global gradient norm before clipping, under plain/DDP training and under DeepSpeed."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from litune.strategies.descriptor import describe


class GradNormMonitor(Callback):
    """Logs ``train/grad_norm``, the 2-norm of all gradients, every ``trainer.log_every_n_steps`` optimizer steps.

    With DDP the gradients are already averaged across ranks when ``on_before_optimizer_step`` runs (and unscaled under
    16-bit AMP), so every rank computes the same norm. DeepSpeed ZeRO keeps gradients in its own partitioned buffers
    (``p.grad`` is ``None``); there the engine's own global norm is read after its step, when DeepSpeed computed one
    (ZeRO-1/2, or gradient clipping configured).
    """

    def __init__(self) -> None:
        self._last_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._deepspeed = describe(trainer.strategy).deepspeed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # global_step is incremented after this optimizer step; only pay for the norm on logging steps.
        if self._deepspeed or (trainer.global_step + 1) % trainer.log_every_n_steps != 0:
            return
        norm = getattr(pl_module, "step_gradient_norm", None)  # LitLM's non-finite check computed it this step
        if norm is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if norm is not None:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not (self._deepspeed and stepped and trainer.global_step % trainer.log_every_n_steps == 0):
            return
        norm = trainer.model.get_global_grad_norm()  # trainer.model is the DeepSpeedEngine
        if norm is not None:
            pl_module.log("train/grad_norm", float(norm), on_step=True, on_epoch=False)
