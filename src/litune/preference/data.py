"""Preference data: prompt/chosen/rejected pairs (DPO family) or prompt/completion/label examples (KTO).

Formats of a row (JSON Lines, JSON, CSV or Parquet files):

* ``pairs`` (default): ``prompt``, ``chosen``, ``rejected``, each plain text; or ``prompt`` a list of chat messages
  (``{"role", "content"}``) and ``chosen``/``rejected`` lists of assistant messages, rendered with the tokenizer's
  chat template (``add_generation_prompt`` for the prompt) or, without one, litune's per-turn template.
* ``unpaired`` (KTO): ``prompt``, ``completion`` and a boolean ``label`` (true: desirable).

Rows are tokenized once into the data cache (:mod:`litune.data.cache`, keyed by the files, the tokenizer and these
settings). Prompt and response are tokenized separately, so their boundary is exact; the response gets EOS. The
truncation policy: a prompt longer than ``max_prompt_length`` keeps its *end* (the text next to the response); then
each response keeps its *start*, up to ``max_length`` tokens with the prompt. A row missing a field, with a field of
the wrong kind, or whose response has no token left after truncation is refused with its file, row and field; rows
are never dropped silently.

Batches (:class:`PreferenceCollator`): ``input_ids``/``attention_mask``/``labels`` of ``2P`` rows, the ``P`` chosen
sequences first and then the ``P`` rejected ones (labels ``-100`` on prompts and padding); KTO batches have one row
per example, ``desirable`` and the ``kl_*`` rows pairing each prompt with the next example's completion.

For an encoder-decoder (litune's :class:`~litune.models.seq2seq.Seq2SeqLM`, ``encoder_decoder: true``) the same rows
collate as seq2seq batches: the prompt is the encoder's source (``input_ids``/``attention_mask``) and the response the
decoder's target (``labels``, ``-100`` on padding), so the per-sequence log-probs are the decoder's over the response.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from litune.data import sources
from litune.data.collate import PadCollator, Seq2SeqCollator
from litune.data.formats import DEFAULT_CHAT_TURN_TEMPLATE
from litune.data.rows import locate, row_error
from litune.data.text import PreparedRowsDataModule
from litune.data.tokenizer import DEFAULT_CACHE, TokenizerSource
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune.preference.objective import REF_KEY
from litune.preference.stdlib_pairs import STDLIB_PAIRS, stdlib_pairs_file

log = logging.getLogger(__name__)

FIELD = "data.init_args"


@dataclass
class PreferenceSpec:
    """Everything that decides the tokenized rows (the cache key)."""

    path: str
    validation_path: str | None = None
    format: str = "pairs"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"
    label_column: str = "label"
    max_prompt_length: int | None = 128
    max_length: int = 256
    val_fraction: float = 0.05
    seed: int = 42
    streaming: bool = False  # read by TextDataModule's loaders: preference data is always in the cache

    def __post_init__(self) -> None:
        if self.format not in ("pairs", "unpaired"):
            raise ConfigError(f"{FIELD}.format", f"{self.format!r} is not a format", "use pairs or unpaired (KTO)")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"{FIELD}.max_length", f"{self.max_length!r} is not >= 2", "use e.g. 512")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"{FIELD}.max_prompt_length",
                f"max_prompt_length={self.max_prompt_length} leaves no room for a response in "
                f"max_length={self.max_length}",
                "use a max_prompt_length below max_length (or null to keep whole prompts)",
            )
        sources.check_row_split_fields(self.files, self.path, self.validation_path, self.val_fraction)

    def files(self, path: str, name: str = "path") -> list[Path]:
        if path == STDLIB_PAIRS:
            return [stdlib_pairs_file(DEFAULT_CACHE, unpaired=self.format == "unpaired")]
        return sources.local_row_files(path, f"{FIELD}.{name}")

    def columns(self) -> dict[str, str]:
        """Row field -> config field naming it."""
        if self.format == "unpaired":
            names = ("prompt_column", "completion_column", "label_column")
        else:
            names = ("prompt_column", "chosen_column", "rejected_column")
        return {getattr(self, n): n for n in names}

    def key(self) -> dict:
        key = asdict(self)
        key["files"] = sources.files_fingerprint(self.files(self.path))
        if self.validation_path is not None:
            key["validation_files"] = sources.files_fingerprint(self.files(self.validation_path, "validation_path"))
        return key


def RowError(file: Path, row: int, column: str, config_field: str, problem: str, fix: str) -> ConfigError:  # noqa: N802
    """A bad row, reported by the shared :func:`litune.data.rows.row_error`: its file, row (1-based) and column."""
    return row_error(f"{FIELD}.{config_field}", locate([file], str(file), row - 1), column, problem, fix)


class RowTokenizer:
    """Turns one raw row into token ids under the truncation policy (see the module docstring)."""

    def __init__(self, spec: PreferenceSpec, tokenizer: PreTrainedTokenizerBase) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start = [start] if start is not None else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _render(self, prompt: Any, response: Any, file: Path, row: int) -> tuple[str, str]:
        """``(prompt text, response text)`` of a text or chat row."""
        spec = self.spec
        if isinstance(prompt, str) and isinstance(response, str):
            return prompt, response
        if not (isinstance(prompt, list | str) and isinstance(response, list)):
            col = spec.prompt_column if not isinstance(prompt, list | str) else "response"
            raise RowError(file, row, col, "prompt_column", "expected text, or chat messages (a list of "
                           "{role, content})", "give text in every field, or chat messages in every field")  # fmt: skip
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        for m in [*messages, *response]:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise RowError(file, row, spec.prompt_column, "prompt_column", f"{m!r} is not a chat message",
                               'write messages as {"role": "user", "content": "..."}')  # fmt: skip
        if getattr(self.tokenizer, "chat_template", None):
            head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages + response, tokenize=False)
            if not full.startswith(head):
                raise RowError(file, row, spec.prompt_column, "prompt_column", "the chat template renders the prompt "
                               "differently once the response follows, so the response cannot be located",
                               "use a tokenizer whose chat template only appends turns")  # fmt: skip
            return head, full[len(head) :]
        head_t, _, tail_t = DEFAULT_CHAT_TURN_TEMPLATE.partition("{content}")
        turn = lambda m: head_t.format(role=m["role"]) + m["content"] + tail_t.format(role=m["role"])  # noqa: E731
        head = "".join(turn(m) for m in messages) + head_t.format(role="assistant")
        body = "".join(m["content"] + tail_t.format(role="assistant") for m in response)
        return head, body

    def prompt(self, text: str) -> tuple[list[int], bool]:
        ids = self._ids(text) or list(self.start)  # an empty prompt: the first response token needs a context
        limit = self.spec.max_prompt_length
        if limit is not None and len(ids) > limit:
            return ids[-limit:], True
        return ids, False

    def response(self, prompt_ids: list[int], text: str, file: Path, row: int, column: str, config: str):
        ids = self._ids(text) + self.eos
        room = self.spec.max_length - len(prompt_ids)
        if room < 1 or not self._ids(text):
            problem = "is empty" if not self._ids(text) else (
                f"has no token left after truncation (the prompt takes {len(prompt_ids)} of max_length="
                f"{self.spec.max_length} tokens)")  # fmt: skip
            fix = ("give every row a non-empty response" if not self._ids(text) else
                   "raise data.init_args.max_length or lower data.init_args.max_prompt_length")  # fmt: skip
            raise RowError(file, row, column, config, problem, fix)
        return ids[:room], len(ids) > room

    def __call__(self, raw: dict, file: Path, row: int) -> dict[str, Any]:
        spec = self.spec
        for column, config in spec.columns().items():
            if raw.get(column) is None or (isinstance(raw[column], str) and column != spec.prompt_column
                                          and not raw[column].strip()):  # fmt: skip
                raise RowError(file, row, column, config, "is missing or empty",
                               f"give every row a {column!r} field, or point data.init_args.{config} at the right "
                               "column")  # fmt: skip
        if spec.format == "unpaired":
            label = raw[spec.label_column]
            if not isinstance(label, bool):
                raise RowError(file, row, spec.label_column, "label_column", f"{label!r} is not true or false",
                               "write label as a JSON boolean (true: desirable)")  # fmt: skip
            head, body = self._render(raw[spec.prompt_column], raw[spec.completion_column], file, row)
            prompt, cut = self.prompt(head)
            completion, cut_c = self.response(prompt, body, file, row, spec.completion_column, "completion_column")
            return {"prompt_ids": prompt, "completion_ids": completion, "desirable": label,
                    "length": len(prompt) + len(completion), "truncated": int(cut or cut_c)}  # fmt: skip
        head, chosen_text = self._render(raw[spec.prompt_column], raw[spec.chosen_column], file, row)
        head_r, rejected_text = self._render(raw[spec.prompt_column], raw[spec.rejected_column], file, row)
        prompt, cut = self.prompt(head)
        chosen, cut_c = self.response(prompt, chosen_text, file, row, spec.chosen_column, "chosen_column")
        rejected, cut_r = self.response(prompt, rejected_text, file, row, spec.rejected_column, "rejected_column")
        length = len(prompt) + max(len(chosen), len(rejected))
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "length": length,
                "truncated": int(cut or cut_c or cut_r)}  # fmt: skip


def tokenize_files(spec: PreferenceSpec, files: list[Path], tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Tokenize every row of ``files`` (file by file, so an error names its file and row)."""
    tokenize_row = RowTokenizer(spec, tokenizer)
    parts = []
    for file in files:
        raw = datasets.load_dataset(sources.ROW_FILE_BUILDERS[file.suffix], data_files=str(file), split="train")
        missing = [c for c in spec.columns() if c not in raw.column_names]
        if missing:
            config = spec.columns()[missing[0]]
            raise ConfigError(
                f"{FIELD}.{config}",
                f"{file} has no field {missing[0]!r} (fields: {raw.column_names})",
                f"set data.init_args.{config} to one of {raw.column_names}",
            )
        parts.append(datasets.Dataset.from_list([tokenize_row(r, file, i + 1) for i, r in enumerate(raw)]))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def build(spec: PreferenceSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.DatasetDict, dict]:
    """Tokenized ``train`` (and ``validation``) splits and their counts."""
    out = sources.train_validation_splits(
        lambda path: tokenize_files(spec, spec.files(path), tokenizer),
        spec.path, spec.validation_path, spec.val_fraction, spec.seed,
    )  # fmt: skip
    counts = {"rows": {k: len(v) for k, v in out.items()}, "truncated": sum(sum(v["truncated"]) for v in out.values())}
    return datasets.DatasetDict(out), counts


@dataclass
class PreferenceCollator:
    """Pad preference rows into a batch (see the module docstring).

    Args:
        pad_token_id: written into padded positions (masked).
        unpaired: KTO examples instead of pairs.
        max_length: KTO's mismatched ``kl_*`` rows are cut to this many tokens.
        pad_to_multiple_of: round the padded length up to this.
        encoder_decoder: prompt -> source ``input_ids [B, S]``, response -> target ``labels [B, T]`` (seq2seq
            batches) instead of one ``[B, T]`` sequence with ``-100`` on the prompt.
    """

    pad_token_id: int
    unpaired: bool = False
    max_length: int | None = None
    pad_to_multiple_of: int = 8
    encoder_decoder: bool = False

    def _pad(self, seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        if self.encoder_decoder:
            return Seq2SeqCollator(self.pad_token_id)([{"input_ids": p, "labels": r} for p, r in seqs])
        rows = [{"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r} for p, r in seqs]
        return PadCollator(self.pad_token_id, self.pad_to_multiple_of)(rows)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.unpaired:
            batch = self._pad([(r["prompt_ids"], r["completion_ids"]) for r in rows])
            batch["desirable"] = torch.tensor([bool(r["desirable"]) for r in rows])
            n = len(rows)
            kl = []
            for i, r in enumerate(rows):  # each prompt with the next example's completion (TRL's KL rows)
                completion = rows[(i + 1) % n]["completion_ids"]
                room = len(completion) if self.max_length is None else self.max_length - len(r["prompt_ids"])
                kl.append((r["prompt_ids"], completion[: max(room, 1)]))
            batch.update({f"kl_{k}": v for k, v in self._pad(kl).items()})
            if REF_KEY in rows[0]:
                batch[REF_KEY] = torch.tensor([r[REF_KEY] for r in rows], dtype=torch.float32)
            return batch
        seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
        batch = self._pad(seqs)
        if REF_KEY in rows[0]:
            batch[REF_KEY] = torch.tensor([r[REF_KEY][0] for r in rows] + [r[REF_KEY][1] for r in rows])
        return batch


class PreferenceDataModule(PreparedRowsDataModule):
    """Preference pairs (or KTO examples) from local files, tokenized once and cached, with resumable sampling.

    Args:
        tokenizer: hub id, local folder or :class:`~litune.data.tokenizer.TrainedBPE` (linked from ``model.tokenizer``).
        path: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, folder or glob of training rows, or ``stdlib``
            (pairs built from the Python standard library's source, :mod:`litune.preference.stdlib_pairs`).
        validation_path: local files of held-out rows; ``None`` holds out ``val_fraction`` of ``path``'s rows.
        format: ``pairs`` (prompt/chosen/rejected, text or chat messages) or ``unpaired`` (KTO:
            prompt/completion/label).
        prompt_column: the prompt field.
        chosen_column: the preferred response field.
        rejected_column: the dispreferred response field.
        completion_column: KTO's response field.
        label_column: KTO's desirable flag (a JSON boolean).
        max_prompt_length: longer prompts keep their last tokens; ``None``: whole prompts.
        max_length: prompt plus response tokens; longer responses keep their first tokens.
        val_fraction: rows held out for validation when no ``validation_path`` is given (deterministic by ``seed``).
        batch_size: pairs (KTO: examples) per micro-batch per device.
        num_workers: DataLoader worker processes.
        seed: seed of the hold-out and the shuffle order.
        shuffle: shuffle training rows every epoch.
        pad_to_multiple_of: pad batches to a multiple of this.
        cache_dir: cache root (default ``$LITUNE_CACHE`` or ``~/.cache/litune``).
        encoder_decoder: batches for an encoder-decoder (``Seq2SeqLM``): prompts as the encoder's source, responses
            as the decoder's targets (the tokenized rows and their cache are the same).
    """

    def __init__(
        self,
        tokenizer: TokenizerSource,
        path: str,
        validation_path: str | None = None,
        format: Literal["pairs", "unpaired"] = "pairs",
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        completion_column: str = "completion",
        label_column: str = "label",
        max_prompt_length: int | None = 128,
        max_length: int = 256,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        pad_to_multiple_of: int = 8,
        cache_dir: str | None = None,
        encoder_decoder: bool = False,
    ) -> None:
        spec = PreferenceSpec(
            path, validation_path, format, prompt_column, chosen_column, rejected_column, completion_column,
            label_column, max_prompt_length, max_length, val_fraction, seed,
        )  # fmt: skip
        self._init_rows(
            spec, tokenizer, block_size=max_length, batch_size=batch_size,
            batch_size_fix="use a positive micro batch size", num_workers=num_workers, seed=seed, shuffle=shuffle,
            pad_to_multiple_of=pad_to_multiple_of, cache_dir=cache_dir,
        )  # fmt: skip
        self._reference_attached: str | None = None
        self.encoder_decoder = encoder_decoder

    cached_what = "preference data"
    cache_namespace = "preference"

    def build_rows(self) -> tuple[datasets.DatasetDict, dict]:
        return build(self.spec, self.tokenizer)

    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(
            self.tokenizer.pad_token_id,
            self.spec.format == "unpaired",
            self.spec.max_length,
            self.pad_to_multiple_of,
            self.encoder_decoder,
        )

    def attach_reference_logps(self, compute, fingerprint: str) -> None:
        """Add the reference's log-probs to every row (``ref_logps``): read from the cache folder's
        ``reference-<fingerprint>`` when there, else computed by ``compute`` (``batch -> [rows]``) in one pass on
        global rank 0 and saved there (other ranks wait and read them).

        Args:
            compute: ``batch -> [rows]`` float32 reference log-probs of a collated batch.
            fingerprint: a hash of the reference's weights (:func:`litune.preference.reference.weights_fingerprint`).
        """
        if self.spec.format == "unpaired":
            raise ConfigError(
                "model.preference.reference",
                "reference=precomputed is not available for KTO (its reference point uses rows mixed per batch)",
                "use reference: copy or adapters",
            )
        if self._reference_attached == fingerprint:
            return
        self.setup("fit")
        folder = Path(self.stats["cache_folder"]) / f"reference-{fingerprint}"
        trainer = getattr(self, "trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        if rank == 0 and not (folder / "done").is_file():
            self._compute_reference(compute, folder)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("reference-logps")
        splits = {"train": self.train_set, "validation": self.val_set}
        for split, rows in splits.items():
            if rows is not None:
                values = torch.load(folder / f"{split}.pt").tolist()
                setattr(self, "train_set" if split == "train" else "val_set", rows.add_column(REF_KEY, values))
        self._reference_attached = fingerprint

    def _compute_reference(self, compute, folder: Path) -> None:
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        collate = PreferenceCollator(self.tokenizer.pad_token_id, False, self.spec.max_length, self.pad_to_multiple_of)
        for split, rows in (("train", self.train_set), ("validation", self.val_set)):
            if rows is None:
                continue
            values = []
            for start in range(0, len(rows), self.batch_size):
                chunk = [rows[i] for i in range(start, min(start + self.batch_size, len(rows)))]
                logps = compute(collate(chunk))
                p = len(chunk)
                values.append(torch.stack([logps[:p], logps[p:]], dim=1))
            torch.save(torch.cat(values), tmp / f"{split}.pt")
        (tmp / "done").write_text(json.dumps({"rows": {"train": len(self.train_set)}}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
