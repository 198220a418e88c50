"""Tokenization throughput of ``litune prepare`` against a plain ``datasets.map`` with the same tokenizer, and the
speedup of a second ``fit``/``setup`` that finds the tokenized cache. Both measured in this run, on the same corpus.

    python bench/bench_tokenize.py [--max-bytes 8000000] [--num-proc 1]

The corpus is the Python standard library's source (offline), one document per file. The baseline is what a user
would write without litune: ``load_dataset("text", sample_by="document")`` then ``.map(tokenizer, batched=True)``
(``load_from_cache_file=False`` so that ``datasets``' own fingerprint cache cannot make it look free). ``litune
prepare`` does more work on top (EOS, concatenation into blocks, held-out split, statistics, ``save_to_disk``), so a
ratio near 1 means that extra work is cheap.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow.compute as pc

from litune.data.stdlib import stdlib_python_files
from litune.data.text import TextDataModule
from litune.data.tokenizer import TrainedBPE


def plain_map(files: list[Path], tokenizer, cache_dir: str, num_proc: int | None) -> tuple[int, float]:
    """Tokens and seconds for load + batched map, the baseline."""
    start = time.perf_counter()
    ds = datasets.load_dataset(
        "text",
        data_files=[str(f) for f in files],
        sample_by="document",
        split="train",
        cache_dir=cache_dir,
        keep_linebreaks=True,
    )
    ids = ds.map(
        lambda b: tokenizer(b["text"], return_attention_mask=False),
        batched=True,
        remove_columns=["text"],
        num_proc=num_proc,
        load_from_cache_file=False,
    )
    tokens = pc.sum(pc.list_value_length(ids.data.column("input_ids"))).as_py()  # counted in Arrow, not Python
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=8_000_000)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    datasets.disable_progress_bars()

    root = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    bpe = TrainedBPE(corpus="stdlib", vocab_size=4096, max_bytes=4_000_000, cache_dir=str(root / "tok"))
    tokenizer = bpe.load()  # trained once, outside the timings
    files = stdlib_python_files(args.max_bytes)
    mbytes = sum(f.stat().st_size for f in files) / 1e6

    def module(name: str) -> TextDataModule:
        return TextDataModule(
            bpe,
            path="stdlib",
            max_bytes=args.max_bytes,
            block_size=args.block_size,
            num_proc=args.num_proc,
            cache_dir=str(root / name),
        )

    # Interleaved repeats, best of each: the machine is shared, so single timings are noisy.
    base_s = prepare_s = float("inf")
    for r in range(args.repeats):
        base_tokens, seconds = plain_map(files, tokenizer, str(root / f"plain{r}"), args.num_proc)
        base_s = min(base_s, seconds)
        first = module(f"litune{r}")
        start = time.perf_counter()
        first.prepare_data()
        first.setup("fit")
        prepare_s = min(prepare_s, time.perf_counter() - start)
    second = module(f"litune{args.repeats - 1}")
    start = time.perf_counter()
    second.prepare_data()
    second.setup("fit")
    hit_s = time.perf_counter() - start
    assert first.cache_hit is False and second.cache_hit is True

    tokens = first.stats["tokens"]
    result = {
        "corpus_mb": round(mbytes, 2),
        "files": len(files),
        "baseline_tokens": base_tokens,
        "litune_tokens": tokens,  # baseline + one EOS per document
        "baseline_map_s": round(base_s, 2),
        "baseline_tokens_per_s": round(base_tokens / base_s),
        "litune_prepare_s": round(prepare_s, 2),
        "litune_tokens_per_s": round(tokens / prepare_s),
        "throughput_ratio_litune_vs_map": round((tokens / prepare_s) / (base_tokens / base_s), 3),
        "cache_hit_setup_s": round(hit_s, 3),
        "cache_hit_speedup": round(prepare_s / hit_s, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
