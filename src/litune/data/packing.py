"""Turn tokenized samples into training rows: concatenated blocks, bin-packed blocks, or one (truncated) sample a row.

These are ``datasets.map(batched=True)`` functions: they take a batch of columns (lists of token lists) and return a
batch with a different number of rows. ``datasets`` has no packing of its own, so it is written here, on plain lists
(fast enough: a map batch is a few thousand samples and the work is linear).

With ``document_positions=True`` each row also gets ``position_ids`` that restart at 0 at every document start; the
networks build a block-diagonal causal mask from them so attention never crosses a document boundary.
"""

from __future__ import annotations

LAYOUTS = ("concat", "pack", "pad")
"""``concat``: join documents (EOS between them) and cut every ``block_size`` tokens, splitting documents.
``pack``: put whole samples (truncated to ``block_size``) into blocks without splitting them (first-fit decreasing).
``pad``: one sample a row, truncated to ``block_size``, padded in the batch."""


def _positions(lengths: list[int]) -> list[int]:
    """Position ids that restart at 0 at each document: lengths [3, 2] -> [0, 1, 2, 0, 1]."""
    return [p for n in lengths for p in range(n)]


def concat_into_blocks(batch: dict[str, list], block_size: int, document_positions: bool = False) -> dict[str, list]:
    """Concatenate the samples of a batch and cut the stream into rows of ``block_size`` tokens.

    The last, shorter row is kept (the collator pads it) so no token is dropped.

    Args:
        batch: ``input_ids`` (and optionally ``labels``): lists of token id lists, EOS already appended.
        block_size: tokens per row.
        document_positions: also emit ``position_ids`` restarting at each document start (and at each row start,
            since a document cut by a row boundary continues as a new segment).

    Returns:
        The same columns, re-cut into rows of ``block_size`` (the last one may be shorter).
    """
    columns = [c for c in ("input_ids", "labels") if c in batch]
    stream = {c: [t for sample in batch[c] for t in sample] for c in columns}
    total = len(stream["input_ids"])
    out: dict[str, list] = {c: [stream[c][i : i + block_size] for i in range(0, total, block_size)] for c in columns}
    if document_positions:
        positions = _positions([len(s) for s in batch["input_ids"]])
        out["position_ids"] = []
        for i in range(0, total, block_size):
            row = positions[i : i + block_size]
            # A document cut by the row boundary restarts at 0 in the new row (it cannot see its first part anyway).
            offset = row[0]
            first_end = next((j for j in range(1, len(row)) if row[j] == 0), len(row))
            out["position_ids"].append([p - offset for p in row[:first_end]] + row[first_end:])
    return out


def truncate_samples(batch: dict[str, list], block_size: int) -> dict[str, list]:
    """Cut every sample to ``block_size`` tokens and flag the ones that were longer (``truncated`` column)."""
    out = {c: [s[:block_size] for s in batch[c]] for c in ("input_ids", "labels") if c in batch}
    out["truncated"] = [len(s) > block_size for s in batch["input_ids"]]
    return out


def pack_samples(batch: dict[str, list], block_size: int, document_positions: bool = True) -> dict[str, list]:
    """Bin-pack whole samples into rows of at most ``block_size`` tokens (first-fit decreasing), never splitting one.

    Samples longer than ``block_size`` must have been truncated before (see :func:`truncate_samples`).

    Args:
        batch: ``input_ids`` and optionally ``labels`` (lists of token id lists, each at most ``block_size`` long).
        block_size: the row capacity.
        document_positions: emit ``position_ids`` restarting at 0 at each sample.

    Returns:
        ``input_ids``, ``labels`` when the input had them, and optionally ``position_ids``.
    """
    ids = batch["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    bins: list[list[int]] = []  # sample indices per row
    free: list[int] = []  # free space per row
    for i in order:
        n = len(ids[i])
        if n > block_size:
            raise ValueError(f"sample of {n} tokens is longer than block_size={block_size}: truncate it first")
        # First fit over open rows; rows are few (len(batch) * mean_len / block_size) so a linear scan is cheap.
        row = next((r for r, space in enumerate(free) if space >= n), None)
        if row is None:
            bins.append([i])
            free.append(block_size - n)
        else:
            bins[row].append(i)
            free[row] -= n
    out: dict[str, list] = {
        c: [[t for i in b for t in batch[c][i]] for b in bins] for c in ("input_ids", "labels") if c in batch
    }
    if document_positions:
        out["position_ids"] = [_positions([len(ids[i]) for i in b]) for b in bins]
    return out
