"""Exact resume: a run restored from a checkpoint continues with the random numbers it would have drawn.

Lightning's checkpoints hold the model, optimizer, schedulers, loop progress (hence the logger step and the position
inside the accumulation window, which is always 0 at a checkpoint since litune saves at optimizer-step boundaries), the
data module's sampler position (:meth:`litune.data.text.TextDataModule.state_dict`) and every callback's state
(throughput counters). What they lack is the random-number state: with dropout on, a resumed run draws different
masks than the uninterrupted run would have, and its losses drift. Lightning's ``_collect_rng_states`` (Fabric uses it)
reads python, numpy and torch's states but Lightning's Trainer never saves them, so this callback does, per rank.

Where the state is taken matters. Between two optimizer steps an uninterrupted run may draw random numbers that a
resumed run does not (creating the validation or a new epoch's DataLoader iterator draws a base seed from torch's
generator), and a resumed run draws some that the uninterrupted one did not (its own DataLoader iterator). So the state
is snapshotted right after every optimizer step, and put back right before the next training batch whenever something
that may draw ran in between: a checkpoint save, validation, the end of an epoch (the next iterator's creation). So
those never change the training's random numbers, and a checkpoint saved at step ``k`` carries exactly the snapshot the
uninterrupted run continues from. Between other steps nothing is put back: whatever runs there (a callback that
samples) runs alike in the uninterrupted and the resumed run. Cost: one read of the states per optimizer step (~45 µs,
most of it numpy's), and a write only after such events.

On resume the callback also drops from ``metrics.csv`` the rows the killed attempt logged after the checkpoint
(they are logged again), so the file has one row per step; and it flushes the loggers right after the step whose
checkpoint was saved has logged its metrics, so those rows survive a kill (one gap is left: a SIGKILL between a save
and the next batch loses the saved step's own row).
"""

from __future__ import annotations

import csv
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from litune.lightning_private import batches_that_stepped, restore_rng_states


def rng_states(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random-number states: python, numpy, torch CPU and (when ``device`` is CUDA) that device's.

    Only this rank's own CUDA device is read: ``torch.cuda.get_rng_state_all`` would touch every visible GPU. Only
    tensors, numbers and strings, so that checkpoints load with ``torch.load(weights_only=True)``.
    """
    return _saveable(_read_rng_states(device))


def _read_rng_states(device: torch.device | None) -> dict[str, Any]:
    """The states as the generators give them (numpy's as its own tuple): what a per-step snapshot keeps."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        states["torch.cuda.device"] = (device.index, torch.cuda.get_rng_state(device))
    return states


def _saveable(states: dict[str, Any]) -> dict[str, Any]:
    """:func:`_read_rng_states`' states with numpy's as tensors and plain numbers (``weights_only`` loading)."""
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {**states, "numpy": numpy_state}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` (or :func:`_read_rng_states`) returned."""
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    numpy_state = (kind, keys, pos, has_gauss, gauss)
    restore_rng_states({"torch": states["torch"], "python": states["python"], "numpy": numpy_state})
    if "torch.cuda.device" in states and torch.cuda.is_available():
        index, state = states["torch.cuda.device"]
        torch.cuda.set_rng_state(state, index)


class ExactResume(Callback):
    """Saves every rank's random-number states in checkpoints and restores them on resume; de-duplicates metrics.csv.

    Added to every ``litune fit`` by the CLI. The checkpoint holds a list with one entry per global rank (gathered
    with one ``all_gather_object`` per save). Resuming on a different number of ranks keeps the fresh states of the
    ranks the checkpoint has no entry for and says so.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_step = -1
        self._restore: dict[str, Any] | None = None
        self._restore_snapshot = False  # something that may draw random numbers ran since the snapshot
        self._seen_step = -1
        self._flush_loggers = False
        self._resumed = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _device(self) -> torch.device | None:
        return self._trainer.strategy.root_device if self._trainer is not None else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._resumed = trainer.global_step > 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._resumed:
            self._resumed = False
            if trainer.is_global_zero:
                # The logger step this run's rows start at (known only now: Lightning's loop advances it after
                # on_train_start). Rows a killed attempt wrote at or after it are stale: this run logs them again.
                drop_csv_rows_from(trainer, batches_that_stepped(trainer))
        if self._restore is None and self._restore_snapshot and self._snapshot is not None:
            self._restore = self._snapshot
        if self._restore is not None:
            set_rng_states(self._restore)
            self._restore = None
        self._restore_snapshot = False
        if self._flush_loggers:
            # Lightning logs a step's metrics after the step's checkpoint is saved, and the CSV logger writes its rows
            # every 100 steps: without this, a kill before the next flush loses the rows up to the checkpoint, which
            # the resumed run does not log again.
            self._flush_loggers = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._seen_step:  # an optimizer step just finished (not inside accumulation)
            self._seen_step = trainer.global_step
            self._snapshot = _read_rng_states(self._device())
            self._snapshot_step = trainer.global_step
            self._restore_snapshot = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_snapshot = True  # its iterator draws a seed, and the model may sample

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_snapshot = True  # the next epoch's iterator draws a seed (a resumed run draws its own)

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is assembled (trainer.save_checkpoint runs on all ranks).
        self._flush_loggers = True
        self._restore_snapshot = True  # the resumed run continues from the snapshot: so does this one
        trainer = self._trainer
        if trainer is not None and self._snapshot_step == trainer.global_step and self._snapshot is not None:
            mine = _saveable(self._snapshot)
        else:  # a save outside the training loop (e.g. before the first step)
            mine = rng_states(self._device())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        return {"rng_states": everyone}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("rng_states") or []
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank < len(states):
            self._restore = states[rank]
        else:
            rank_zero_warn(
                f"the checkpoint has random-number states for {len(states)} processes, this run has more: the extra "
                "processes continue with fresh random numbers (the run is no longer an exact continuation)"
            )


def drop_csv_rows_from(trainer: pl.Trainer, step: int) -> None:
    """Remove the rows with ``step >= step`` from every CSV logger's ``metrics.csv`` (a killed attempt's tail)."""
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = logger.experiment.metrics_file_path
        fs = logger.experiment._fs
        if not fs.isfile(path):
            continue
        with fs.open(path, "r", newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if not (r[col] and float(r[col]) >= step)]
        if len(kept) != len(rows):
            with fs.open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)
