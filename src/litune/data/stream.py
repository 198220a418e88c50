"""Streaming: the same pipeline on ``datasets.IterableDataset``, for corpora that do not fit on disk.

Nothing is cached: every rank reads its own shard (``datasets.distributed.split_dataset_by_node``) and tokenizes it on
the fly. The validation hold-out is decided per document by a seeded hash of its index, so it is deterministic and
needs no length.
"""

from __future__ import annotations

import hashlib

import datasets
from datasets.distributed import split_dataset_by_node
from transformers import PreTrainedTokenizerBase

from litune.data.pipeline import DataSpec, lay_out, load_raw, tokenize


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
        out.append(rows)
    out[0] = out[0].shuffle(seed=spec.seed, buffer_size=shuffle_buffer)
    return out[0], out[1]
