"""Sequence-to-sequence data: source/target pairs from local files, and a synthetic task generated locally.

Both data modules yield the seq2seq batch of the contract: ``input_ids``/``attention_mask`` for the source and
``labels`` for the target (``-100`` on padding, EOS at the end), padded per batch to the longest row.

- :class:`Seq2SeqDataModule` reads JSON Lines / CSV / Parquet files with a source and a target column (names
  configurable), tokenizes the two columns separately, and splits off a validation set when none is given.
- :class:`SyntheticSeq2SeqDataModule` generates a task over ``num_symbols`` symbols (reverse, sort or copy a
  sequence) with a fixed seed: no download, no tokenizer training. :class:`SymbolTokenizer` is its vocabulary as a real
  Hugging Face tokenizer (``<pad> <s> </s> <unk> 0 1 2 ...``), so ``litune generate --prompt "3 1 2"`` works on the
  checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune.tokenizer import TokenizerBuilder, TokenizerSource, load_tokenizer

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
"""The synthetic task's special ids: padding, decoder start, end of target, unknown word. Symbols follow them."""


class SymbolTokenizer(TokenizerBuilder):
    """The synthetic task's vocabulary as a Hugging Face tokenizer: ``<pad> <s> </s> <unk>`` then the symbols
    ``0 1 2 ...``, split on whitespace. Nothing is trained or cached: :meth:`load` builds the word-level tokenizer.

    Args:
        num_symbols: how many symbols the task uses.
    """

    def __init__(self, num_symbols: int = 10) -> None:
        if num_symbols < 2:
            raise ConfigError("model.tokenizer.init_args.num_symbols", f"num_symbols={num_symbols} < 2", "use >= 2")
        self.num_symbols = num_symbols
        self.vocab_size = len(SPECIALS) + num_symbols

    def load(self) -> PreTrainedTokenizerFast:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate([*SPECIALS, *map(str, range(self.num_symbols))])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[UNK_ID]))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=SPECIALS[PAD_ID],
            bos_token=SPECIALS[BOS_ID],
            eos_token=SPECIALS[EOS_ID],
            unk_token=SPECIALS[UNK_ID],
        )

    def __repr__(self) -> str:
        return f"SymbolTokenizer(num_symbols={self.num_symbols})"


@dataclass
class Seq2SeqCollator:
    """Pad source and target rows separately, on the right, to the longest row of the batch.

    Written by hand (with ``pad_sequence``) rather than with ``transformers.DataCollatorForSeq2Seq`` because the
    synthetic task has no tokenizer to pad with.

    Args:
        pad_token_id: id written into padded source positions (they are masked by ``attention_mask``).
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int] | torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rows with ``input_ids`` and ``labels`` -> ``input_ids [B,S]``, ``attention_mask [B,S]``, ``labels [B,T]``."""
        src = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        tgt = [torch.as_tensor(r["labels"], dtype=torch.long) for r in rows]
        input_ids = pad_sequence(src, batch_first=True, padding_value=self.pad_token_id)
        mask = pad_sequence([torch.ones_like(s) for s in src], batch_first=True, padding_value=0)
        labels = pad_sequence(tgt, batch_first=True, padding_value=IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


TASKS = {
    "reverse": lambda x: x.flip(0),
    "sort": lambda x: x.sort().values,
    "copy": lambda x: x,
}


class SyntheticPairs(Dataset):
    """``n`` seeded random pairs: a source of ``min_length..max_length`` symbols and its ``task`` transform + EOS."""

    def __init__(self, task: str, n: int, num_symbols: int, min_length: int, max_length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
        symbols = torch.randint(len(SPECIALS), len(SPECIALS) + num_symbols, (n, max_length), generator=g)
        self.rows = []
        for length, row in zip(lengths.tolist(), symbols, strict=True):
            src = row[:length]
            self.rows.append({"input_ids": src, "labels": torch.cat([TASKS[task](src), torch.tensor([EOS_ID])])})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


class SyntheticSeq2SeqDataModule(L.LightningDataModule):
    """A locally generated seq2seq task that a small Transformer learns to near-perfect accuracy in minutes on CPU.

    Args:
        task: ``reverse`` the source, ``sort`` it, or ``copy`` it.
        num_symbols: alphabet size (token ids from 4; ``0/1/2/3`` are pad / start / EOS / unknown).
        min_length: shortest source.
        max_length: longest source (targets are one longer, with EOS).
        num_train: training pairs.
        num_val: validation pairs (drawn with another seed; the same pair may occur in both by chance).
        batch_size: pairs per batch.
        seed: seed of the generator.
        tokenizer: set by the CLI from ``model.tokenizer``; when given it must be
            ``SymbolTokenizer(num_symbols=num_symbols)``, so the ids here and in ``litune generate`` agree.
    """

    def __init__(
        self,
        task: Literal["reverse", "sort", "copy"] = "reverse",
        num_symbols: int = 10,
        min_length: int = 4,
        max_length: int = 12,
        num_train: int = 20_000,
        num_val: int = 512,
        batch_size: int = 64,
        seed: int = 0,
        tokenizer: TokenizerSource | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError("data.init_args.task", f"unknown task {task!r}", f"use one of {sorted(TASKS)}")
        sizes = {
            "num_symbols": num_symbols,
            "min_length": min_length,
            "num_train": num_train,
            "num_val": num_val,
            "batch_size": batch_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"data.init_args.{name}", f"{name}={value} must be >= 1", "use a positive number")
        if max_length < min_length:
            raise ConfigError(
                "data.init_args.max_length", f"max_length={max_length} < min_length={min_length}", "raise max_length"
            )
        if tokenizer is not None and not (
            isinstance(tokenizer, SymbolTokenizer) and tokenizer.num_symbols == num_symbols
        ):
            raise ConfigError(
                "model.tokenizer",
                f"the synthetic task with num_symbols={num_symbols} got tokenizer {tokenizer!r}",
                f"use litune.data.seq2seq.SymbolTokenizer with num_symbols: {num_symbols}, or no tokenizer",
            )
        self.task, self.num_symbols, self.batch_size, self.seed = task, num_symbols, batch_size, seed
        self.min_length, self.max_length = min_length, max_length
        self.num_train, self.num_val = num_train, num_val
        self.vocab_size = len(SPECIALS) + num_symbols
        self.collate = Seq2SeqCollator(PAD_ID)

    @property
    def block_size(self) -> int:
        """The longest sequence either side of the network sees (the target, with EOS)."""
        return self.max_length + 1

    def setup(self, stage: str | None = None) -> None:
        network = getattr(self.trainer.lightning_module, "network", None) if self.trainer is not None else None
        if network is not None and getattr(network, "vocab_size", self.vocab_size) < self.vocab_size:
            raise ConfigError(
                "model.network.init_args.vocab_size",
                f"the synthetic task uses {self.vocab_size} token ids but the network's vocab_size is "
                f"{network.vocab_size}",
                f"set vocab_size >= {self.vocab_size} (4 special ids + num_symbols)",
            )
        args = (self.task, self.num_symbols, self.min_length, self.max_length)
        self.train_set = SyntheticPairs(args[0], self.num_train, *args[1:], seed=self.seed)
        self.val_set = SyntheticPairs(args[0], self.num_val, *args[1:], seed=self.seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, collate_fn=self.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class Seq2SeqDataModule(L.LightningDataModule):
    """Source/target pairs from local files, tokenized separately and padded per batch.

    Args:
        tokenizer: the tokenizer (the CLI copies ``model.tokenizer`` here).
        path: a JSON Lines, CSV or Parquet file (or a folder / glob of them) with the two columns.
        validation_path: a file with validation pairs; ``None`` splits ``val_fraction`` off ``path``.
        source_column: column holding the source text.
        target_column: column holding the target text.
        max_source_length: longer sources are truncated to this many tokens.
        max_target_length: longer targets are truncated to this many tokens (EOS included).
        val_fraction: share of ``path`` held out when ``validation_path`` is not given.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split and the shuffling.
    """

    def __init__(
        self,
        tokenizer: TokenizerSource | None = None,
        path: str = "data/pairs.jsonl",
        validation_path: str | None = None,
        source_column: str = "source",
        target_column: str = "target",
        max_source_length: int = 256,
        max_target_length: int = 256,
        val_fraction: float = 0.05,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ConfigError("model.tokenizer", "Seq2SeqDataModule needs a tokenizer", "set model.tokenizer")
        if not 0.0 < val_fraction < 1.0 and validation_path is None:
            raise ConfigError("data.init_args.val_fraction", f"{val_fraction} is outside (0, 1)", "use e.g. 0.05")
        sizes = {
            "max_source_length": max_source_length,
            "max_target_length": max_target_length,
            "batch_size": batch_size,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"data.init_args.{name}", f"{name}={value} must be >= 1", "use e.g. 128")
        self.tokenizer_source = tokenizer
        self.path, self.validation_path = path, validation_path
        self.source_column, self.target_column = source_column, target_column
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.val_fraction, self.batch_size, self.num_workers, self.seed = val_fraction, batch_size, num_workers, seed

    @property
    def block_size(self) -> int:
        return max(self.max_source_length, self.max_target_length)

    def _load(self, path: str, field: str):
        from litune.data.sources import load_local, resolve_local_files

        files = resolve_local_files(path, field)
        if files is None:
            raise ConfigError(field, f"{path} is not a local file", "give a .jsonl, .csv or .parquet file of pairs")
        ds = load_local(files, field=field)
        missing = [c for c in (self.source_column, self.target_column) if c not in ds.column_names]
        if missing:
            raise ConfigError(
                "data.init_args.source_column" if self.source_column in missing else "data.init_args.target_column",
                f"{path} has no column(s) {missing}; its columns are {ds.column_names}",
                "set source_column / target_column to the names in the file",
            )
        return ds

    def _tokenize(self, ds, tokenizer: PreTrainedTokenizerBase):
        eos = tokenizer.eos_token_id

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            # The source is encoded as `litune generate` encodes a prompt (default special tokens); the target gets
            # EOS appended so the network learns where to stop.
            src = tokenizer(batch[self.source_column], truncation=True, max_length=self.max_source_length)
            tgt = tokenizer(batch[self.target_column], add_special_tokens=False)["input_ids"]
            labels = [t[: self.max_target_length - 1] + [eos] for t in tgt]
            return {"input_ids": src["input_ids"], "labels": labels}

        return ds.map(encode, batched=True, remove_columns=ds.column_names)

    def setup(self, stage: str | None = None) -> None:
        tokenizer = load_tokenizer(self.tokenizer_source)
        if tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer", "the tokenizer has no EOS token", "use a tokenizer with an eos_token")
        self.collate = Seq2SeqCollator(tokenizer.pad_token_id)
        train = self._load(self.path, "data.init_args.path")
        if self.validation_path is not None:
            val = self._load(self.validation_path, "data.init_args.validation_path")
        else:
            if len(train) < 2:
                raise ConfigError("data.init_args.path", f"{self.path} has {len(train)} pair(s)", "give at least 2")
            split = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = split["train"], split["test"]
        self.train_set, self.val_set = self._tokenize(train, tokenizer), self._tokenize(val, tokenizer)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, collate_fn=self.collate, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def write_pairs(path: str | Path, pairs: list[tuple[str, str]], source: str = "source", target: str = "target") -> None:
    """Write ``(source, target)`` text pairs as JSON Lines (handy for tests and for preparing data)."""
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for s, t in pairs:
            fh.write(json.dumps({source: s, target: t}) + "\n")
