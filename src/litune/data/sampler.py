"""A ``DistributedSampler`` that can resume mid-epoch and optionally groups rows of similar length.

It subclasses :class:`torch.utils.data.DistributedSampler`, so Lightning keeps it as it is (it only wraps samplers that
are not distributed ones) and calls ``set_epoch`` on it at every epoch start. The shuffle order is a pure function of
``(seed, epoch)`` (a fresh ``torch.Generator`` seeded with ``seed + epoch``, as in ``DistributedSampler``), so saving
the seed, the epoch and how many rows this rank has consumed is enough to replay the exact same batches after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from litune.models.output import IGNORE_INDEX


class ResumableSampler(DistributedSampler):
    """Distributed, shuffling, length-grouping sampler with a mid-epoch resume point.

    Each rank gets a disjoint shard: rank ``r`` takes positions ``r, r + world, r + 2*world, ...`` of the epoch's order
    (padded by repeating the first rows when the dataset does not divide evenly, unless ``drop_last``).

    Args:
        dataset: a sized dataset.
        num_replicas: number of ranks (world size).
        rank: this rank.
        shuffle: shuffle every epoch, deterministically from ``seed + epoch``.
        seed: the shuffle seed, identical on all ranks.
        drop_last: drop the tail instead of padding so every rank has the same number of rows.
        lengths: row lengths, needed for ``group_by_length``.
        group_by_length: order rows so that each batch holds rows of similar length (less padding). Rows are sorted
            by length inside shuffled mega-batches of ``50 * batch_size * num_replicas`` rows, the longest mega-batch
            first (so an out-of-memory shows at the first step), as ``transformers``' ``LengthGroupedSampler`` does.
        batch_size: the per-rank micro batch, for ``group_by_length``.
        current_epoch: returns the epoch the trainer is training (Lightning's ``trainer.current_epoch``); when given,
            it decides the order instead of ``set_epoch``. Lightning resuming from a checkpoint taken at the end of a
            run stopped by ``max_steps`` continues that epoch but calls ``set_epoch`` with the next one, and with
            worker processes the sampler is iterated before ``set_epoch`` is called at all.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
        batch_size: int = 1,
        current_epoch: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the row lengths")
        self.lengths = list(lengths) if lengths is not None else None
        self.group_by_length = group_by_length
        self.batch_size = batch_size
        self.current_epoch = current_epoch
        self._resume_epoch: int | None = None
        self._resume_skip = 0

    def resume(self, epoch: int, rows_consumed: int) -> None:
        """Make the passes over ``epoch`` skip the first ``rows_consumed`` rows of the epoch's order.

        ``rows_consumed`` counts rows over all ranks (batches * micro batch * world size), so a run can resume on a
        different number of ranks and still continue with the rows no rank has seen. Every pass over ``epoch`` skips
        them (Lightning may create and drop an iterator before the one it trains on); later epochs start from their
        beginning, since epochs only go up.
        """
        self._resume_epoch, self._resume_skip = epoch, rows_consumed
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """All rows' indices in this epoch's order, before sharding."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.group_by_length:
            assert self.lengths is not None
            mega = 50 * self.batch_size * self.num_replicas
            groups = [sorted(order[i : i + mega], key=lambda j: -self.lengths[j]) for i in range(0, n, mega)]
            longest = max(range(len(groups)), key=lambda k: self.lengths[groups[k][0]])
            groups[0], groups[longest] = groups[longest], groups[0]
            order = [j for grp in groups for j in grp]
        return order

    def __iter__(self) -> Iterator[int]:
        if self.current_epoch is not None:
            self.epoch = self.current_epoch()
        order = self.epoch_order()
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order = _pad(order, self.total_size)
        if self._resume_epoch == self.epoch and self._resume_skip:
            # Same split of the remaining rows as an uninterrupted run: rank r keeps positions r, r + world, ...
            rest = order[self._resume_skip :]
            order = _pad(rest, -(-len(rest) // self.num_replicas) * self.num_replicas) if rest else []
        return iter(order[self.rank :: self.num_replicas])


def _pad(order: list[int], size: int) -> list[int]:
    """Repeat ``order`` from its start until it has ``size`` entries (``DistributedSampler``'s padding)."""
    padding = size - len(order)
    if padding <= 0:
        return order[:size]
    return order + (order * (padding // max(len(order), 1) + 1))[:padding]


class MaskedPadding(Dataset):
    """An evaluation set padded to ``size`` rows with copies of its first rows whose labels are all ``-100``.

    With several ranks every rank must run the same number of evaluation batches (ZeRO-3 gathers parameters
    collectively in every forward); ``DistributedSampler`` evens them out by *repeating* rows, which then count twice
    in ``val/loss``. The copies here have no target token, so they weigh nothing in the token-weighted loss and
    perplexity, which are then the same on any number of ranks.

    Args:
        dataset: rows with ``input_ids`` and optionally ``labels`` (lists of ids).
        size: the padded length (at least ``len(dataset)``).
    """

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)  # type: ignore[arg-type]
        if index < n:
            return self.dataset[index]
        row = dict(self.dataset[index % n])
        targets = row.get("labels") if row.get("labels") is not None else row["input_ids"]
        row["labels"] = [IGNORE_INDEX] * len(targets)
        return row


def even_eval_shards(dataset: Dataset, rank: int, world_size: int) -> tuple[Dataset, DistributedSampler | None]:
    """The evaluation set and sampler for this rank: disjoint shards of equal length, padding rows weighing nothing.

    Returns:
        ``(dataset, None)`` on one process; otherwise the :class:`MaskedPadding` set and a non-shuffling
        ``DistributedSampler`` over it (Lightning keeps a distributed sampler as it is).
    """
    if world_size <= 1:
        return dataset, None
    n = len(dataset)  # type: ignore[arg-type]
    padded = MaskedPadding(dataset, -(-n // world_size) * world_size)
    return padded, DistributedSampler(padded, num_replicas=world_size, rank=rank, shuffle=False)


def data_rank_world(trainer: object | None) -> tuple[int, int]:
    """``(rank, ranks)`` among the processes that read different rows: the strategy's data-parallel rank and size.

    The ranks of a tensor-parallel group read the same rows, so they share one data-parallel rank (Lightning's
    ``distributed_sampler_kwargs``; the global rank and world size where the strategy has none, e.g. one device).
    """
    if trainer is None:
        return 0, 1
    kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    if kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size
