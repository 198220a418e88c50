"""TextDataModule on real local files with a real (tiny, locally trained) BPE tokenizer: sources, formats, batches,
validation split, cache, and the bad inputs of issue 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from litune.data.text import TextDataModule
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune_testing import make_dm, sentences


@pytest.fixture
def txt(tmp_path: Path) -> Path:
    f = tmp_path / "docs.txt"
    f.write_text("\n".join(sentences(120)))
    return f


def test_text_batches_follow_the_contract(tmp_path: Path, txt: Path) -> None:
    dm = make_dm(tmp_path, str(txt), sample_by="line", block_size=32)
    dm.setup("fit")
    assert dm.block_size == 32
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 32)
    # concat layout: full blocks, labels are the inputs (the network shifts)
    assert torch.equal(batch["labels"], batch["input_ids"])
    # the EOS between documents is a real, trained token even though it is also the pad token
    assert tok.pad_token_id == tok.eos_token_id
    assert (batch["input_ids"] == tok.eos_token_id).any() and (batch["labels"] == tok.eos_token_id).any()
    # the stream decodes back to the documents, separated by EOS
    rows = [dm.train_set[i]["input_ids"] for i in range(len(dm.train_set))]
    assert all(len(r) == 32 for r in rows[:-1]) and 0 < len(rows[-1]) <= 32


def test_padding_is_masked_by_attention_mask_not_token_id(tmp_path: Path, txt: Path) -> None:
    dm = make_dm(tmp_path, str(txt), sample_by="line", layout="pad", block_size=64, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert batch["input_ids"].shape[1] % 8 == 0 and not mask.all()
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    # each row ends in its (trained) EOS, which has the same id as the padding that follows it
    eos = dm.tokenizer.eos_token_id
    for row, m in zip(batch["labels"], mask, strict=True):
        assert row[m.sum() - 1] == eos


def test_validation_split_is_held_out_and_deterministic(tmp_path: Path, txt: Path) -> None:
    a = make_dm(tmp_path, str(txt), sample_by="line", layout="pad", val_fraction=0.1, seed=3)
    a.setup("fit")
    b = make_dm(tmp_path / "other", str(txt), sample_by="line", layout="pad", val_fraction=0.1, seed=3)
    b.setup("fit")
    c = make_dm(tmp_path / "c", str(txt), sample_by="line", layout="pad", val_fraction=0.1, seed=4)
    c.setup("fit")
    assert len(a.val_set) == 12 and len(a.train_set) == 108
    val_a = [tuple(r) for r in a.val_set["input_ids"]]
    assert val_a == [tuple(r) for r in b.val_set["input_ids"]]  # same seed, built from scratch elsewhere
    assert val_a != [tuple(r) for r in c.val_set["input_ids"]]  # another seed
    assert not set(val_a) & {tuple(r) for r in a.train_set["input_ids"]}  # no document in both


def test_single_document_falls_back_to_held_out_rows(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text(" ".join(sentences(100)))
    dm = make_dm(tmp_path, str(f), val_fraction=0.1)  # sample_by=document: one sample
    dm.setup("fit")
    assert dm.stats["samples"] == 1
    n = len(dm.train_set) + len(dm.val_set)
    assert len(dm.val_set) == round(n * 0.1) >= 1


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_structured_local_files(tmp_path: Path, ext: str) -> None:
    import datasets

    texts = sentences(40)
    ds = datasets.Dataset.from_dict({"body": texts, "id": list(range(40))})
    f = tmp_path / f"d.{ext}"
    {
        "jsonl": lambda: ds.to_json(f, lines=True),
        "json": lambda: ds.to_json(f, lines=True),
        "csv": lambda: ds.to_csv(f),
        "parquet": lambda: ds.to_parquet(f),
    }[ext]()
    dm = make_dm(tmp_path, str(f), text_column="body", layout="pad", val_fraction=0.0, block_size=512)
    dm.setup("fit")
    tok = dm.tokenizer
    decoded = sorted(tok.decode(r[:-1]) for r in dm.train_set["input_ids"])  # [:-1]: the EOS
    assert decoded == sorted(texts)
    assert dm.val_dataloader() == []


def test_folder_and_glob_sources(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(5):
        (d / f"f{i}.txt").write_text(" ".join(sentences(3, seed=i)))
    folder = make_dm(tmp_path, str(d), val_fraction=0.2, layout="pad", block_size=256)
    folder.setup("fit")
    assert folder.stats["samples"] == 5 and len(folder.val_set) == 1
    glob = make_dm(tmp_path, str(d / "f[0-2].txt"), val_fraction=0.0, layout="pad", block_size=256)
    glob.setup("fit")
    assert glob.stats["samples"] == 3


def test_stdlib_source(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, "stdlib", max_bytes=60_000, block_size=64)
    dm.setup("fit")
    assert dm.stats["samples"] >= 3 and len(dm.val_set) >= 1
    text = dm.tokenizer.decode(dm.train_set[0]["input_ids"])
    assert text.strip()


# --- bad input ------------------------------------------------------------------------------------------------------


def test_missing_path_is_a_config_error_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as err:
        TextDataModule("gpt2", path=str(tmp_path / "nope.jsonl"))
    assert err.value.field == "data.init_args.path"
    with pytest.raises(ConfigError, match="matches no file"):
        TextDataModule("gpt2", path=str(tmp_path / "*.txt"))


def test_empty_file_and_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        TextDataModule("gpt2", path=str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    dm = make_dm(tmp_path, str(tmp_path / "blank.txt"), sample_by="line")
    with pytest.raises(ConfigError, match="empty"):
        dm.prepare_data()


def test_missing_text_column_names_the_columns(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"content": s}) for s in sentences(5)))
    dm = make_dm(tmp_path, str(f))
    with pytest.raises(ConfigError, match="'text' is not in") as err:
        dm.prepare_data()
    assert err.value.field == "data.init_args.text_column" and "content" in err.value.fix


def test_bad_settings_fail_at_construction() -> None:
    for kw, field in [
        ({"block_size": 1}, "data.init_args.block_size"),
        ({"val_fraction": 1.0}, "data.init_args.val_fraction"),
        ({"layout": "zip"}, "data.init_args.layout"),
        ({"format": "xml"}, "data.init_args.format"),
        ({"batch_size": 0}, "data.init_args.batch_size"),
        ({"pad_to_multiple_of": 0}, "data.init_args.pad_to_multiple_of"),
        ({"max_bytes": -1}, "data.init_args.max_bytes"),
        ({"num_workers": 10**6}, "data.init_args.num_workers"),  # found by the config fuzzing (issue 22)
    ]:
        with pytest.raises(ConfigError) as err:
            TextDataModule("gpt2", path="stdlib", **kw)
        assert err.value.field == field


def test_num_proc_gives_the_same_rows(tmp_path: Path, txt: Path) -> None:
    one = make_dm(tmp_path / "one", str(txt), sample_by="line", layout="pack", document_mask=True)
    one.setup("fit")
    two = make_dm(tmp_path / "two", str(txt), sample_by="line", layout="pack", document_mask=True, num_proc=2)
    two.setup("fit")
    assert one.cache_folder().name == two.cache_folder().name  # num_proc is not part of the key...
    for split in ("train", "validation"):  # ...because it does not change the rows
        a, b = (dm.train_set if split == "train" else dm.val_set for dm in (one, two))
        assert a["input_ids"] == b["input_ids"] and a["position_ids"] == b["position_ids"]


def test_validation_from_a_local_file(tmp_path: Path, txt: Path) -> None:
    val = tmp_path / "val.txt"
    val.write_text("\n".join(sentences(7, seed=11)))
    dm = make_dm(tmp_path, str(txt), validation_split=str(val), sample_by="line", layout="pad")
    dm.setup("fit")
    assert len(dm.val_set) == 7 and len(dm.train_set) == 120  # nothing held out of the training file
    with pytest.raises(ConfigError, match="local files have no split named 'validation'") as err:
        make_dm(tmp_path, str(txt), validation_split="validation")
    assert err.value.field == "data.init_args.validation_split"
    with pytest.raises(ConfigError, match="does not exist"):
        make_dm(tmp_path, str(txt), validation_split=str(tmp_path / "missing.txt"))
