"""Streaming: the same pipeline on ``datasets.IterableDataset``, for corpora that do not fit on disk.

Nothing is cached: every rank reads its own shard (``datasets.distributed.split_dataset_by_node``) and tokenizes it on
the fly. The validation hold-out is decided per document by a seeded hash of its index, so it is deterministic and
needs no length.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from litune.data.pipeline import DataSpec, drop_untrainable, lay_out, load_raw, tokenize


def _held_out(index: int, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def streaming_splits(
    spec: DataSpec, tokenizer: PreTrainedTokenizerBase, rank: int, world_size: int, shuffle_buffer: int = 10_000
) -> tuple[datasets.IterableDataset, datasets.IterableDataset | None]:
    """Train and validation ``IterableDataset`` s of laid-out rows for this rank.

    Args:
        spec: the data spec (``streaming=True``).
        tokenizer: the fast tokenizer.
        rank: this process's global rank.
        world_size: number of processes; each gets a disjoint shard of the documents.
        shuffle_buffer: rows in the shuffle buffer of the training stream.
    """
    train, val = load_raw(spec)
    if val is None and spec.val_fraction > 0:
        frac, seed = spec.val_fraction, spec.seed
        val = train.filter(lambda _, i: _held_out(i, seed, frac), with_indices=True)
        train = train.filter(lambda _, i: not _held_out(i, seed, frac), with_indices=True)
    out = []
    for ds in (train, val):
        if ds is None:
            out.append(None)
            continue
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        rows, _ = lay_out(tokenize(ds, spec, tokenizer), spec)
        out.append(drop_untrainable(rows, streaming=True)[0])
    out[0] = out[0].shuffle(seed=spec.seed, buffer_size=shuffle_buffer)
    return out[0], out[1]


class SkipBatches:
    """Iterate a stream's DataLoader but drop its first ``n`` batches during ``epoch``: a stream's mid-epoch resume.

    Written by hand because ``IterableDataset.skip`` counts rows before or after the per-rank (and per-worker) split
    depending on how many shards the source has; dropping whole batches after the DataLoader is exact in every case
    (at the cost of reading the skipped rows again). Every pass during ``epoch`` skips, not only the first: Lightning
    may create (and drop) an iterator before the one it trains on.

    Args:
        loader: the stream's DataLoader.
        n: batches to drop.
        epoch: the epoch the resume point belongs to.
        current_epoch: returns the trainer's current epoch.
    """

    def __init__(self, loader: Iterable, n: int, epoch: int, current_epoch: Callable[[], int]) -> None:
        self.loader = loader
        self.n = n
        self.epoch = epoch
        self.current_epoch = current_epoch

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        return itertools.islice(it, self.n, None) if self.current_epoch() == self.epoch else it
