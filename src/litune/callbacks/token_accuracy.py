"""Token accuracy (share of target tokens predicted right by argmax) for validation and test, via torchmetrics.

A callback rather than a LitLM change because perplexity is what every run needs and accuracy is what a seq2seq task
(or any task with one right answer per token) needs: add it in YAML where it means something::

    trainer:
      callbacks:
        - class_path: litune.callbacks.token_accuracy.TokenAccuracy
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from litune.models.output import IGNORE_INDEX, LMOutput


class TokenAccuracy(L.Callback):
    """Logs ``val/acc`` and ``test/acc``: teacher-forced next-token accuracy over the non-ignored targets.

    The metric accumulates over the whole epoch (micro average, every token weighs the same) and synchronises across
    processes in ``compute()``. It uses the :class:`~litune.models.output.LMOutput` that ``validation_step`` returns;
    when the step returns nothing, the batch is run through the network once more (no gradient) to get the logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, MulticlassAccuracy] = {}

    def _metric(self, stage: str, pl_module: L.LightningModule) -> MulticlassAccuracy:
        if stage not in self.metrics:
            vocab = pl_module.network.vocab_size
            self.metrics[stage] = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX)
        return self.metrics[stage].to(pl_module.device)

    def _update(self, stage: str, pl_module: L.LightningModule, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        if not isinstance(outputs, LMOutput):
            with torch.no_grad():
                outputs = pl_module.network(**batch)
        preds = outputs.logits.argmax(dim=-1)  # [B, T]
        self._metric(stage, pl_module).update(preds.reshape(-1), outputs.targets.reshape(-1))

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        metric = self.metrics.get(stage)
        if metric is None or not metric.update_called:
            return
        pl_module.log(f"{stage}/acc", metric.compute(), prog_bar=stage == "val")
        metric.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("val", pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("val", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log("test", pl_module)
