"""Several sources mixed by weight, and streaming (lazy ``IterableDataset`` with per-rank shards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from litune.data.pipeline import Source
from litune.data.stream import streaming_splits
from litune.errors import ConfigError
from litune_testing import make_dm, sentences


def _two_sources(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(json.dumps({"text": f"fox {i} {s}"}) for i, s in enumerate(sentences(200, seed=1))))
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"body": "cat " + s, "n": i}) for i, s in enumerate(sentences(200, seed=2))))
    return a, b


def test_sources_mixed_by_weight(tmp_path: Path) -> None:
    a, b = _two_sources(tmp_path)
    dm = make_dm(
        tmp_path,
        "unused",
        sources=[Source(str(a), weight=3.0), Source(str(b), weight=1.0, text_column="body")],
        layout="pad",
        block_size=128,
        val_fraction=0.0,
    )
    dm.setup("fit")
    texts = [dm.tokenizer.decode(r) for r in dm.train_set["input_ids"]]
    from_a = sum(t.startswith("fox ") for t in texts)
    from_b = sum(t.startswith("cat ") for t in texts)
    assert from_a + from_b == len(texts)
    assert from_a == 200  # "first_exhausted": the mixture stops when the heavier source runs out
    assert 0.68 < from_a / len(texts) < 0.82  # ~3:1


def test_bad_weight_and_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="weight"):
        Source(str(tmp_path), weight=0)
    with pytest.raises(ConfigError, match="does not exist"):
        make_dm(tmp_path, "unused", sources=[Source(str(tmp_path / "missing.jsonl"))])


def test_streaming_reads_lazily_and_shards_by_rank(tmp_path: Path) -> None:
    a, _ = _two_sources(tmp_path)
    dm = make_dm(tmp_path, str(a), streaming=True, layout="pad", block_size=128, val_fraction=0.1)
    dm.setup("fit")
    train = [r for batch in dm.train_dataloader() for r in batch["input_ids"].tolist()]
    val = [r for batch in dm.val_dataloader() for r in batch["input_ids"].tolist()]
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40  # held out ~10% by a seeded hash, no length needed
    assert not list(dm.cache_root.glob("data/*"))  # streaming writes no tokenized cache

    shards = [streaming_splits(dm.spec, dm.tokenizer, rank, 2)[0] for rank in (0, 1)]
    rows = [{tuple(r["input_ids"]) for r in shard} for shard in shards]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    assert len(rows[0] | rows[1]) == len(train)


def test_streaming_cannot_pack(tmp_path: Path) -> None:
    a, _ = _two_sources(tmp_path)
    with pytest.raises(ConfigError, match="'pack' needs the whole dataset"):
        make_dm(tmp_path, str(a), streaming=True, layout="pack")


def test_stream_with_unknown_columns(tmp_path: Path) -> None:
    """Hub streams may not know their columns until read: selection, renaming and tokenization stay lazy."""
    import datasets

    from litune.data.pipeline import lay_out, select_raw_columns, tokenize

    texts = sentences(30, seed=6)

    def rows():
        for i, t in enumerate(texts):
            yield {"body": t, "id": i, "meta": {"len": len(t)}}

    stream = datasets.IterableDataset.from_generator(rows)
    assert stream.column_names is None
    dm = make_dm(tmp_path, "stdlib", streaming=True, layout="concat", block_size=16)
    raw = select_raw_columns(stream, dm.spec, Source("hub/stream", text_column="body"))
    blocks, _ = lay_out(tokenize(raw, dm.spec, dm.tokenizer), dm.spec)
    out = list(blocks)
    assert set(out[0]) == {"input_ids"} and all(len(r["input_ids"]) == 16 for r in out[:-1])
    eos = dm.tokenizer.eos_token_id
    stream_ids = [t for r in out for t in r["input_ids"]]
    assert dm.tokenizer.decode(stream_ids).split(dm.tokenizer.eos_token)[:-1] == texts
    assert stream_ids.count(eos) == len(texts)
