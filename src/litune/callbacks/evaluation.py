"""Benchmark evaluation during training: lm-evaluation-harness tasks every N steps and at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from litune.errors import ConfigError


class HarnessEval(Callback):
    """Run lm-evaluation-harness tasks on the model being trained (:func:`litune.evaluation.evaluate`).

    Under DDP, DeepSpeed ZeRO and FSDP2 every rank evaluates every document, in the same order, through the network's
    own forward: a sharded model (ZeRO-3, FSDP2) gathers its weights in the same collectives on all ranks, so no rank
    waits on another, and the numbers are those of the whole model. Rank 0 alone logs the metrics (``eval/TASK/METRIC``
    to every logger of the run, once) and writes ``eval/step-NNNNNN/eval_results.{json,md}`` into the run folder;
    all ranks then meet at a barrier.

    Args:
        tasks: task names (litune's offline ``configs/eval/`` tasks run without a network).
        every_n_steps: evaluate after every N optimizer steps (None: only at the start/end).
        at_start: evaluate the model before training too (the "before" of a fine-tune).
        at_end: evaluate after the last step.
        limit: at most this many documents per task.
        num_fewshot: few-shot examples per prompt.
        batch_size: documents per forward.
        include: extra folders of task YAML.
    """

    def __init__(
        self,
        tasks: list[str],
        every_n_steps: int | None = None,
        at_start: bool = False,
        at_end: bool = True,
        limit: int | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        include: list[str] | None = None,
    ) -> None:
        if not tasks:
            raise ConfigError("HarnessEval.tasks", "no task given", "e.g. tasks: [litune_python_mc]")
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError("HarnessEval.every_n_steps", f"{every_n_steps} is not positive", "use 1 or more, or null")
        self.tasks = list(tasks)
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.at_end = at_end
        self.options = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "include": include}
        self._last_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from litune.evaluation import task_manager

        task_manager(self.tasks, self.options["include"])  # an unknown task fails now, not after hours of training

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_start:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Evaluate now (all ranks), log and write on rank 0; returns the flat metrics."""
        from litune.evaluation import evaluate, metrics, write_results

        step = trainer.global_step
        self._last_step = step
        results = evaluate(pl_module.network, pl_module.tokenizer, self.tasks, **self.options)  # type: ignore[arg-type]
        flat = metrics(results)
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / "eval" / f"step-{step:06d}"
            write_results(folder, results, step)
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=max(step - 1, 0))  # Lightning logs the k-th step's metrics at k - 1
                log_artifact = getattr(logger, "log_artifact", None)
                if callable(log_artifact):
                    log_artifact(folder, f"eval/step-{step:06d}")
        trainer.strategy.barrier("litune-harness-eval")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return flat
