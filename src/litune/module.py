"""The LightningModule ("system"): composes an injected network, its optimizer and schedule, loss and metrics.

The network computes logits and loss (see :mod:`litune.models.output`); this module only wires them into Lightning:
logging, perplexity, optimizer and scheduler. It has no ``if model_type == ...`` branches: every network has the
same interface.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.text import Perplexity

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX, LMOutput
from litune.optim import LRSchedule, param_groups
from litune.tokenizer import TokenizerSource, load_tokenizer


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)


class LitLM(L.LightningModule):
    """Trains any litune network as a language model.

    Args:
        network: an ``nn.Module`` with litune's interface: ``forward(input_ids, attention_mask=None, labels=None)``
            returning :class:`~litune.models.output.LMOutput`.
        tokenizer: where the tokenizer comes from (hub id, local folder, or a trained BPE). The CLI links it to the
            data module; it is kept here so a checkpoint knows how to decode its own outputs.
        optimizer: a callable that builds the optimizer from parameter groups, e.g. ``torch.optim.AdamW`` with its
            ``init_args`` (``lr``, ``weight_decay``, ``betas``) in the config.
        lr_schedule: warmup and decay, stepped per optimizer step.
    """

    def __init__(
        self,
        network: nn.Module,
        tokenizer: TokenizerSource | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_schedule: LRSchedule | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Outside the CLI (load_from_checkpoint, Python use) the network arrives built; it is dropped just below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("network"), nn.Module):
            # Built in Python rather than by the CLI: the module itself is saved in the state dict, not in hparams;
            # pass `network=` to load_from_checkpoint.
            self._hparams.pop("network")
            self._hparams_initial.pop("network", None)
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule or LRSchedule()
        self._check_optimizer()
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        if self.tokenizer is not None and hasattr(network, "vocab_size") and len(self.tokenizer) > network.vocab_size:
            raise ConfigError(
                "model.network.init_args.vocab_size",
                f"the tokenizer has {len(self.tokenizer)} tokens but the network's vocabulary has {network.vocab_size}",
                f"set the network's vocab_size to at least {len(self.tokenizer)} or use the matching tokenizer",
            )
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def _check_optimizer(self) -> None:
        """Build the optimizer once on a probe parameter, so a bad learning rate fails now, not after spawning."""
        try:
            probe = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as err:
            raise ConfigError("model.optimizer.init_args", str(err), "fix the optimizer's init_args") from None
        lr = probe.param_groups[0]["lr"]
        if not lr > 0:
            raise ConfigError(
                "model.optimizer.init_args.lr",
                f"invalid learning rate {lr}: it must be positive",
                "use a positive lr such as 3e-4",
            )

    def forward(self, **batch: torch.Tensor) -> LMOutput:
        return self.network(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.network(**batch)
        # Per batch, perplexity is exactly exp(mean token loss); a second log-softmax over [B, T, V] would cost memory.
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/ppl", out.loss.detach().exp())
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> LMOutput:
        return self._eval_step(batch, "val", self.val_ppl)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> LMOutput:
        return self._eval_step(batch, "test", self.test_ppl)

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, ppl: Perplexity) -> LMOutput:
        out = self.network(**batch)
        n_tokens = (out.targets != IGNORE_INDEX).sum()
        # Token-weighted mean over the epoch, matching what perplexity aggregates.
        self.log(f"{stage}/loss", out.loss, batch_size=int(n_tokens), sync_dist=True)
        ppl.update(out.logits.float(), out.targets)
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")
        # Returned so that metric callbacks (e.g. callbacks.token_accuracy) reuse the logits instead of re-running.
        return out

    def on_validation_epoch_end(self) -> None:
        self._last_val_step = self.global_step  # lets the CLI skip a redundant final validation

    def configure_model(self) -> None:
        # Networks that defer creating their weights (litune.models.DeferredHFCausalLM) create them here:
        # Lightning runs this inside the strategy's sharded context (deepspeed.zero.Init under ZeRO-3).
        build = getattr(self.network, "configure_model", None)
        if callable(build):
            build()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(param_groups(self.network))
        scheduler = self.lr_schedule.build(optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
