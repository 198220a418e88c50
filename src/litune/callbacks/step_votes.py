"""Decisions that every rank takes alike at an optimizer-step boundary, agreed in one all-reduce per step.

Three things must be decided the same on every rank after a step, or the ranks would hang in different collectives:
whether to skip the step (a NaN/Inf loss or gradient norm on some rank, :meth:`litune.module.LitLM._step_is_finite`),
whether to stop for a preemption signal (:class:`~litune.callbacks.preemption.Preemption`), and whether the time-based
checkpoint is due (:class:`~litune.callbacks.checkpointing.Checkpointing`). Each used to agree on its own: an
all-reduce and a host read for the skip decision, another for the preemption flag, and Lightning's ``ModelCheckpoint``
broadcast rank 0's clock decision as a pickled object on every micro-batch. On a GPU each read makes the host wait
for the device's queue.

Here a callback with a ``step_vote(trainer) -> bool`` method (its local, host-side answer) is a *voter*. LitLM's skip
decision all-reduces its non-finite flag together with every voter's vote (:func:`agree`): one collective and one
host read per step for all of them. A voter asks for the agreed answer at the step boundary (:func:`agreed_vote`);
when no skip decision ran in this step (DeepSpeed's engine decides on its own, a module other than LitLM) the first
voter to ask makes one all-reduce for all voters. A vote is summed over ranks: the agreed answer is "some rank said
yes". On one process nothing is reduced and a vote is its own answer.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Protocol

import lightning.pytorch as pl
import torch

from litune.strategies.collectives import distributed, host_to_device, sum_over_ranks


class StepVoter(Protocol):
    """A callback that takes part in the per-step agreement."""

    def step_vote(self, trainer: pl.Trainer) -> bool:
        """This rank's answer, read on the host (no device value)."""
        ...


_AGREED: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
"""voter -> (micro-batch it was agreed at, agreed answer)."""


def voters(trainer: pl.Trainer) -> list[StepVoter]:
    """The trainer's callbacks that vote, in callback order (the same on every rank)."""
    return [cb for cb in trainer.callbacks if callable(getattr(cb, "step_vote", None))]


def _micro_batch(trainer: pl.Trainer) -> int:
    """The micro-batch being trained (counted from the start of the fit): the same from a step's optimizer step to
    its ``on_train_batch_end``."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.ready


def _votes(trainer: pl.Trainer, voting: list[StepVoter], device: torch.device) -> torch.Tensor:
    """``[V]`` float64: the voters' local answers, copied to ``device`` without waiting for its queue."""
    return host_to_device([float(v.step_vote(trainer)) for v in voting], device, dtype=torch.float64)


def _store(trainer: pl.Trainer, voting: list[StepVoter], sums: list[float]) -> None:
    batch = _micro_batch(trainer)
    for voter, total in zip(voting, sums, strict=True):
        _AGREED[voter] = (batch, total > 0)


def agree(trainer: pl.Trainer, checked: torch.Tensor) -> bool:
    """All-reduce ``checked`` together with every voter's vote: one collective, one host read.

    Args:
        trainer: the running trainer (its strategy reduces).
        checked: 0-d float tensor on the step's device, finite exactly when this rank's checks passed (e.g. the
            step's loss plus its gradient norm).

    Returns:
        Whether ``checked`` is finite on every rank (a sum over ranks in float64 is finite exactly when every term
        is). The voters' agreed answers are kept for :func:`agreed_vote`.
    """
    voting = voters(trainer) if distributed(trainer) else []
    # A copy: the in-place all-reduce leaves ``checked`` as it was.
    local = checked.reshape(1).to(torch.float64, copy=True)
    if voting:
        local = torch.cat([local, _votes(trainer, voting, local.device)])
    sums = sum_over_ranks(trainer, local).tolist()  # the step's one read of a device value
    _store(trainer, voting, sums[1:])
    return math.isfinite(sums[0])


def agreed_vote(trainer: pl.Trainer, voter: StepVoter) -> bool:
    """``voter``'s answer agreed over all ranks for the current step: true when some rank voted yes.

    Call it at a step boundary (``on_train_batch_end`` after the optimizer stepped), on every rank.
    """
    if not distributed(trainer):
        return voter.step_vote(trainer)
    agreed = _AGREED.get(voter)
    if agreed is not None and agreed[0] == _micro_batch(trainer):
        return agreed[1]
    # No skip decision carried the votes in this step (DeepSpeed, another LightningModule): one reduce for all voters.
    voting = voters(trainer)
    sums = sum_over_ranks(trainer, _votes(trainer, voting, trainer.strategy.root_device)).tolist()
    _store(trainer, voting, sums)
    return _AGREED[voter][1]
