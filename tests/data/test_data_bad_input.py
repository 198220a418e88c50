"""Bad input of issue 4 (broken rows, over-long samples, tokenizers without pad/eos, hub ids offline) and the
tokenize-once cache: reuse, and rebuild (never silent reuse) when the tokenizer or the settings change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from litune.commands.prepare import format_stats
from litune.data import cache
from litune.data.sources import load_hub
from litune.data.text import TextDataModule
from litune.errors import ConfigError
from litune_testing import make_dm, make_tokenizer, sentences


def _jsonl_with_bad_line(tmp_path: Path) -> Path:
    lines = [json.dumps({"text": s}) for s in sentences(10)]
    lines[6] = '{"text": "unterminated'
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, suffix: str) -> None:
    f = _jsonl_with_bad_line(tmp_path)
    f = f.rename(f.with_suffix(suffix))  # JSON Lines in a .json file, as the hub often ships them
    dm = make_dm(tmp_path, str(f))
    with pytest.raises(ConfigError, match=rf"bad\{suffix}, line 7: malformed JSON") as err:
        dm.prepare_data()
    assert "skip_bad_rows" in err.value.fix


def test_skip_bad_rows_drops_and_counts(tmp_path: Path) -> None:
    f = _jsonl_with_bad_line(tmp_path)
    dm = make_dm(tmp_path, str(f), skip_bad_rows=True, layout="pad", val_fraction=0.0, block_size=128)
    dm.setup("fit")
    assert dm.stats["bad_rows_skipped"] == 1 and dm.stats["samples"] == 9 and len(dm.train_set) == 9
    assert "bad rows skipped: 1 (e.g. " in format_stats(dm.stats, False, 0.1)
    assert "bad.jsonl:7: malformed JSON" in format_stats(dm.stats, False, 0.1)


def test_non_utf8_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"good line one\ngood line two\ncaf\xe9 au lait\nlast line\n")
    dm = make_dm(tmp_path, str(f), sample_by="line")
    with pytest.raises(ConfigError, match=r"latin1\.txt, line 3: not UTF-8"):
        dm.prepare_data()
    ok = make_dm(tmp_path, str(f), sample_by="line", skip_bad_rows=True, val_fraction=0.0, layout="pad")
    ok.setup("fit")
    assert ok.stats["bad_rows_skipped"] == 1 and ok.stats["samples"] == 3


def test_overlong_samples_truncated_and_counted_or_rejected(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("\n".join(sentences(20, lo=2, hi=4) + sentences(3, seed=7, lo=60, hi=70)))
    dm = make_dm(tmp_path, str(f), sample_by="line", layout="pad", block_size=32, val_fraction=0.0)
    dm.setup("fit")
    assert dm.stats["truncated"] == 3
    assert max(dm.train_set["length"]) == 32
    strict = make_dm(tmp_path, str(f), sample_by="line", layout="pack", block_size=32, overlong="error")
    with pytest.raises(ConfigError, match="3 samples are longer than block_size=32") as err:
        strict.prepare_data()
    assert err.value.field == "data.init_args.block_size"


def test_tokenizer_without_pad_and_eos_is_rejected(tmp_path: Path) -> None:
    bare = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(tmp_path).load().backend_tokenizer)
    folder = tmp_path / "bare-tokenizer"
    bare.save_pretrained(folder)
    f = tmp_path / "d.txt"
    f.write_text("hello world")
    dm = TextDataModule(str(folder), path=str(f), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="neither a pad nor an eos token"):
        dm.prepare_data()


def test_hub_id_offline_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No internet here: the hub call really fails, and the failure must come back as a ConfigError.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not load hub dataset 'litune-test/no-such-dataset'") as err:
        load_hub("litune-test/no-such-dataset", "cfg", "train", cache_dir=str(tmp_path / "hf"))
    assert err.value.field == "data.init_args.path"


def test_hub_loading_path_with_config_name_and_split(tmp_path: Path) -> None:
    """``load_hub`` passes config name and split to ``datasets.load_dataset``; a local dataset repository (same
    layout and README metadata as a hub repo) stands in for the hub, which cannot be reached here."""
    repo = tmp_path / "repo"
    (repo / "small").mkdir(parents=True)
    (repo / "small" / "train.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in sentences(6)))
    (repo / "small" / "test.jsonl").write_text(json.dumps({"text": "held out"}))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "  - split: test\n    path: small/test.jsonl\n---\n"
    )
    assert len(load_hub(str(repo), "small", "train", cache_dir=str(tmp_path / "hf"))) == 6
    assert load_hub(str(repo), "small", "test", cache_dir=str(tmp_path / "hf"))["text"] == ["held out"]
    with pytest.raises(ConfigError, match="split 'validation'"):
        load_hub(str(repo), "small", "validation", cache_dir=str(tmp_path / "hf"))


# --- cache -----------------------------------------------------------------------------------------------------------


def test_second_setup_hits_the_cache(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("\n".join(sentences(50)))
    first = make_dm(tmp_path, str(f), sample_by="line")
    first.setup("fit")
    again = make_dm(tmp_path, str(f), sample_by="line")
    again.setup("fit")
    assert first.cache_hit is False and again.cache_hit is True
    assert again.stats == first.stats
    assert again.train_set["input_ids"] == first.train_set["input_ids"]
    # any change of what decides the rows gives another folder
    other = make_dm(tmp_path, str(f), sample_by="line", block_size=16)
    assert other.cache_folder() != first.cache_folder()
    before = first.cache_folder()
    f.write_text("\n".join(sentences(50, seed=1)))  # the file changed: size or mtime differ
    changed = make_dm(tmp_path, str(f), sample_by="line")
    assert changed.cache_folder() != before


def test_cache_from_another_tokenizer_is_rebuilt(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("\n".join(sentences(50)))
    a = make_dm(tmp_path, str(f), sample_by="line")
    a.setup("fit")
    b = TextDataModule(
        make_tokenizer(tmp_path, vocab_size=280),
        path=str(f),
        sample_by="line",
        block_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    assert b.cache_folder() != a.cache_folder()
    # even a cache copied into the other tokenizer's folder is detected by its stored key and rebuilt
    shutil.copytree(a.cache_folder(), b.cache_folder())
    assert cache.lookup(b.cache_folder(), b._key()) is None
    b.setup("fit")
    assert b.cache_hit is False
    assert b.train_set["input_ids"] != a.train_set["input_ids"]
    assert cache.lookup(b.cache_folder(), b._key()) is not None
