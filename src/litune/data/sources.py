"""Where raw documents come from: a hub dataset, local files (one format or a folder or a glob), or the stdlib.

Everything here returns an untokenized :class:`datasets.Dataset` (or ``IterableDataset`` when streaming) with at least
the requested columns, or raises :class:`~litune.errors.ConfigError` naming the field, the file and, for a bad row, the
line number. Loading itself is left to ``datasets.load_dataset`` (its builders are fast, Arrow-backed and cached);
when a builder fails on a local file we re-read that file line by line to say *where* it is broken, and with
``skip_bad_rows`` we read it ourselves, dropping (and counting) the broken lines.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from litune.data import rows
from litune.data.stdlib import STDLIB_SOURCE, stdlib_python_files
from litune.errors import ConfigError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File extension -> ``datasets`` builder. Any other extension (``.py``, ``.md``, ...) is read as plain text."""

TEXT_SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class LoadReport:
    """What loading skipped, for ``litune prepare``'s statistics."""

    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)


def _looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local path (so we fail loudly instead of asking the hub)."""
    if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in BUILDERS:
        return True
    return os.sep in path and Path(path.split(os.sep)[0]).exists()


def resolve_local_files(path: str, field: str = "data.init_args.path") -> list[Path] | None:
    """The local files that ``path`` names, or ``None`` when ``path`` is a hub dataset id.

    Args:
        path: a file, a folder (all files under it, recursively, hidden ones skipped), a glob, or ``"stdlib"``.
        field: the config field to name in errors.

    Raises:
        ConfigError: the path looks local but does not exist, the glob or folder matches nothing, or a file is empty.
    """
    if path == STDLIB_SOURCE:
        return stdlib_python_files()
    expanded = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(expanded), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(field, f"the glob {path!r} matches no file", "check the pattern and the working folder")
    elif expanded.is_dir():
        files = sorted(p for p in expanded.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
        if not files:
            raise ConfigError(field, f"the folder {path} holds no file", "point to a folder with data files")
    elif expanded.is_file():
        files = [expanded]
    elif _looks_local(path):
        raise ConfigError(field, f"the data path {path} does not exist", "give an existing file, folder or glob")
    else:
        return None  # a hub dataset id such as "wikitext" or "user/dataset"
    for f in files:
        if f.stat().st_size == 0:
            raise ConfigError(field, f"the data file {f} is empty", "remove it or put text in it")
    return files


def builder_for(files: list[Path], field: str = "data.init_args.path") -> str:
    """The one ``datasets`` builder that reads all ``files`` (they must share a format)."""
    builders = {BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(builders) > 1:
        raise ConfigError(
            field, f"the files mix formats {sorted(builders)}", "use one format per source (mix sources with weights)"
        )
    return builders.pop()


def files_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """A cheap identity of local files for cache keys: path, size and modification time (no hashing of content)."""
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file holds one JSON document (an array) rather than JSON Lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _bad_rows(path: Path, builder: str) -> list[tuple[int, str]]:
    """Line numbers (1-based) and reasons of the lines of ``path`` that are not UTF-8, or not JSON for JSON Lines."""
    bad: list[tuple[int, str]] = []
    json_lines = builder == "json" and (path.suffix.lower() == ".jsonl" or not _is_json_array(path))
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad.append((lineno, f"not UTF-8 ({err.reason} at byte {err.start})"))
                continue
            if json_lines and line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    bad.append((lineno, f"malformed JSON ({err.msg})"))
                    continue
                if not isinstance(row, dict):
                    bad.append((lineno, f"a JSON {type(row).__name__}, not an object"))
    return bad


def _read_skipping_bad_rows(files: list[Path], builder: str, sample_by: str, report: LoadReport) -> datasets.Dataset:
    """Read text or JSON Lines files ourselves, dropping the rows that :func:`_bad_rows` flags.

    Written by hand because ``datasets``' builders stop at the first bad row and have no skip option.
    """
    rows: list[dict] = []
    for path in files:
        bad = dict(_bad_rows(path, builder))
        report.bad_rows += len(bad)
        report.bad_row_examples += [f"{path}:{n}: {why}" for n, why in list(bad.items())[:3]]
        with open(path, "rb") as fh:
            lines = [raw.decode("utf-8") for n, raw in enumerate(fh, start=1) if n not in bad]
        if builder == "json":
            rows += [json.loads(line) for line in lines if line.strip()]
        elif sample_by == "document":
            rows.append({"text": "".join(lines)})
        elif sample_by == "paragraph":
            rows += [{"text": p} for p in "".join(lines).split("\n\n")]
        else:
            rows += [{"text": line.rstrip("\n")} for line in lines]
    return datasets.Dataset.from_list(rows)


def load_local(
    files: list[Path],
    *,
    field: str = "data.init_args.path",
    sample_by: str = "document",
    skip_bad_rows: bool = False,
    streaming: bool = False,
    cache_dir: str | None = None,
    report: LoadReport | None = None,
    row_check: RowCheck | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load local files with the matching ``datasets`` builder.

    Args:
        files: files of one format (see :data:`BUILDERS`).
        field: the config field to name in errors.
        sample_by: for plain text, what one sample is: a whole file, a blank-line separated paragraph, or a line.
        skip_bad_rows: drop (and count in ``report``) non-UTF-8 or malformed JSON lines instead of failing.
        streaming: return an ``IterableDataset`` that reads the files lazily.
        cache_dir: where ``datasets`` keeps its Arrow cache.
        report: receives the count of skipped rows.
        row_check: the format's check of one JSON row, used to name the row when the builder cannot read the rows
            (a column whose values change type between rows, e.g. a conversation given as a string in one row).

    Raises:
        ConfigError: a row is broken (naming file and line) and ``skip_bad_rows`` is off.
    """
    builder = builder_for(files, field)
    if sample_by not in TEXT_SAMPLE_BY:
        raise ConfigError("data.init_args.sample_by", f"{sample_by!r} is not a choice", f"use one of {TEXT_SAMPLE_BY}")
    kwargs: dict = {"sample_by": sample_by, "keep_linebreaks": True} if builder == "text" else {}
    report = report if report is not None else LoadReport()
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(f) for f in files],
            split="train",
            streaming=streaming,
            cache_dir=cache_dir,
            **kwargs,
        )
    except Exception as err:  # the builders raise many types (Arrow, Unicode, JSON, Value); we diagnose below
        if builder not in ("text", "json"):
            raise ConfigError(
                field, f"could not read {[str(f) for f in files]}: {err}", "fix or remove the file"
            ) from err
        syntax_ok = True
        for path in files:
            bad = _bad_rows(path, builder)
            syntax_ok = syntax_ok and not bad
            if bad and not skip_bad_rows:
                lineno, why = bad[0]
                raise ConfigError(
                    field,
                    f"{path}, line {lineno}: {why} ({len(bad)} bad line(s) in this file)",
                    "fix the file, or set data.init_args.skip_bad_rows=true to drop bad rows and count them",
                ) from err
        if builder == "json" and row_check is not None and not streaming and syntax_ok:
            checked = _read_checking_rows(files, row_check, skip_bad_rows, report)
            if checked is not None:
                return checked
        if not skip_bad_rows or streaming:
            raise ConfigError(field, f"could not read {[str(f) for f in files]}: {err}", "fix the files") from err
        return _read_skipping_bad_rows(files, builder, sample_by, report)


RowCheck = Callable[[dict], "tuple[str, str, str, str] | None"]
"""A format's check of one raw row: None, or (config field, column, problem, fix) for :func:`rows.row_error`."""


def _read_checking_rows(
    files: list[Path], row_check: RowCheck, skip_bad_rows: bool, report: LoadReport
) -> datasets.Dataset | None:
    """Read JSON rows in Python and check each: the first malformed row is an error naming file, row and field;
    with ``skip_bad_rows`` malformed rows are dropped and counted. None when every row is fine (the builder's failure
    was something else). Written by hand because Arrow's JSON reader names no row when a column changes type."""
    good: list[dict] = []
    bad: list[tuple[str, tuple[str, str, str, str]]] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        listed = (
            json.loads(text)
            if _is_json_array(path)
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
        for index, row in enumerate(listed):
            problem = row_check(row) if isinstance(row, dict) else None
            if problem is None:
                good.append(row)
            else:
                bad.append((rows.locate([path], str(path), index), problem))
    if not bad:
        return None
    if not skip_bad_rows:
        location, (field, column, problem, fix) = bad[0]
        raise rows.row_error(field, location, column, problem, fix, len(bad), "data.init_args.skip_bad_rows")
    report.bad_rows += len(bad)
    report.bad_row_examples += [f"{where}: column {p[1]!r} {p[2]}" for where, p in bad[:3]]
    return datasets.Dataset.from_list(good)


def load_hub(
    path: str,
    name: str | None,
    split: str,
    *,
    field: str = "data.init_args.path",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of a hub dataset, turning every failure (unknown id, no network, no such split) into a
    :class:`ConfigError`."""
    try:
        return datasets.load_dataset(path, name, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as err:  # DatasetNotFoundError, ConnectionError, ValueError(split), ... all mean "cannot load"
        raise ConfigError(
            field,
            f"could not load hub dataset {path!r} (config {name!r}, split {split!r}): {type(err).__name__}: {err}",
            "check the id, config name and split, and the network; or give a local file, folder or glob",
        ) from err


def write_pairs(path: str | Path, pairs: list[tuple[str, str]], source: str = "source", target: str = "target") -> None:
    """Write ``(source, target)`` text pairs as JSON Lines (handy for tests and for preparing data)."""
    with open(path, "w", encoding="utf-8") as fh:
        for s, t in pairs:
            fh.write(json.dumps({source: s, target: t}) + "\n")


ROW_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""The ``datasets`` builder of each file type that holds rows (preference pairs, prompts)."""


def local_row_files(path: str, field: str) -> list[Path]:
    """The local row files ``path`` names (a file, folder or glob), each of a type in :data:`ROW_FILE_BUILDERS`.

    Raises:
        ConfigError: naming ``field``, when ``path`` names no local file or one of another type.
    """
    files = resolve_local_files(path, field)
    if files is None:
        raise ConfigError(field, f"{path!r} is not a local file, folder or glob", "give local files")
    for f in files:
        if f.suffix not in ROW_FILE_BUILDERS:
            raise ConfigError(field, f"{f} is not a .jsonl/.json/.csv/.parquet file", "convert it to JSON Lines")
    return files


def train_validation_splits(
    tokenize: Callable[[str], datasets.Dataset], path: str, validation_path: str | None, val_fraction: float, seed: int
) -> dict[str, datasets.Dataset]:
    """``train``: ``tokenize(path)``'s rows; ``validation``: ``tokenize(validation_path)``'s, or else ``val_fraction``
    of the training rows held out (deterministic by ``seed``), or none."""
    train = tokenize(path)
    if validation_path is not None:
        return {"train": train, "validation": tokenize(validation_path)}
    if val_fraction > 0 and len(train) > 1:
        split = train.train_test_split(test_size=max(1, round(len(train) * val_fraction)), seed=seed)
        return {"train": split["train"], "validation": split["test"]}
    return {"train": train}


def check_row_split_fields(
    files: Callable[[str, str], list[Path]], path: str, validation_path: str | None, val_fraction: float
) -> None:
    """What every row spec (preference pairs, prompts) checks when it is made: ``val_fraction`` in [0, 1), and
    ``path`` and ``validation_path`` name row files (``files(path, field name)`` raises naming the field)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("data.init_args.val_fraction", f"{val_fraction} is not in [0, 1)", "use e.g. 0.05")
    for name, value in (("path", path), ("validation_path", validation_path)):
        if value is not None:
            files(value, name)
