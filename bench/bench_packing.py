"""Packing efficiency (non-pad tokens / all tokens) on a corpus of mixed lengths: bin-packing vs padding alone.

    python bench/bench_packing.py [--block-size 512] [--batch-size 8]

The corpus is the Python standard library's source split into blank-line separated paragraphs (a few tokens to
thousands), measured in this run with the same tokenizer for every layout:

- ``pack``: whole samples bin-packed into ``block_size`` rows (litune ``layout=pack``);
- ``pad`` to ``block_size``: one sample a row, fixed shape;
- ``pad`` dynamic: one sample a row, batches padded to their longest row (multiple of 8), in shuffled order and with
  ``group_by_length`` (rows of similar length batched together), as the collator and sampler do in training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import datasets

from litune.data.sampler import ResumableSampler
from litune.data.text import TextDataModule
from litune.data.tokenizer import TrainedBPE


def dynamic_efficiency(lengths: list[int], order: list[int], batch_size: int, block_size: int) -> float:
    """Non-pad / all tokens when rows are batched in ``order`` and padded to the longest (multiple of 8)."""
    used = padded = 0
    for i in range(0, len(order), batch_size):
        chunk = [lengths[j] for j in order[i : i + batch_size]]
        width = min(-(-max(chunk) // 8) * 8, block_size)
        used += sum(chunk)
        padded += width * len(chunk)
    return used / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-bytes", type=int, default=3_000_000)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    root = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    bpe = TrainedBPE(corpus="stdlib", vocab_size=4096, max_bytes=4_000_000, cache_dir=str(root / "tok"))

    def build(layout: str) -> TextDataModule:
        dm = TextDataModule(
            bpe,
            path="stdlib",
            max_bytes=args.max_bytes,
            sample_by="paragraph",
            layout=layout,
            document_mask=layout == "pack",
            block_size=args.block_size,
            batch_size=args.batch_size,
            val_fraction=0.0,
            cache_dir=str(root / "cache"),
        )
        dm.setup("fit")
        return dm

    packed, padded = build("pack"), build("pad")
    lengths = padded.train_set["length"]
    shuffled = list(ResumableSampler(lengths, shuffle=True, seed=0))
    grouped = list(
        ResumableSampler(
            lengths, shuffle=True, seed=0, lengths=lengths, group_by_length=True, batch_size=args.batch_size
        )
    )
    result = {
        "samples": padded.stats["samples"],
        "tokens": padded.stats["tokens"],
        "truncated_samples": padded.stats["truncated"],
        "block_size": args.block_size,
        "packed_rows": packed.stats["train"]["rows"],
        "packed_efficiency": round(packed.stats["train"]["packing_efficiency"], 4),
        "pad_to_block_efficiency": round(padded.stats["train"]["packing_efficiency"], 4),
        "pad_dynamic_shuffled_efficiency": round(
            dynamic_efficiency(lengths, shuffled, args.batch_size, args.block_size), 4
        ),
        "pad_dynamic_grouped_by_length_efficiency": round(
            dynamic_efficiency(lengths, grouped, args.batch_size, args.block_size), 4
        ),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
