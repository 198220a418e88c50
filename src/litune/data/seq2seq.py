"""Sequence-to-sequence data from local files: source/target pairs for the encoder-decoder.

:class:`Seq2SeqDataModule` reads JSON Lines / CSV / Parquet files with a source and a target column (names
configurable) through :mod:`~litune.data.sources`, tokenizes the two columns separately
(:func:`~litune.data.formats.tokenize_pairs`), splits off a validation set when none is given, and pads per batch
(:class:`~litune.data.collate.Seq2SeqCollator`) into the seq2seq batch of the contract: ``input_ids``/``attention_mask``
for the source and ``labels`` for the target (``-100`` on padding, EOS at the end).

The synthetic task lives in :mod:`litune.data.synthetic`, its tokenizer in :mod:`litune.data.tokenizer`.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from litune.data.collate import Seq2SeqCollator
from litune.data.formats import tokenize_pairs
from litune.data.sampler import data_rank_world, even_eval_shards
from litune.data.sources import load_local, resolve_local_files
from litune.data.tokenizer import TokenizerSource, load_tokenizer
from litune.errors import ConfigError, check_at_least_one

__all__ = ["Seq2SeqDataModule"]


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
        sizes = {  # every one >= 1
            "max_source_length": max_source_length,
            "max_target_length": max_target_length,
            "batch_size": batch_size,
        }
        check_at_least_one("data.init_args", sizes, "use e.g. 128")
        self.tokenizer_source = tokenizer
        self.path, self.validation_path = path, validation_path
        self.source_column, self.target_column = source_column, target_column
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.val_fraction, self.batch_size, self.num_workers, self.seed = val_fraction, batch_size, num_workers, seed

    @property
    def block_size(self) -> int:
        return max(self.max_source_length, self.max_target_length)

    def _load(self, path: str, field: str):
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
        return ds.map(
            tokenize_pairs,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs={
                "tokenizer": tokenizer,
                "source_column": self.source_column,
                "target_column": self.target_column,
                "max_source_length": self.max_source_length,
                "max_target_length": self.max_target_length,
            },
        )

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
        trainer = getattr(self, "trainer", None)
        rank, world = data_rank_world(trainer)
        dataset, sampler = even_eval_shards(self.val_set, rank, world)  # padding rows weigh nothing
        return DataLoader(
            dataset, self.batch_size, sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
