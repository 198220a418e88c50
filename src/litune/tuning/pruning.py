"""Early stopping of a sweep trial whose validation metric is worse than the others' at the same step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

SQLITE_ENGINE = {"connect_args": {"timeout": 120}}
"""SQLAlchemy settings of every connection to a sweep's SQLite study: the sweep's heartbeat thread and its trials write
into one file, and on a busy machine a writer can wait longer than sqlite3's default 5 s for the lock ("database is
locked"), which would fail a healthy trial."""

TRIAL_FILE = "trial.json"
"""Written into the trial's run folder: its number, the last reported value and whether it was pruned."""


def make_pruner(name: str, startup_trials: int, warmup_steps: int) -> Any:
    """The Optuna pruner of a sweep: ``median`` (``optuna.pruners.MedianPruner``) or ``none``.

    What MedianPruner compares, at a step where this trial reported a value: the *best* value this trial has reported
    so far (lowest when minimizing, at any step up to now) against the median of the values that the *completed*
    trials reported at this same step; it prunes when the best is worse. Pruned, failed and still-running trials are
    not in the median, nor are completed ones that reported nothing at this step (with none, nothing is pruned). It
    never prunes before ``startup_trials`` trials completed or at a step below ``warmup_steps``; a non-finite best
    value is always pruned.
    """
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)


class SweepPruning(Callback):
    """Reports each validation's metric to the trial's Optuna study and stops the run when the pruner says so.

    ``litune sweep`` adds this callback to every trial's ``litune fit`` (by class path, on the command line). The
    study lives in a SQLite file shared by the sweep and its trials, so the pruner sees every trial of the sweep; it
    compares this trial's best value so far with the median of the completed trials at the same step (see
    :func:`make_pruner`: trials still running beside it do not count until they complete).

    Args:
        storage: the study's storage URL (``sqlite:///.../sweep.db``).
        study_name: the study in that storage.
        trial_number: this trial's number in the study.
        metric: the logged metric to report, e.g. ``val/loss``.
        pruner: ``median`` or ``none``; the storage keeps no pruner, so the sweep passes its settings here.
        startup_trials: trials that must finish before any is pruned.
        warmup_steps: optimizer steps before this trial can be pruned.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_number: int,
        metric: str = "val/loss",
        pruner: str = "median",
        startup_trials: int = 2,
        warmup_steps: int = 0,
    ) -> None:
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.metric = metric
        self.pruner = pruner
        self.startup_trials = startup_trials
        self.warmup_steps = warmup_steps
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            study = optuna.load_study(
                study_name=self.study_name,
                storage=optuna.storages.RDBStorage(self.storage, engine_kwargs=SQLITE_ENGINE),
                pruner=make_pruner(self.pruner, self.startup_trials, self.warmup_steps),
            )
            trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == self.trial_number)
            self._trial = optuna.trial.Trial(study, trial_id)
        return self._trial

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._optuna_trial().set_user_attr("run_dir", str(trainer.default_root_dir))
            self._write(trainer, {"state": "running"})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.metric not in trainer.callback_metrics:
            if trainer.is_global_zero:  # the sweep names the metrics that do exist when this one never comes
                self._write(trainer, {"logged": sorted(trainer.callback_metrics)})
            return
        value = float(trainer.callback_metrics[self.metric])
        prune = False
        if trainer.is_global_zero:
            trial = self._optuna_trial()
            step = trainer.global_step
            if math.isfinite(value):
                trial.report(value, step)
            if trainer.state.fn == "fit":  # a step-0 validation before fit is reported, never pruned on
                prune = (not math.isfinite(value)) or trial.should_prune()
            state = "pruned" if prune else "running"
            self._write(trainer, {"state": state, "step": step, "value": value})
        # Every rank must stop together: rank 0 asked the study, the others follow its answer.
        prune = bool(trainer.strategy.broadcast(torch.tensor(prune), src=0))
        if prune:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            record = self._read(trainer)
            if record.get("state") != "pruned":
                record["state"] = "finished"
            record["logged"] = sorted({*record.get("logged", []), *trainer.callback_metrics})
            self._write(trainer, record)

    def _path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / TRIAL_FILE

    def _read(self, trainer: pl.Trainer) -> dict[str, Any]:
        path = self._path(trainer)
        return json.loads(path.read_text()) if path.exists() else {}

    def _write(self, trainer: pl.Trainer, update: dict[str, Any]) -> None:
        record = {**self._read(trainer), "trial": self.trial_number, "metric": self.metric, **update}
        self._path(trainer).write_text(json.dumps(record, indent=1))
