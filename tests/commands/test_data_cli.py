"""``litune prepare`` end to end: same config and overrides as ``litune fit``, statistics printed, and a following
``fit`` that reuses the tokenized cache instead of tokenizing again."""

from __future__ import annotations

from pathlib import Path

from litune.cli import main
from litune.commands.fit import LituneCLI
from litune_testing import tiny_args


def _args(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return tiny_args(corpus_dir, tokenizer_dir, f"--data.init_args.cache_dir={tmp_path / 'cache'}", *extra)


def test_prepare_prints_stats_and_fit_reuses_the_cache(tmp_path, corpus_dir, tokenizer_dir, capsys) -> None:
    args = _args(tmp_path, corpus_dir, tokenizer_dir, "--data.init_args.layout=pack")
    assert main(["prepare", *args]) == 0
    out = capsys.readouterr().out
    assert "built in" in out
    for field in ("samples:", "tokens:", "truncated samples:", "packing efficiency", "padding ratio"):
        assert field in out, out
    folders = list((tmp_path / "cache" / "data").iterdir())
    assert len(folders) == 1

    assert main(["prepare", *args]) == 0
    assert "reused" in capsys.readouterr().out

    cli = LituneCLI(args=["fit", *args, f"--runs_dir={tmp_path / 'runs'}", "--trainer.max_steps=2"])
    assert cli.datamodule.cache_hit is True  # fit found the prepared rows: no second tokenization
    assert list((tmp_path / "cache" / "data").iterdir()) == folders
    assert cli.trainer.global_step == 2


def test_prepare_reports_bad_input_in_one_paragraph(tmp_path, corpus_dir, tokenizer_dir, capsys) -> None:
    args = _args(tmp_path, corpus_dir, tokenizer_dir, "--data.init_args.text_column=body")
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err
    assert "data.init_args.text_column: column 'body' is not in" in err and "Traceback" not in err
