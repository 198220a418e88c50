"""Progress: Lightning's tqdm bar on a terminal, plain periodic lines when stdout is a file (SLURM logs, CI).

A redrawn bar written to a file becomes thousands of carriage-return fragments; a job log wants one readable line
every N steps with the step, the metrics shown in the bar (loss, tokens/s), elapsed time and ETA.

The training loss and tokens/s are logged without Lightning's ``prog_bar=True``: Lightning turns every progress-bar
metric into a Python number at the end of *every* batch (``.item()``, which waits for a GPU), although they change
only on logging steps. The bar reads them here instead, once per new logged value.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

from litune.errors import ConfigError


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class LituneProgressBar(TQDMProgressBar):
    """A tqdm progress bar (loss, tokens/s, ETA) on a terminal, and plain lines otherwise.

    Args:
        plain: ``True`` for lines, ``False`` for the bar, ``None`` to choose by whether stdout is a terminal.
        every_n_steps: in plain mode, print one line every this many optimizer steps (and after each validation);
            ``None``: every ``trainer.log_every_n_steps``, when the logged metrics are fresh.
        refresh_rate: in bar mode, redraw every this many batches.
    """

    def __init__(self, plain: bool | None = None, every_n_steps: int | None = None, refresh_rate: int = 1) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(
                "trainer.callbacks[LituneProgressBar].init_args.every_n_steps",
                f"{every_n_steps} is less than 1",
                "use a positive number",
            )
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.every_n_steps = every_n_steps
        # refresh_rate=0 disables the tqdm bars themselves; the lines below are printed instead.
        super().__init__(refresh_rate=0 if self.plain else refresh_rate)
        self._line_enabled = True
        self._shown: dict[str, tuple[Any, float]] = {}  # key -> (logged tensor, its value), read once per log

    def disable(self) -> None:
        super().disable()
        self._line_enabled = False

    def enable(self) -> None:
        super().enable()
        self._line_enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0 = time.perf_counter()
        self._first_step = self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        stepped, self._last_step = step != self._last_step, step
        every = self.every_n_steps or trainer.log_every_n_steps
        if self.plain and self._line_enabled and stepped and step % every == 0:
            self._line(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.plain and self._line_enabled and not trainer.sanity_checking and hasattr(self, "_t0"):
            self._line(trainer, pl_module, prefix="validation ")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's progress-bar metrics, plus the step metrics of :func:`step_metrics_shown`."""
        metrics = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        for key in step_metrics_shown(trainer):
            value = logged.get(key)
            if value is None:
                continue
            if key not in self._shown or self._shown[key][0] is not value:  # a new value was logged: read it once
                self._shown[key] = (value, float(value))
            metrics[key] = self._shown[key][1]
        return metrics

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str = "") -> None:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        elapsed = time.perf_counter() - self._t0
        done = step - self._first_step
        parts = [f"{prefix}step {step}/{total}", f"epoch {trainer.current_epoch}"]
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        parts += [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        if done > 0 and total != float("inf"):
            parts.append(f"eta {_clock(elapsed / done * (total - step))}")
        print(" | ".join(parts), flush=True)


def step_metrics_shown(trainer: pl.Trainer) -> list[str]:
    """The training metrics the bar shows: the loss, and tokens/s when a ``ThroughputMonitor(prog_bar=True)`` runs."""
    from litune.callbacks.throughput import ThroughputMonitor

    keys = ["train/loss"]
    if any(isinstance(c, ThroughputMonitor) and c.prog_bar for c in trainer.callbacks):  # type: ignore[attr-defined]
        keys.append("perf/tokens_per_sec")
    return keys
