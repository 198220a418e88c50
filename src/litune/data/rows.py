"""Row-level checks of raw data: every malformed row is named by file, row number and field, with the fix.

Each format reads some columns of each row (``text``; ``prompt``/``response``; ``messages``; ``source``/``target``).
A row whose value there has the wrong shape (a number for text, a string for a conversation, a message without a
``role``) would fail deep inside the tokenizer with a ``KeyError`` or ``TypeError`` and no hint of which row. The
checks here run on the raw rows, before tokenizing: the first bad row is reported as a :func:`row_error` naming the
file, its row (and line, for JSON Lines) and the field, or, with ``skip_bad_rows``, every bad row is dropped and
counted. A bad row is never dropped silently.

:func:`row_error` is the one way to report a bad row; other formats (preference pairs) reuse it with their own
:data:`Check`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from litune.errors import ConfigError

Check = Callable[[Any], str | None]
"""A check of one column's value in one row: ``None`` when fine, else what is wrong (one clause)."""

CHAT_ROLES = ("system", "user", "assistant", "tool")


def row_error(
    field: str, location: str, column: str, problem: str, fix: str, bad_rows: int = 1, skip_field: str | None = None
) -> ConfigError:
    """The :class:`ConfigError` for a malformed row.

    Args:
        field: the config field that names the column (e.g. ``data.init_args.messages_column``).
        location: where the row is, from :func:`locate` (``"chat.jsonl, row 3 (line 4)"``).
        column: the column (key) of the row at fault.
        problem: what is wrong with its value.
        fix: how to correct the row.
        bad_rows: how many rows of this source have a problem (said when more than one).
        skip_field: the setting that drops bad rows instead (``data.init_args.skip_bad_rows``), offered in the fix.
    """
    more = f" ({bad_rows} malformed rows in all)" if bad_rows > 1 else ""
    skip = f", or set {skip_field}=true to drop malformed rows and count them" if skip_field else ""
    return ConfigError(field, f"{location}: column {column!r} {problem}{more}", f"{fix}{skip}")


def locate(files: Sequence[Path] | None, source: str, index: int) -> str:
    """Where the row at ``index`` (0-based, in load order) of a source is: file, 1-based row and, for JSON Lines, line.

    Args:
        files: the local files the rows came from, in load order (None for a hub dataset).
        source: the configured path or hub id, used when the files are not known.
        index: the row's position in the loaded rows.
    """
    if not files:
        return f"{source}, row {index + 1}"
    offset = index
    for path in files:
        lines = _json_lines(path)
        if lines is None:  # not JSON Lines: rows are not lines; exact for a single file
            return f"{path}, row {offset + 1}" if len(files) == 1 else f"{source}, row {index + 1}"
        if offset < len(lines):
            return f"{path}, row {offset + 1} (line {lines[offset]})"
        offset -= len(lines)
    return f"{source}, row {index + 1}"


def _json_lines(path: Path) -> list[int] | None:
    """The 1-based line numbers of the rows of a JSON Lines file (blank lines hold no row), or None for other files."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        return None
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
        if head.startswith(b"["):  # a JSON array, not JSON Lines
            return None
        fh.seek(0)
        return [n for n, raw in enumerate(fh, start=1) if raw.strip()]


def text_value(value: Any) -> str | None:
    """A text column: a string (an empty one holds no document and is left out by the tokenizer)."""
    if isinstance(value, str):
        return None
    return "is empty (null)" if value is None else f"holds {type(value).__name__} {_short(value)}, not text"


def chat_messages(value: Any) -> str | None:
    """A conversation: a list of ``{"role": ..., "content": "..."}`` objects with a known role."""
    if isinstance(value, str):
        return f"holds the string {_short(value)}, not a list of messages"
    if not isinstance(value, list):
        return f"holds {type(value).__name__} {_short(value)}, not a list of messages"
    if not value:
        return "holds an empty conversation (no messages)"
    for k, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {k} is {type(message).__name__} {_short(message)}, not an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return f"message {k} has no 'role' (keys: {sorted(message)})"
        if role not in CHAT_ROLES:
            return f"message {k} has role {_short(role)}, not one of {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str):
            what = "no 'content'" if content is None else f"content {_short(content)}, not text"
            return f"message {k} ({role}) has {what}"
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def find_bad_rows(values: Sequence[Any], check: Check) -> list[tuple[int, str]]:
    """``(index, problem)`` of every value ``check`` flags, in order."""
    return [(i, problem) for i, value in enumerate(values) if (problem := check(value)) is not None]
