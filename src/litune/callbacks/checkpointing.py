"""Checkpoint cadence for long runs: every N optimizer steps *and* every M minutes, keep the last K, and the best by
a metric.

Lightning's ``ModelCheckpoint`` has each piece but lets a callback use only one trigger (``every_n_train_steps`` *or*
``train_time_interval``); its saving logic already handles both at once (it saves when either is due, and rank 0
decides the time trigger for every rank), so :class:`Checkpointing` only lifts that check. The time trigger is
agreed over the ranks once per optimizer step, inside the step's one all-reduce (:mod:`litune.callbacks.step_votes`),
instead of Lightning's broadcast of rank 0's clock on every micro-batch. Keeping the last ``K`` is
``ModelCheckpoint``'s top-k on the ``step``; the best by a metric is a second ``ModelCheckpoint``
(:class:`BestCheckpoints`), because one callback has one top-k policy.

``litune fit`` configures both as ``--checkpoint.*`` and ``--best_checkpoint.*``, with defaults for a long cluster
run: every 1000 steps and every 30 minutes (a kill loses at most 30 minutes of work; a preemption signal loses
nothing, see :mod:`litune.callbacks.preemption`), the last 3 kept plus ``last.ckpt``, and the best 1 by ``val/loss``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from litune.callbacks.step_votes import agreed_vote
from litune.errors import ConfigError

MAX_MINUTES = 1e8
"""~190 years: longer than any run, and within what ``datetime.timedelta`` can hold."""


class Checkpointing(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_train_steps`` steps and every ``every_n_minutes`` minutes, keeps
    the ``keep_last`` most recent ones, writes ``last.ckpt`` each time, and saves the last step (max_steps) or epoch.

    Args:
        every_n_train_steps: save every this many optimizer steps (``None``: no step trigger).
        every_n_minutes: save when this many minutes of training have passed since the last save (``None``: no
            time trigger). Checked after each optimizer step.
        keep_last: how many step checkpoints to keep (``-1``: all). Ignored when ``monitor`` is given: then
            ``save_top_k`` and ``mode`` rank checkpoints by that metric, as in ``ModelCheckpoint``.
        **kwargs: the other ``ModelCheckpoint`` arguments (``dirpath``, ``filename``, ``save_last``, ``monitor``, ...).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
        keep_last: int = 3,
        **kwargs: Any,
    ) -> None:
        if every_n_minutes is not None and not 0 < every_n_minutes <= MAX_MINUTES:  # NaN too
            raise ConfigError(
                "checkpoint.every_n_minutes",
                f"{every_n_minutes} is not a number of minutes in (0, {MAX_MINUTES:g}]",
                "use e.g. 30, or null for no time trigger",
            )
        if keep_last == 0 or keep_last < -1:
            raise ConfigError("checkpoint.keep_last", f"{keep_last} checkpoints", "keep at least 1, or -1 for all")
        interval = kwargs.pop("train_time_interval", None)  # every_n_minutes says the same and combines with steps
        if interval is not None and every_n_minutes is None:
            every_n_minutes = interval.total_seconds() / 60
        if kwargs.get("monitor") is None:
            kwargs.update(monitor="step", mode="max", save_top_k=keep_last)
        super().__init__(every_n_train_steps=every_n_train_steps, **kwargs)
        self.every_n_minutes = every_n_minutes
        if every_n_minutes is not None:
            self._train_time_interval = timedelta(minutes=every_n_minutes)
            if every_n_train_steps is None:
                self._every_n_epochs = 0  # as ModelCheckpoint does for a time trigger alone
        self._seen_step = -1
        self._time_trigger = self._train_time_interval  # what on_train_batch_end hides from Lightning's check

    @property
    def state_key(self) -> str:
        # Lightning keys the callback's saved state by its settings, the time interval included: keyed by the
        # configured one even while on_train_batch_end has it swapped out (a save happens inside that window). It also
        # formats every callback's key on every hook call (its profiler's label), ~30 times a step, and this key is a
        # repr of the settings: formatted again only when they change.
        return _cached_state_key(self, self._time_trigger)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # starts the clock of the time trigger
        self._seen_step = trainer.global_step

    def step_vote(self, trainer: pl.Trainer) -> bool:
        """This rank's vote: whether ``every_n_minutes`` have passed since the last save (or the start)."""
        interval, last = self._time_trigger, self._last_time_checked
        return interval is not None and last is not None and time.monotonic() - last >= interval.total_seconds()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        interval = self._time_trigger
        if interval is None or not pl_module.automatic_optimization:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        else:
            # At an optimizer-step boundary only, and agreed over the ranks (step_votes). Lightning's own check runs
            # only when the time is due, with a zero interval so that every rank saves (its broadcast then costs once
            # per save); otherwise without a time trigger, so that it neither reads the clock nor broadcasts.
            boundary, self._seen_step = trainer.global_step != self._seen_step, trainer.global_step
            due = boundary and agreed_vote(trainer, self)
            self._train_time_interval = timedelta(0) if due else None
            try:
                super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
            finally:
                self._train_time_interval = interval
        if 0 <= trainer.max_steps <= trainer.global_step:  # the last step: a run's end never depends on the cadence
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs >= 0:
            self._save_final(trainer)

    def _save_final(self, trainer: pl.Trainer) -> None:
        # Saved where a cadence save would be (not in on_train_end, where Lightning's loop already counts the epoch as
        # finished: a run resumed from there to a larger max_steps would start the next epoch).
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class BestCheckpoints(ModelCheckpoint):
    """Keep the ``save_top_k`` best checkpoints by ``monitor``, saved when validation ends (``best-step*.ckpt``).

    Does nothing while the metric is not logged (no validation configured): it never fails a run for it.

    Args:
        monitor: the metric (default ``val/loss``); ``None`` turns these checkpoints off.
        mode: ``min`` or ``max``.
        save_top_k: how many to keep.
        **kwargs: the other ``ModelCheckpoint`` arguments.
    """

    def __init__(self, monitor: str | None = "val/loss", mode: str = "min", save_top_k: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("filename", "best-step{step:06d}")
        kwargs.update(save_last=False, every_n_train_steps=None, train_time_interval=None)
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(monitor=monitor, mode=mode, save_top_k=save_top_k, **kwargs)

    @property
    def state_key(self) -> str:
        return _cached_state_key(self, self._train_time_interval)  # as Checkpointing's: formatted once

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        return  # only after validation, when the metric is fresh

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or self.monitor not in trainer.callback_metrics or trainer.sanity_checking:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def _cached_state_key(callback: ModelCheckpoint, interval: timedelta | None) -> str:
    """``ModelCheckpoint.state_key`` with ``train_time_interval=interval``, formatted once per distinct settings (by
    Lightning's own property, with the interval put in place for the call)."""
    settings = (callback.monitor, callback.mode, callback._every_n_train_steps, callback._every_n_epochs, interval)
    cached = getattr(callback, "_state_key_cache", None)
    if cached is None or cached[0] != settings:
        swapped, callback._train_time_interval = callback._train_time_interval, interval
        try:
            key = ModelCheckpoint.state_key.fget(callback)  # type: ignore[attr-defined]
        finally:
            callback._train_time_interval = swapped
        cached = callback._state_key_cache = (settings, key)
    return cached[1]
