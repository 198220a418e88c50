"""Tokenizers: a pretrained one from the hub or a local folder, or a byte-level BPE trained on the fly and cached.

A tokenizer is configured in one place (``model.tokenizer``) and linked to the data module by the CLI, so the network,
the data and ``litune generate`` always use the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from litune.data.stdlib import STDLIB_SOURCE, stdlib_python_files
from litune.errors import ConfigError

DEFAULT_CACHE = Path(os.environ.get("LITUNE_CACHE", Path.home() / ".cache" / "litune"))


class TokenizerBuilder(ABC):
    """A tokenizer that litune builds itself rather than loads from a hub id or folder.

    Subclasses are selected in configs by ``class_path`` wherever a tokenizer source is accepted (``model.tokenizer``).
    """

    @abstractmethod
    def load(self) -> PreTrainedTokenizerFast:
        """Build (or load from litune's cache) the tokenizer."""


class TrainedBPE(TokenizerBuilder):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on a local corpus the first time it is asked for.

    The trained tokenizer is saved under ``cache_dir/tokenizers/<fingerprint>``, keyed by the corpus file list, their
    sizes and the settings, so later runs (and ``litune generate``) load the identical tokenizer.

    Args:
        corpus: ``"stdlib"`` for the standard library's source files, or a list of local text files.
        vocab_size: size of the vocabulary, special tokens included.
        max_bytes: with ``corpus="stdlib"``, how many bytes of source to train on.
        min_frequency: minimum pair count for a merge.
        cache_dir: root of litune's cache (default ``$LITUNE_CACHE`` or ``~/.cache/litune``).
    """

    EOS = "<|endoftext|>"

    def __init__(
        self,
        corpus: str | list[str] = STDLIB_SOURCE,
        vocab_size: int = 4096,
        max_bytes: int | None = 4_000_000,
        min_frequency: int = 2,
        cache_dir: str | None = None,
    ) -> None:
        if vocab_size < 260:
            raise ConfigError(
                "tokenizer.vocab_size", f"{vocab_size} is too small", "use at least 260 (256 bytes + specials)"
            )
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.max_bytes = max_bytes
        self.min_frequency = min_frequency
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE

    def files(self) -> list[Path]:
        """The corpus files, in a fixed order."""
        if self.corpus == STDLIB_SOURCE:
            return stdlib_python_files(self.max_bytes)
        files = [Path(f) for f in ([self.corpus] if isinstance(self.corpus, str) else self.corpus)]
        for f in files:
            if not f.is_file():
                raise ConfigError(
                    "tokenizer.corpus", f"file {f} does not exist", "list existing text files or 'stdlib'"
                )
        return files

    def fingerprint(self, files: list[Path]) -> str:
        key = {
            "files": [(str(f), f.stat().st_size) for f in files],
            "vocab_size": self.vocab_size,
            "min_frequency": self.min_frequency,
        }
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def load(self) -> PreTrainedTokenizerFast:
        """Load the cached tokenizer, training it first if this corpus and these settings have not been seen."""
        from tokenizers import ByteLevelBPETokenizer

        files = self.files()
        folder = self.cache_dir / "tokenizers" / f"bpe-{self.fingerprint(files)}"
        if not (folder / "tokenizer.json").exists():
            bpe = ByteLevelBPETokenizer()
            bpe.train(
                [str(f) for f in files],
                vocab_size=self.vocab_size,
                min_frequency=self.min_frequency,
                special_tokens=[self.EOS],
                show_progress=False,
            )
            fast = PreTrainedTokenizerFast(
                tokenizer_object=bpe._tokenizer, bos_token=self.EOS, eos_token=self.EOS, unk_token=self.EOS
            )
            # Write to a temp folder and rename, so a crash (or a second rank) never sees half a tokenizer.
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            fast.save_pretrained(tmp)
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.rename(folder)
            except OSError:  # another process finished first: keep theirs
                pass
        return AutoTokenizer.from_pretrained(folder)

    def __repr__(self) -> str:
        return f"TrainedBPE(corpus={self.corpus!r}, vocab_size={self.vocab_size})"


TokenizerSource = str | TokenizerBuilder
"""A hub id or local folder (loaded with ``AutoTokenizer.from_pretrained``), or a :class:`TokenizerBuilder`."""


class SymbolTokenizer(TokenizerBuilder):
    """The synthetic task's vocabulary as a Hugging Face tokenizer: ``<pad> <s> </s> <unk>`` then the symbols
    ``0 1 2 ...``, split on whitespace. Nothing is trained or cached: :meth:`load` builds the word-level tokenizer.

    Args:
        num_symbols: how many symbols the task uses.
    """

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
    """Special ids: padding, decoder start, end of target, unknown word. Symbol ``k`` has id ``4 + k``."""

    def __init__(self, num_symbols: int = 10) -> None:
        if num_symbols < 2:
            raise ConfigError("model.tokenizer.init_args.num_symbols", f"num_symbols={num_symbols} < 2", "use >= 2")
        self.num_symbols = num_symbols
        self.vocab_size = len(self.SPECIALS) + num_symbols

    def load(self) -> PreTrainedTokenizerFast:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {tok: i for i, tok in enumerate([*self.SPECIALS, *map(str, range(self.num_symbols))])}
        backend = Tokenizer(models.WordLevel(vocab, unk_token=self.SPECIALS[self.UNK_ID]))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            pad_token=self.SPECIALS[self.PAD_ID],
            bos_token=self.SPECIALS[self.BOS_ID],
            eos_token=self.SPECIALS[self.EOS_ID],
            unk_token=self.SPECIALS[self.UNK_ID],
        )

    def __repr__(self) -> str:
        return f"SymbolTokenizer(num_symbols={self.num_symbols})"


def load_tokenizer(source: TokenizerSource, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    GPT-2-style tokenizers have no pad token; litune pads with EOS and masks padded positions out of the labels by the
    attention mask (not by token id), so EOS between documents is still trained on.

    Args:
        source: a hub id or local folder, or a :class:`TokenizerBuilder` such as :class:`TrainedBPE`.
        trust_remote_code: allow tokenizer code from the hub (off unless the config says so).
    """
    if isinstance(source, TokenizerBuilder):
        tokenizer = source.load()
    else:
        if not isinstance(source, str) or not source:
            raise ConfigError("model.tokenizer", f"{source!r} is not a tokenizer", "give a hub id or a local folder")
        if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
            raise ConfigError("model.tokenizer", f"folder {source} does not exist", "give an existing folder or hub id")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                "model.tokenizer",
                "the tokenizer has neither a pad nor an eos token",
                "use a tokenizer with one of them",
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
