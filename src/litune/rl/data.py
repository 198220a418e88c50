"""Prompts for online RL (GRPO): a prompt column, and any other columns passed on to the reward functions.

Rows come from local JSON Lines, JSON, CSV or Parquet files. The prompt is text, or a list of chat messages rendered
with the tokenizer's chat template (``add_generation_prompt``) or, without one, litune's per-turn template. Prompts
are tokenized once into the data cache (:func:`litune.data.cache.prepare` / :func:`~litune.data.cache.open_prepared`,
keyed by the files, the tokenizer and these settings); a prompt longer than ``max_prompt_length`` keeps its end.
Every other column of a row (e.g. ``answer``) is kept as it is and reaches the reward functions as a keyword
argument, one value per completion. A row without a prompt is refused with its file, row and field
(:func:`litune.data.rows.row_error`).

Batches (:class:`PromptCollator`): ``input_ids``/``attention_mask`` ``[P, T]`` *left*-padded (generation continues
every row at the same position), ``row`` ``[P]`` each prompt's row id (seeds its completions), ``prompts`` the ``P``
prompt texts and ``columns`` the other columns, ``{name: [P values]}``.

With ``model.rl.num_iterations = k > 1`` the optimizer steps ``k`` times on each batch of rollouts: the objective
sets :attr:`PromptDataModule.rollout_reuse` and the training loader then yields each optimizer step's micro-batches
``k`` times in a row (:class:`RepeatedWindows`), as TRL's ``RepeatSampler`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from litune.data import sources
from litune.data.formats import DEFAULT_CHAT_TURN_TEMPLATE
from litune.data.rows import locate, row_error
from litune.data.text import PreparedRowsDataModule
from litune.data.tokenizer import DEFAULT_CACHE, TokenizerSource
from litune.errors import ConfigError
from litune.preference.stdlib_pairs import STDLIB_PAIRS, stdlib_pairs_file

FIELD = "data.init_args"
ROW = "_row"
"""Column of each prompt's row id (its position in the tokenized rows of its split)."""


@dataclass
class PromptSpec:
    """Everything that decides the tokenized prompts (the cache key)."""

    path: str
    validation_path: str | None = None
    prompt_column: str = "prompt"
    max_prompt_length: int = 128
    val_fraction: float = 0.05
    seed: int = 42
    streaming: bool = False  # read by TextDataModule's loaders: prompts are always in the cache

    def __post_init__(self) -> None:
        if not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1:
            raise ConfigError(f"{FIELD}.max_prompt_length", f"{self.max_prompt_length!r} is not >= 1", "use e.g. 128")
        sources.check_row_split_fields(self.files, self.path, self.validation_path, self.val_fraction)

    def files(self, path: str, name: str = "path") -> list[Path]:
        if path == STDLIB_PAIRS:  # the preference quickstart's rows: a few lines of standard-library code each
            return [stdlib_pairs_file(DEFAULT_CACHE)]
        return sources.local_row_files(path, f"{FIELD}.{name}")

    def key(self) -> dict:
        key = {"prompts": asdict(self), "files": sources.files_fingerprint(self.files(self.path))}
        if self.validation_path is not None:
            key["validation_files"] = sources.files_fingerprint(self.files(self.validation_path, "validation_path"))
        return key


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str | None:
    """The text of a prompt: itself, or chat messages rendered up to the assistant's turn; None if neither."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return None
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    head, _, tail = DEFAULT_CHAT_TURN_TEMPLATE.partition("{content}")
    turns = "".join(head.format(role=m["role"]) + m["content"] + tail.format(role=m["role"]) for m in prompt)
    return turns + head.format(role="assistant")


def tokenize_files(spec: PromptSpec, files: list[Path], tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Tokenize every prompt of ``files`` (file by file, so an error names its file and row); keep the other columns."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    for file in files:
        raw = datasets.load_dataset(sources.ROW_FILE_BUILDERS[file.suffix], data_files=str(file), split="train")
        if spec.prompt_column not in raw.column_names:
            raise ConfigError(
                f"{FIELD}.prompt_column",
                f"{file} has no field {spec.prompt_column!r} (fields: {raw.column_names})",
                f"set data.init_args.prompt_column to one of {raw.column_names}",
            )
        for index, row in enumerate(raw):
            text = render_prompt(tokenizer, row[spec.prompt_column])
            if text is None:
                raise row_error(
                    f"{FIELD}.prompt_column", locate([file], str(file), index), spec.prompt_column,
                    "is not text or chat messages", "give every row a prompt (text, or a list of {role, content})",
                )  # fmt: skip
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids = (ids or ([start] if start is not None else []))[-spec.max_prompt_length :]
            rows.append({**row, "prompt_text": text, "prompt_ids": ids, "length": len(ids)})
    return datasets.Dataset.from_list(rows)


def build(spec: PromptSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.DatasetDict, dict]:
    """Tokenized ``train`` (and ``validation``) prompts, each with its row id, and their counts."""
    out = sources.train_validation_splits(
        lambda path: tokenize_files(spec, spec.files(path), tokenizer),
        spec.path, spec.validation_path, spec.val_fraction, spec.seed,
    )  # fmt: skip
    out = {name: rows.add_column(ROW, list(range(len(rows)))) for name, rows in out.items()}
    return datasets.DatasetDict(out), {"rows": {k: len(v) for k, v in out.items()}}


@dataclass
class PromptCollator:
    """Left-pad prompts into a batch (see the module docstring).

    Args:
        pad_token_id: written into padded positions (masked).
        prompt_column: the column holding the prompt as given (left out of ``columns``).
    """

    pad_token_id: int
    prompt_column: str = "prompt"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["prompt_ids"])
            ids[i, width - n :] = torch.tensor(r["prompt_ids"], dtype=torch.long)
            mask[i, width - n :] = 1
        skip = {"prompt_ids", "prompt_text", "length", ROW, self.prompt_column}
        columns = {k: [r[k] for r in rows] for k in rows[0] if k not in skip}
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "row": torch.tensor([r[ROW] for r in rows], dtype=torch.long),
            "prompts": [r["prompt_text"] for r in rows],
            "columns": columns,
        }


class RepeatedWindows(Sampler[list[int]]):
    """Batches of ``sampler``'s indices, each run of ``window`` consecutive batches (one optimizer step's
    micro-batches) yielded ``repeats`` times in a row (``model.rl.num_iterations``).

    An epoch's last, incomplete run of batches is dropped (when there is a complete one): repeated, it would not line
    up with Lightning's accumulation windows, which restart at every epoch.

    Args:
        sampler: the row sampler (this rank's rows, in order).
        batch_size: rows per batch.
        window: batches per optimizer step (``accumulate_grad_batches``).
        repeats: how many optimizer steps use each window's rollouts.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, window: int, repeats: int, done: int = 0) -> None:
        self.sampler, self.batch_size, self.window, self.repeats = sampler, batch_size, window, repeats
        self.done = done  # repeats of the first window already trained on (a resume in the middle of them)

    def _batches(self) -> int:
        n = math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]
        return n - n % self.window if n >= self.window else n

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        batches = batches[: self._batches()]
        done, self.done = self.done, 0  # only the first pass after a resume skips them
        for start in range(0, len(batches), self.window):
            for _ in range(self.repeats - (done if start == 0 else 0)):
                yield from batches[start : start + self.window]

    def __len__(self) -> int:
        return self._batches() * self.repeats - self.done * min(self.window, self._batches())


class PromptDataModule(PreparedRowsDataModule):
    """Prompts (and reward columns) from local files, tokenized once and cached, with resumable sampling.

    Args:
        tokenizer: hub id, local folder or :class:`~litune.data.tokenizer.TrainedBPE` (linked from ``model.tokenizer``).
        path: a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, folder or glob of prompt rows, or ``stdlib``
            (prompts of a few lines of the Python standard library's source, :mod:`litune.preference.stdlib_pairs`;
            their ``chosen`` column is the line that follows).
        validation_path: local files of held-out prompts; ``None`` holds out ``val_fraction`` of ``path``'s rows.
        prompt_column: the prompt field (text, or chat messages); every other field goes to the reward functions.
        max_prompt_length: longer prompts keep their last tokens.
        val_fraction: rows held out for validation when no ``validation_path`` is given (deterministic by ``seed``).
        batch_size: prompts per micro-batch per device (each gets ``model.rl.num_generations`` completions).
        num_workers: DataLoader worker processes.
        seed: seed of the hold-out and the shuffle order.
        shuffle: shuffle training rows every epoch.
        cache_dir: cache root (default ``$LITUNE_CACHE`` or ``~/.cache/litune``).
    """

    def __init__(
        self,
        tokenizer: TokenizerSource,
        path: str,
        validation_path: str | None = None,
        prompt_column: str = "prompt",
        max_prompt_length: int = 128,
        val_fraction: float = 0.05,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        spec = PromptSpec(path, validation_path, prompt_column, max_prompt_length, val_fraction, seed)
        self._init_rows(
            spec, tokenizer, block_size=max_prompt_length, batch_size=batch_size,
            batch_size_fix="use a positive number of prompts", num_workers=num_workers, seed=seed, shuffle=shuffle,
            pad_to_multiple_of=1, cache_dir=cache_dir,
        )  # fmt: skip
        self.rollout_reuse: tuple[int, int] = (1, 1)  # (micro-batches per optimizer step, num_iterations)
        self._repeats_done = 0  # a resume in the middle of a window's repeats: how many were trained on

    cached_what = "prompts"

    def build_rows(self) -> tuple[datasets.DatasetDict, dict]:
        return build(self.spec, self.tokenizer)

    def collator(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id, self.spec.prompt_column)

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        window, repeats = self.rollout_reuse
        if repeats == 1:
            return loader
        done, self._repeats_done = self._repeats_done, 0
        batches = RepeatedWindows(loader.sampler, self.batch_size, window, repeats, done)
        return DataLoader(self.train_set, batch_sampler=batches, collate_fn=loader.collate_fn,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`TextDataModule.state_dict`, counting each repeated window's rows once: ``rows_consumed`` stops at
        the current window, and ``repeats_done`` says how many of its repeats were trained on."""
        state = super().state_dict()
        window, repeats = self.rollout_reuse
        if state and repeats > 1:
            processed = state["rows_consumed"] // (self.batch_size * self._rank_world()[1])
            cycles, rest = divmod(processed, window * repeats)
            state["rows_consumed"] = cycles * window * self.batch_size * self._rank_world()[1]
            state["repeats_done"] = rest // window
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._repeats_done = int(state_dict.get("repeats_done", 0)) if state_dict else 0
