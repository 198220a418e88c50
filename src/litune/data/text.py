"""``TextDataModule``: causal-LM data from the hub, local files or the stdlib, tokenized once and cached.

Lightning calls ``prepare_data`` on one process per node (local rank 0) and then, after a barrier, ``setup`` on every
process. ``prepare_data`` builds the tokenized dataset into the fingerprinted cache (or finds it there); ``setup``
memory-maps it. So under DDP only rank 0 tokenizes while the others wait, and all read the same files. Lightning
waits for ``prepare_data`` at a barrier without timeout (its ``_InfiniteBarrier``), so a long tokenization does not
hit the process-group timeout; ``litune prepare`` before ``fit`` takes the work out of the training job altogether.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from litune.data import cache
from litune.data.collate import PadCollator
from litune.data.pipeline import DataSpec, Source, build, count_stats
from litune.data.sampler import ResumableSampler, data_rank_world, even_eval_shards
from litune.data.stream import SkipBatches, streaming_splits
from litune.data.tokenizer import DEFAULT_CACHE, TokenizerSource, load_tokenizer
from litune.errors import ConfigError

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    """Causal-LM batches (``input_ids``, ``attention_mask``, ``labels``, optional ``position_ids``).

    Args:
        tokenizer: hub id, local folder or :class:`~litune.data.tokenizer.TrainedBPE` (linked from ``model.tokenizer``).
        path: hub dataset id, a local ``.txt``/``.jsonl``/``.json``/``.csv``/``.parquet`` file, a folder, a glob, or
            ``"stdlib"`` (the Python standard library's source files, one document each).
        name: hub dataset config name.
        split: hub split to train on.
        validation_split: hub split name, or a local file/folder/glob, to validate on; ``None`` holds out
            ``val_fraction``. ``litune test`` evaluates on this same held-out set: to test on a test split, run it with
            ``--data.init_args.validation_split=test`` (or the test file).
        text_column: column with the text (format ``text``).
        val_fraction: fraction of documents held out for validation when no validation split is given (deterministic
            by ``seed``); 0 disables validation.
        block_size: tokens per row; must not exceed the network's context (the CLI checks).
        batch_size: micro batch per device.
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out and of the shuffle order.
        max_bytes: with ``path="stdlib"``, how many bytes of source files to use.
        sources: several sources mixed by weight (instead of ``path``); each has path, name, split, weight.
        format: ``text``, ``instruction`` (prompt/response columns, loss on the response) or ``chat`` (a messages
            column, loss on assistant turns).
        prompt_column: prompt column (format ``instruction``).
        response_column: response column (format ``instruction``).
        messages_column: conversation column (format ``chat``).
        template: instruction prompt template with ``{prompt}``, or chat turn template with ``{role}``/``{content}``
            (chat: used instead of the tokenizer's chat template).
        layout: ``concat`` (join with EOS, cut every ``block_size``), ``pack`` (bin-pack whole samples) or ``pad``
            (one sample a row).
        document_mask: emit ``position_ids`` restarting at 0 per document so attention does not cross documents.
        sample_by: for plain-text files, one sample per ``document`` (file), ``paragraph`` or ``line``.
        skip_bad_rows: drop non-UTF-8 / malformed JSON lines (counted) instead of failing.
        overlong: samples longer than ``block_size`` in ``pack``/``pad``: ``truncate`` (and count) or ``error``.
        streaming: read the sources lazily (``datasets`` streaming); no cache, no ``pack`` layout.
        shuffle: shuffle training rows every epoch.
        group_by_length: batch rows of similar length together (less padding with ``layout=pad``).
        pad_to_multiple_of: pad batches to a multiple of this.
        num_proc: processes for tokenization (``datasets.map(num_proc=...)``).
        cache_dir: cache root (default ``$LITUNE_CACHE`` or ``~/.cache/litune``); data goes to ``<cache_dir>/data``.
    """

    def __init__(
        self,
        tokenizer: TokenizerSource,
        path: str = "stdlib",
        name: str | None = None,
        split: str = "train",
        validation_split: str | None = None,
        text_column: str = "text",
        val_fraction: float = 0.05,
        block_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        max_bytes: int | None = None,
        sources: list[Source] | None = None,
        format: Literal["text", "instruction", "chat"] = "text",
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str = "messages",
        template: str | None = None,
        layout: Literal["concat", "pack", "pad"] = "concat",
        document_mask: bool = False,
        sample_by: Literal["document", "paragraph", "line"] = "document",
        skip_bad_rows: bool = False,
        overlong: Literal["truncate", "error"] = "truncate",
        streaming: bool = False,
        shuffle: bool = True,
        group_by_length: bool = False,
        pad_to_multiple_of: int = 8,
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(
                "data.init_args.batch_size", f"{batch_size} is not >= 1", "use a positive micro batch size"
            )
        if num_workers < 0:
            raise ConfigError("data.init_args.num_workers", f"{num_workers} is negative", "use 0 or more")
        if num_workers > 4 * (os.cpu_count() or 1):
            raise ConfigError(
                "data.init_args.num_workers",
                f"{num_workers} worker processes on a machine with {os.cpu_count()} CPUs",
                f"use at most {4 * (os.cpu_count() or 1)} (0 loads in the training process)",
            )
        if pad_to_multiple_of < 1:
            raise ConfigError(
                "data.init_args.pad_to_multiple_of", f"{pad_to_multiple_of} is not >= 1", "use 8, or 1 to disable"
            )
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError("data.init_args.max_bytes", f"{max_bytes} is not >= 1", "use null for all of it")
        self.cache_root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.spec = DataSpec(
            sources=sources or [Source(path, name=name, split=split)],
            validation=validation_split,
            format=format,
            text_column=text_column,
            prompt_column=prompt_column,
            response_column=response_column,
            messages_column=messages_column,
            template=template,
            layout=layout,
            document_mask=document_mask,
            block_size=block_size,
            val_fraction=val_fraction,
            seed=seed,
            max_bytes=max_bytes,
            sample_by=sample_by,
            skip_bad_rows=skip_bad_rows,
            overlong=overlong,
            streaming=streaming,
            num_proc=num_proc,
            hf_cache_dir=str(self.cache_root / "hf"),
        )
        self.tokenizer_source = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_set: datasets.Dataset | datasets.IterableDataset | None = None
        self.val_set: datasets.Dataset | datasets.IterableDataset | None = None
        self.stats: dict[str, Any] = {}
        self.cache_hit: bool | None = None  # False: this process tokenized; True: it found the data in the cache
        self._resume: dict[str, int] | None = None
        self._cache_key: dict | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The loaded tokenizer (with a pad token; see :func:`litune.data.tokenizer.load_tokenizer`)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return self._tokenizer

    def cache_folder(self) -> Path:
        """Where this spec's tokenized data lives for this tokenizer."""
        return cache.cache_folder(self.cache_root, self._key())

    def _key(self) -> dict:
        # Computed once per module: hashing the tokenizer and listing the files is not free, and prepare_data and
        # setup must agree on the folder anyway.
        if self._cache_key is None:
            self._cache_key = cache.cache_key(self.spec.key(), self.tokenizer)
        return self._cache_key

    def prepare_data(self) -> None:
        """Tokenize into the cache unless an identical build is there (local rank 0 only, under Lightning)."""
        if self.spec.streaming:
            return
        self.cache_hit = cache.prepare(self.cache_root, self._key(), lambda: build(self.spec, self.tokenizer), "data")

    def setup(self, stage: str | None = None) -> None:
        """Load the cached rows (every rank), or wire the streaming pipeline."""
        if self.train_set is not None:
            return
        if self.spec.streaming:
            rank, world = self._rank_world()
            self.train_set, self.val_set = streaming_splits(self.spec, self.tokenizer, rank, world)
            return
        world = getattr(getattr(self, "trainer", None), "world_size", 1)
        data, self.stats, found = cache.open_prepared(self.cache_root, self._key(), self.prepare_data, world > 1)
        if found and self.cache_hit is None:
            self.cache_hit = True  # prepared earlier, or by rank 0 while this process waited
        # Row statistics depend on the batch size (padding), which is not part of the cache key: computed here.
        for split, rows in data.items():
            self.stats[split] = count_stats(rows, self.block_size, self.batch_size, self.pad_to_multiple_of)
        self.train_set = data["train"]
        self.val_set = data["validation"] if "validation" in data else None

    def _rank_world(self) -> tuple[int, int]:
        return data_rank_world(getattr(self, "trainer", None))

    def collator(self) -> PadCollator:
        return PadCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, max_length=self.block_size)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        if self.spec.streaming:
            return self._streaming_train_dataloader()
        rank, world = self._rank_world()
        trainer = getattr(self, "trainer", None)
        sampler = ResumableSampler(
            self.train_set,
            num_replicas=world,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            lengths=self.train_set["length"] if self.group_by_length else None,
            group_by_length=self.group_by_length,
            batch_size=self.batch_size,
            current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None,
        )
        if self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["rows_consumed"])
            self._resume = None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _streaming_train_dataloader(self) -> DataLoader:
        """The training stream for this epoch, resumed mid-epoch when a checkpoint says so.

        ``datasets`` reshuffles a stream from ``seed + epoch`` once told the epoch; Lightning tells samplers, not
        streams, so the epoch is set here, which is at every epoch start with ``reload_dataloaders_every_n_epochs=1``.
        """
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        self.train_set.set_epoch(epoch)
        loader = DataLoader(
            self.train_set, batch_size=self.batch_size, collate_fn=self.collator(), num_workers=self.num_workers
        )
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["rows_consumed"] // (self.batch_size * self._rank_world()[1])
        self._resume = None
        if not skip or trainer is None:
            return loader
        return SkipBatches(loader, skip, epoch, lambda: trainer.current_epoch)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        dataset, sampler = self.val_set, None
        if not self.spec.streaming:  # a stream is split per rank by datasets itself
            dataset, sampler = even_eval_shards(self.val_set, *self._rank_world())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader | list:
        """The held-out rows: one evaluation set, chosen by ``validation_split`` (see the class docstring)."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the epoch, for an exact mid-epoch resume.

        The batch count comes from Lightning's own progress tracking (batches that finished a training step), not
        from the sampler, which runs ahead of training because of prefetching and worker processes.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        _, world = self._rank_world()
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch": trainer.current_epoch,
            "rows_consumed": batches * self.batch_size * world,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the sampler at the saved epoch and position (used by the next ``train_dataloader``)."""
        if not state_dict:
            return
        if state_dict.get("seed") != self.seed:
            log.warning(
                "resuming with seed %s instead of %s: the batch order will differ", self.seed, state_dict.get("seed")
            )
        self._resume = {"epoch": state_dict["epoch"], "rows_consumed": state_dict["rows_consumed"]}


class PreparedRowsDataModule(TextDataModule):
    """Base of the data modules whose rows are not text blocks (preference pairs, prompts): TextDataModule's
    tokenizer, loaders, resumable sampling and state, with the subclass's own rows, tokenized once and cached the same
    way (:func:`litune.data.cache.prepare` / :func:`~litune.data.cache.open_prepared`).

    A subclass calls :meth:`_init_rows` from its ``__init__`` and implements :meth:`build_rows`.

    Attributes:
        cached_what: what the rows are, in the cache's messages.
        cache_namespace: when set, the spec's cache key is wrapped in it (keeps the rows apart from another kind whose
            spec has the same fields).
    """

    cached_what = "rows"
    cache_namespace: str | None = None

    def _init_rows(
        self, spec: Any, tokenizer: TokenizerSource, *, block_size: int, batch_size: int, batch_size_fix: str,
        num_workers: int, seed: int, shuffle: bool, pad_to_multiple_of: int, cache_dir: str | None,
    ) -> None:  # fmt: skip
        """Set what TextDataModule's loaders and state read (its own ``__init__`` takes text-data arguments)."""
        L.LightningDataModule.__init__(self)
        if batch_size < 1:
            raise ConfigError("data.init_args.batch_size", f"{batch_size} is not >= 1", batch_size_fix)
        self.spec = spec
        self.cache_root = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.tokenizer_source = tokenizer
        self.block_size = block_size  # checked against the network's context by the CLI
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = False
        self.pad_to_multiple_of = pad_to_multiple_of
        self._tokenizer = None
        self.train_set = None
        self.val_set = None
        self.stats: dict[str, Any] = {}
        self.cache_hit: bool | None = None
        self._resume = None
        self._cache_key: dict | None = None

    def build_rows(self) -> tuple[datasets.DatasetDict, dict]:
        """Tokenize the spec's rows: ``(splits, stats)``, as :func:`litune.data.cache.prepare` stores them."""
        raise NotImplementedError

    def _key(self) -> dict:
        if self._cache_key is None:
            identity = self.spec.key()
            if self.cache_namespace is not None:
                identity = {self.cache_namespace: identity}
            self._cache_key = cache.cache_key(identity, self.tokenizer)
        return self._cache_key

    def prepare_data(self) -> None:
        self.cache_hit = cache.prepare(self.cache_root, self._key(), self.build_rows, self.cached_what)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        distributed = self._rank_world()[1] > 1
        data, self.stats, found = cache.open_prepared(self.cache_root, self._key(), self.prepare_data, distributed)
        if found and self.cache_hit is None:
            self.cache_hit = True
        self.train_set = data["train"]
        self.val_set = data["validation"] if "validation" in data else None
