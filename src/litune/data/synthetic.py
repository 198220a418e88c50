"""A synthetic sequence-to-sequence task generated locally: reverse, sort or copy a sequence of symbols.

:class:`SyntheticSeq2SeqDataModule` generates the pairs with a fixed seed (no download, no tokenizer training) and
yields the seq2seq batch of the contract. Its vocabulary is :class:`litune.data.tokenizer.SymbolTokenizer`, a real
Hugging Face tokenizer (``<pad> <s> </s> <unk> 0 1 2 ...``), so ``litune generate --prompt "3 1 2"`` works on the
checkpoint.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from litune.data.collate import Seq2SeqCollator
from litune.data.sampler import data_rank_world, even_eval_shards
from litune.data.tokenizer import SymbolTokenizer, TokenizerSource
from litune.errors import NETWORK_ARGS, ConfigError, check_at_least_one

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
        symbols = torch.randint(
            len(SymbolTokenizer.SPECIALS), len(SymbolTokenizer.SPECIALS) + num_symbols, (n, max_length), generator=g
        )
        self.rows = []
        for length, row in zip(lengths.tolist(), symbols, strict=True):
            src = row[:length]
            self.rows.append(
                {"input_ids": src, "labels": torch.cat([TASKS[task](src), torch.tensor([SymbolTokenizer.EOS_ID])])}
            )

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
        sizes = {  # every one >= 1
            "num_symbols": num_symbols,
            "min_length": min_length,
            "num_train": num_train,
            "num_val": num_val,
            "batch_size": batch_size,
        }
        check_at_least_one("data.init_args", sizes, "use a positive number")
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
                f"use litune.data.tokenizer.SymbolTokenizer with num_symbols: {num_symbols}, or no tokenizer",
            )
        self.task, self.num_symbols, self.batch_size, self.seed = task, num_symbols, batch_size, seed
        self.min_length, self.max_length = min_length, max_length
        self.num_train, self.num_val = num_train, num_val
        self.vocab_size = len(SymbolTokenizer.SPECIALS) + num_symbols
        self.collate = Seq2SeqCollator(SymbolTokenizer.PAD_ID)

    @property
    def block_size(self) -> int:
        """The longest sequence either side of the network sees (the target, with EOS)."""
        return self.max_length + 1

    def setup(self, stage: str | None = None) -> None:
        network = getattr(self.trainer.lightning_module, "network", None) if self.trainer is not None else None
        if network is not None and getattr(network, "vocab_size", self.vocab_size) < self.vocab_size:
            raise ConfigError(
                f"{NETWORK_ARGS}.vocab_size",
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
        trainer = getattr(self, "trainer", None)
        rank, world = data_rank_world(trainer)
        dataset, sampler = even_eval_shards(self.val_set, rank, world)  # padding rows weigh nothing
        return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
