"""Malformed rows in every format are named by file, row (and line) and field, with the fix; never dropped silently
(only with ``skip_bad_rows``, and then counted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from litune.data.rows import chat_messages, locate, row_error
from litune.errors import ConfigError
from litune_testing import make_dm, sentences

GOOD_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def _write_jsonl(path: Path, rows: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


CHAT_CASES = {
    "message without role": ([{"content": "hi"}, GOOD_CHAT[1]], "message 1 has no 'role'"),
    "messages as a string": ("user: hi / assistant: hello", "holds the string"),
    "unknown role": ([{"role": "robot", "content": "hi"}, GOOD_CHAT[1]], "role 'robot'"),
    "content not text": ([GOOD_CHAT[0], {"role": "assistant", "content": 5}], "message 2 (assistant) has content 5"),
    "message not an object": (["hi", GOOD_CHAT[1]], "message 1 is str"),
    "no messages": ([], "empty conversation"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_row(case: str, tmp_path: Path) -> None:
    bad, words = CHAT_CASES[case]
    rows = [{"messages": GOOD_CHAT} for _ in range(8)]
    rows[4] = {"messages": bad}
    if case == "messages as a string":  # every row a string: the column is typed text, not a list
        rows = [{"messages": f"user: {s}"} for s in sentences(8)]
    f = _write_jsonl(tmp_path / "chat.jsonl", rows, blank_after=2)
    dm = make_dm(tmp_path, str(f), format="chat", layout="pad", val_fraction=0.0, block_size=64)
    with pytest.raises(ConfigError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert err.value.field == "data.init_args.messages_column", message
    row, line = (1, 1) if case == "messages as a string" else (5, 6)  # a blank line 3: row 5 is on line 6
    assert f"chat.jsonl, row {row} (line {line}): column 'messages' " in message and words in message, message
    assert '"role": "assistant"' in err.value.fix and "skip_bad_rows" in err.value.fix


def test_chat_bad_rows_skipped_only_when_asked_and_counted(tmp_path: Path) -> None:
    rows = [{"messages": GOOD_CHAT} for _ in range(8)]
    rows[2] = {"messages": [{"content": "no role"}, GOOD_CHAT[1]]}
    rows[6] = {"messages": [GOOD_CHAT[0], {"role": "assistant"}]}
    f = _write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = make_dm(tmp_path, str(f), format="chat", layout="pad", val_fraction=0.0, block_size=64, skip_bad_rows=True)
    dm.setup("fit")
    assert dm.stats["bad_rows_skipped"] == 2 and len(dm.train_set) == 6


@pytest.mark.parametrize("fmt", ["text", "instruction"])
def test_null_in_a_text_column(fmt: str, tmp_path: Path) -> None:
    if fmt == "text":
        rows: list[dict] = [{"text": s} for s in sentences(6)]
        rows[3] = {"text": None}
        field = "data.init_args.text_column"
    else:
        rows = [{"prompt": s, "response": s[::-1]} for s in sentences(6)]
        rows[3] = {"prompt": "a question", "response": None}
        field = "data.init_args.response_column"
    f = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        make_dm(tmp_path, str(f), format=fmt, layout="pad", val_fraction=0.0).prepare_data()
    assert err.value.field == field and "rows.jsonl, row 4 (line 4)" in str(err.value) and "null" in str(err.value)


def test_row_location_across_files_and_formats(tmp_path: Path) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}] * 3, blank_after=1)
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}] * 3)
    assert locate([a, b], "data/*.jsonl", 1) == f"{a}, row 2 (line 3)"
    assert locate([a, b], "data/*.jsonl", 4) == f"{b}, row 2 (line 2)"
    csv = tmp_path / "t.csv"
    csv.write_text("text\nx\n")
    assert locate([csv], "t.csv", 0) == f"{csv}, row 1" and locate(None, "org/data", 6) == "org/data, row 7"


def test_row_error_is_one_paragraph_with_field_and_fix() -> None:
    skip = "data.init_args.skip_bad_rows"
    where = "p.jsonl, row 2 (line 2)"
    err = row_error("data.init_args.chosen_column", where, "chosen", "is empty (null)", "fix it", 3, skip)
    assert str(err).startswith("data.init_args.chosen_column: p.jsonl, row 2 (line 2): column 'chosen' is empty")
    assert "(3 malformed rows in all)" in str(err) and "skip_bad_rows=true" in err.fix
    assert chat_messages(GOOD_CHAT) is None
