"""From a :class:`DataSpec` to tokenized train/validation rows: load, split, tokenize, lay out, count.

This is the work ``litune prepare`` does once (and ``fit`` does on rank 0 when no cache exists); the result is saved by
:mod:`litune.data.cache`. Each step is a ``datasets`` operation (``map(batched=True, num_proc=...)``,
``train_test_split``, ``interleave_datasets``), so it runs out of core on Arrow files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from litune.data import formats, packing, rows, sources
from litune.data.stdlib import STDLIB_SOURCE, stdlib_python_files
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX


@dataclass
class Source:
    """One data source of a weighted mixture.

    Args:
        path: hub dataset id, local file, folder, glob, or ``"stdlib"``.
        name: hub config name.
        split: hub split (local files are one ``train`` split).
        weight: relative sampling weight in the mixture (normalised over all sources).
        text_column: this source's text column when it differs from ``data.text_column`` (renamed to it).
    """

    path: str
    name: str | None = None
    split: str = "train"
    weight: float = 1.0
    text_column: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(
                "data.init_args.sources.path", f"{self.path!r} is not a path or hub id", "give a path or hub id"
            )
        if not self.weight > 0:
            raise ConfigError(
                "data.init_args.sources.weight", f"weight {self.weight} for {self.path} is not > 0", "use > 0"
            )


@dataclass
class DataSpec:
    """Everything that decides the tokenized rows (and so the cache key), validated at construction.

    See :class:`litune.data.text.TextDataModule` for the meaning of each field.
    """

    sources: list[Source]
    validation: str | None = None
    format: str = "text"
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    template: str | None = None
    layout: str = "concat"
    document_mask: bool = False
    block_size: int = 256
    val_fraction: float = 0.05
    seed: int = 42
    max_bytes: int | None = None
    sample_by: str = "document"
    skip_bad_rows: bool = False
    overlong: str = "truncate"
    streaming: bool = False
    num_proc: int | None = None
    hf_cache_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError(
                "data.init_args.path", "no data source given", "set data.init_args.path or data.init_args.sources"
            )
        if self.format not in formats.FORMATS:
            raise ConfigError(
                "data.init_args.format", f"{self.format!r} is not a format", f"use one of {formats.FORMATS}"
            )
        if self.layout not in packing.LAYOUTS:
            raise ConfigError(
                "data.init_args.layout", f"{self.layout!r} is not a layout", f"use one of {packing.LAYOUTS}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ConfigError(
                "data.init_args.block_size", f"{self.block_size} is too small", "use an int >= 2, e.g. 256"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("data.init_args.val_fraction", f"{self.val_fraction} is not in [0, 1)", "use e.g. 0.05")
        if self.overlong not in ("truncate", "error"):
            raise ConfigError(
                "data.init_args.overlong", f"{self.overlong!r} is not a choice", "use 'truncate' or 'error'"
            )
        if self.sample_by not in sources.TEXT_SAMPLE_BY:
            raise ConfigError(
                "data.init_args.sample_by", f"{self.sample_by!r} is not a choice", f"use {sources.TEXT_SAMPLE_BY}"
            )
        if self.streaming and self.layout == "pack":
            raise ConfigError(
                "data.init_args.layout", "'pack' needs the whole dataset", "use layout=concat or pad when streaming"
            )
        if self.template is not None:
            needed = {"instruction": "{prompt}", "chat": "{content}"}.get(self.format)
            if needed is None or needed not in self.template:
                raise ConfigError(
                    "data.init_args.template",
                    f"{self.template!r} is not a template for format {self.format!r}",
                    "use {prompt} for instruction data, {role} and {content} for chat turns, none for text",
                )
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError("data.init_args.num_proc", f"{self.num_proc} is not >= 1", "use None or a positive int")
        for src in self.sources:
            if src.path != STDLIB_SOURCE:
                sources.resolve_local_files(src.path)  # fails early on a missing local path, an empty file
        if self.validation is not None and self.validation_files() is None:  # a split name, not a local path
            if len(self.sources) != 1:
                raise ConfigError(
                    "data.init_args.validation_split",
                    f"the split name {self.validation!r} is ambiguous with several sources",
                    "give a local validation file, folder or glob, or use val_fraction",
                )
            if self._files(self.sources[0].path) is not None:
                raise ConfigError(
                    "data.init_args.validation_split",
                    f"local files have no split named {self.validation!r}",
                    "give a local validation file, folder or glob, or leave it null to hold out val_fraction",
                )

    def raw_columns(self) -> dict[str, str]:
        """The raw columns this format reads: config field -> column name."""
        return {
            "text": {"text_column": self.text_column},
            "instruction": {"prompt_column": self.prompt_column, "response_column": self.response_column},
            "chat": {"messages_column": self.messages_column},
        }[self.format]

    def token_columns(self) -> list[str]:
        """The columns tokenization produces (named explicitly: a stream may not know its columns)."""
        return ["input_ids"] if self.format == "text" else ["input_ids", "labels"]

    def validation_files(self) -> list | None:
        """The local validation files, or ``None`` when ``validation`` is a hub split name (or not set)."""
        if self.validation is None:
            return None
        return sources.resolve_local_files(self.validation, "data.init_args.validation_split")

    def key(self) -> dict:
        """The cache-relevant content, with local files identified by path, size and modification time."""
        key = asdict(self)
        key.pop("hf_cache_dir")
        key.pop("num_proc")
        key["files"] = [sources.files_fingerprint(self._files(s.path) or []) for s in self.sources]
        key["validation_files"] = sources.files_fingerprint(self.validation_files() or [])
        return key

    def _files(self, path: str) -> list | None:
        return stdlib_python_files(self.max_bytes) if path == STDLIB_SOURCE else sources.resolve_local_files(path)


def load_source(
    spec: DataSpec, src: Source, split: str | None = None, report: sources.LoadReport | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one source's raw rows and check that the columns the format needs are there."""
    files = spec._files(src.path)
    if files is None:
        ds = sources.load_hub(
            src.path, src.name, split or src.split, streaming=spec.streaming, cache_dir=spec.hf_cache_dir
        )
    else:
        ds = sources.load_local(
            files,
            sample_by=spec.sample_by,
            skip_bad_rows=spec.skip_bad_rows,
            streaming=spec.streaming,
            cache_dir=spec.hf_cache_dir,
            report=report,
            row_check=row_check(spec),
        )
    ds = select_raw_columns(ds, spec, src)
    ds = check_rows(ds, spec, src, files, report)
    if not spec.streaming and len(ds) == 0:
        raise ConfigError(
            "data.init_args.path", f"the dataset {src.path} is empty", "give a source with at least one row"
        )
    return ds


def select_raw_columns(
    ds: datasets.Dataset | datasets.IterableDataset, spec: DataSpec, src: Source
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep only the columns the format reads (renaming a source's own text column), failing on a missing one.

    Streams from the hub may not know their columns before the first row is read (``column_names`` is None): then
    the selection is lazy and a missing column fails at the first row.
    """
    columns = ds.column_names  # None for streaming sources whose columns are only known once read
    if src.text_column and src.text_column != spec.text_column and (columns is None or src.text_column in columns):
        ds = ds.rename_column(src.text_column, spec.text_column)
        columns = ds.column_names
    needed = spec.raw_columns()
    for fix_field, col in needed.items() if columns is not None else ():
        if col not in columns:
            raise ConfigError(
                f"data.init_args.{fix_field}",
                f"column {col!r} is not in {src.path} (columns: {columns})",
                f"set data.init_args.{fix_field} to one of {columns}",
            )
    ds = ds.select_columns(list(needed.values()))
    check_text_columns(ds, spec, src)
    return ds


def check_text_columns(ds: datasets.Dataset | datasets.IterableDataset, spec: DataSpec, src: Source) -> None:
    """Text and prompt/response columns must hold strings: numbers, lists or only nulls would otherwise fail deep
    inside the tokenizer. The Arrow schema says so for the whole column without reading a row."""
    features = ds.features
    if spec.format == "chat" or features is None:
        return
    for fix_field, col in spec.raw_columns().items():
        feature = features.get(col)
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            continue
        kind = "only nulls" if isinstance(feature, datasets.Value) and feature.dtype == "null" else f"{feature}"
        raise ConfigError(
            f"data.init_args.{fix_field}",
            f"column {col!r} of {src.path} holds {kind}, not text",
            f"point data.init_args.{fix_field} at a column of strings, or convert the values to strings in the file",
        )


def row_check(spec: DataSpec) -> sources.RowCheck:
    """The check of one raw row (a dict) for ``spec``'s format, as :func:`sources.load_local` uses it."""
    check = rows.chat_messages if spec.format == "chat" else rows.text_value
    fix = formats.CHAT_ROW_FIX if spec.format == "chat" else "give every row a string in this column"

    def check_row(row: dict) -> tuple[str, str, str, str] | None:
        for fix_field, col in spec.raw_columns().items():
            problem = check(row[col]) if col in row else f"is missing (the row's keys: {sorted(row)})"
            if problem is not None:
                return f"data.init_args.{fix_field}", col, problem, fix
        return None

    return check_row


def check_rows(
    ds: datasets.Dataset | datasets.IterableDataset,
    spec: DataSpec,
    src: Source,
    files: list | None,
    report: sources.LoadReport | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Every row's values in the columns the format reads (:mod:`litune.data.rows`): the first malformed row is an
    error naming file, row and field; with ``skip_bad_rows`` every malformed row is dropped and counted instead.

    Text columns are typed by Arrow (:func:`check_text_columns`), so only their nulls are looked for, in Arrow; chat
    columns are read row by row. A stream is checked as it is tokenized (:func:`litune.data.formats.tokenize_chat`).
    """
    if not isinstance(ds, datasets.Dataset):
        return ds
    bad: list[tuple[int, str, str]] = []  # (row index, config field, problem)
    for fix_field, col in spec.raw_columns().items():
        column = ds.data.column(col)
        if spec.format == "chat":  # through the Dataset, which decodes datasets' Json features (mixed-shape rows)
            found = rows.find_bad_rows(list(ds[col]), rows.chat_messages)
        elif column.null_count:
            found = [(i, "is empty (null)") for i, valid in enumerate(column.is_valid().to_pylist()) if not valid]
        else:
            continue
        bad += [(i, f"data.init_args.{fix_field}", problem) for i, problem in found]
    if not bad:
        return ds
    bad.sort()
    col_of = {f"data.init_args.{k}": v for k, v in spec.raw_columns().items()}
    if not spec.skip_bad_rows:
        index, field, problem = bad[0]
        fix = formats.CHAT_ROW_FIX if spec.format == "chat" else "give every row a string in this column"
        location = rows.locate(files, src.path, index)
        skip = "data.init_args.skip_bad_rows"
        raise rows.row_error(field, location, col_of[field], problem, fix, len(bad), skip)
    dropped = sorted({i for i, _, _ in bad})
    if report is not None:
        report.bad_rows += len(dropped)
        report.bad_row_examples += [
            f"{rows.locate(files, src.path, i)}: column {col_of[f]!r} {why}" for i, f, why in bad[:3]
        ]
    keep = sorted(set(range(len(ds))) - set(dropped))
    return ds.select(keep)


def load_raw(
    spec: DataSpec, report: sources.LoadReport | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Raw train rows (mixed by weight over the sources) and, if configured, raw validation rows."""
    parts = [load_source(spec, s, report=report) for s in spec.sources]
    if len(parts) == 1:
        train = parts[0]
    else:
        total = sum(s.weight for s in spec.sources)
        train = datasets.interleave_datasets(
            parts,
            probabilities=[s.weight / total for s in spec.sources],
            seed=spec.seed,
            stopping_strategy="first_exhausted",
        )
    val = None
    if spec.validation is not None:
        if spec.validation_files() is None:
            val = load_source(spec, spec.sources[0], split=spec.validation, report=report)
        else:
            val = load_source(spec, Source(spec.validation), report=report)
    return train, val


def tokenize(ds: datasets.Dataset, spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Tokenize raw rows with the spec's format (one batched ``map``)."""
    if spec.format == "text":
        fn = partial(formats.tokenize_text, tokenizer=tokenizer, text_column=spec.text_column)
    elif spec.format == "instruction":
        fn = partial(
            formats.tokenize_instruction,
            tokenizer=tokenizer,
            prompt_column=spec.prompt_column,
            response_column=spec.response_column,
            template=spec.template or formats.DEFAULT_INSTRUCTION_TEMPLATE,
        )
    else:
        fn = partial(
            formats.tokenize_chat, tokenizer=tokenizer, messages_column=spec.messages_column, template=spec.template
        )
    kwargs = {} if spec.streaming else {"num_proc": spec.num_proc}
    return ds.map(fn, batched=True, remove_columns=list(spec.raw_columns().values()), **kwargs)


def lay_out(ds: datasets.Dataset, spec: DataSpec) -> tuple[datasets.Dataset, int]:
    """Cut, pack or truncate tokenized samples into rows of at most ``block_size`` tokens.

    Returns:
        The rows, and how many samples were truncated (always 0 for ``concat``, which splits documents by design).

    Raises:
        ConfigError: ``overlong='error'`` and a sample is longer than ``block_size`` (only for ``pack``/``pad``;
            ``concat`` splits documents by design).
    """
    # Single process on purpose: ``num_proc`` would shard the rows, and the map-batch boundaries (where a concat
    # remainder or a bin-packing window ends) would then depend on it, so the same cache key could mean different rows.
    # Cutting and packing lists is cheap next to tokenizing, which does use ``num_proc``.
    kwargs: dict = {}
    if spec.layout == "concat":
        fn = partial(packing.concat_into_blocks, block_size=spec.block_size, document_positions=spec.document_mask)
        return ds.map(fn, batched=True, remove_columns=spec.token_columns(), **kwargs), 0
    ds = ds.map(partial(packing.truncate_samples, block_size=spec.block_size), batched=True, **kwargs)
    n = 0 if spec.streaming else sum(ds["truncated"])
    if spec.overlong == "error" and n:
        raise ConfigError(
            "data.init_args.block_size",
            f"{n} samples are longer than block_size={spec.block_size}",
            "raise block_size, or set data.init_args.overlong=truncate to cut and count them",
        )
    ds = ds.remove_columns("truncated")
    if spec.layout == "pad":
        return ds, n
    fn = partial(packing.pack_samples, block_size=spec.block_size, document_positions=spec.document_mask)
    # Bin-pack in large map batches: first-fit decreasing gets closer to full rows with more samples to choose from.
    return ds.map(fn, batched=True, batch_size=10_000, remove_columns=spec.token_columns(), **kwargs), n


def _trainable(batch: dict[str, list]) -> list[bool]:
    """Whether each row has at least one next-token target: a label other than -100 after its first position (the
    first token of a row has no context in the row to be predicted from). Rows without ``labels`` train on
    ``input_ids``, so they need two tokens."""
    if "labels" in batch:
        return [any(t != IGNORE_INDEX for t in row[1:]) for row in batch["labels"]]
    return [len(row) > 1 for row in batch["input_ids"]]


def drop_untrainable(rows: datasets.Dataset, streaming: bool = False) -> tuple[datasets.Dataset, int]:
    """Drop laid-out rows that have no target token (e.g. an instruction whose prompt fills ``block_size``).

    Such a row trains nothing and, alone in a micro-batch, used to make the mean loss 0/0 = NaN. The objective
    handles empty micro-batches anyway (zero loss, zero gradient); dropping the rows saves their compute.

    Returns:
        The remaining rows and how many were dropped (0 for a stream, whose length is unknown).
    """
    kept = rows.filter(_trainable, batched=True)
    return kept, 0 if streaming else len(rows) - len(kept)


def _lengths(batch: dict[str, list]) -> dict[str, list]:
    return {"length": [len(x) for x in batch["input_ids"]]}


def _split_rows(rows: datasets.Dataset, spec: DataSpec) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a fraction of the laid-out rows (used when there are too few documents to hold out whole ones)."""
    n_val = max(1, round(len(rows) * spec.val_fraction))
    if len(rows) - n_val < 1:
        raise ConfigError(
            "data.init_args.block_size",
            f"the data makes only {len(rows)} row(s) of {spec.block_size} tokens, too few to hold out a validation set",
            "add data, lower block_size, or set val_fraction=0",
        )
    split = rows.train_test_split(test_size=n_val, seed=spec.seed)
    return split["train"], split["test"]


def build(spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.DatasetDict, dict]:
    """Load, split, tokenize and lay out the data of ``spec`` (not streaming).

    The validation set is, in order of preference: the configured validation split or file; a held-out
    ``val_fraction`` of the raw documents (so no document is in both sets), deterministic by ``seed``; or, when there
    are too few documents for that (say one big text file), a held-out fraction of the laid-out rows.

    Returns:
        ``DatasetDict`` with ``train`` (and ``validation`` unless ``val_fraction=0`` and none is configured), rows of
        ``input_ids``, optional ``labels``/``position_ids`` and ``length``; and the counts of :func:`count_stats`.
    """
    report = sources.LoadReport()
    train_raw, val_raw = load_raw(spec, report)
    split_rows_later = False
    if val_raw is None and spec.val_fraction > 0:
        n_val = round(len(train_raw) * spec.val_fraction)
        if n_val >= 1 and len(train_raw) - n_val >= 1:
            split = train_raw.train_test_split(test_size=n_val, seed=spec.seed)
            train_raw, val_raw = split["train"], split["test"]
        else:
            split_rows_later = True
    parts = {"train": train_raw} if val_raw is None else {"train": train_raw, "validation": val_raw}
    samples, tokens, truncated, untrainable, out = 0, 0, 0, 0, {}
    for name, raw in parts.items():
        tok = tokenize(raw, spec, tokenizer)
        if name == "train" and len(tok) == 0:
            raise ConfigError(
                "data.init_args.path", "every document is empty or whitespace", "give a source with text in it"
            )
        samples += len(tok)
        tokens += pc.sum(pc.list_value_length(tok.data.column("input_ids"))).as_py() or 0  # in Arrow: no Python pass
        rows, n = lay_out(tok, spec)
        rows, dropped = drop_untrainable(rows)
        if name == "train" and len(rows) == 0:
            raise ConfigError(
                "data",
                f"no training row has a token to learn: all {dropped} rows are prompt only (labels all -100)",
                "check the response/assistant columns, or raise block_size so responses are not cut off",
            )
        truncated += n
        untrainable += dropped
        out[name] = rows
    if split_rows_later:
        out["train"], out["validation"] = _split_rows(out["train"], spec)
    out = {k: v.map(_lengths, batched=True) for k, v in out.items()}
    counts = {
        "samples": samples,
        "tokens": tokens,
        "truncated": truncated,
        "untrainable_rows_dropped": untrainable,
        "bad_rows_skipped": report.bad_rows,
        "bad_row_examples": report.bad_row_examples[:5],
    }
    return datasets.DatasetDict(out), counts


def count_stats(rows: datasets.Dataset, block_size: int, batch_size: int, pad_to_multiple_of: int = 8) -> dict:
    """Row statistics of a laid-out split.

    Returns:
        ``rows``; ``row_tokens`` (non-pad tokens); ``packing_efficiency`` = non-pad tokens / (rows * block_size), the
        fill of fixed-size rows; ``padding_ratio`` = pad tokens / all tokens when consecutive rows are batched by
        ``batch_size`` and padded to the longest (rounded up to ``pad_to_multiple_of``), as the collator does.
    """
    lengths = rows["length"]
    used = sum(lengths)
    padded = 0
    m = max(1, pad_to_multiple_of)
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        width = min(-(-max(chunk) // m) * m, max(block_size, max(chunk)))
        padded += width * len(chunk)
    return {
        "rows": len(lengths),
        "row_tokens": used,
        "packing_efficiency": used / (len(lengths) * block_size) if lengths else 0.0,
        "padding_ratio": 1 - used / padded if padded else 0.0,
    }
