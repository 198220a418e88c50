"""The tokenize-once cache: processed datasets saved under a folder named by a fingerprint of what made them.

The key covers the sources (local files by path, size and mtime; hub ids with config and split), the tokenizer (a hash
of its full serialized vocabulary, merges, normalizer and special tokens, plus its chat template), the format,
template, layout and block size. A different tokenizer therefore gives a different folder and the data is rebuilt; on
top of that the full key is stored in ``meta.json`` and compared on load, so a folder is never reused for a key it was
not built for (a hash collision or a hand-copied folder is rebuilt too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bumped whenever the on-disk layout or the processing changes meaning, to invalidate old caches."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything in the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary is what we can see
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def cache_key(spec_key: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    """The full key of a processed dataset."""
    return {"version": CACHE_VERSION, "spec": spec_key, "tokenizer": tokenizer_fingerprint(tokenizer)}


def _hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_folder(root: str | Path, key: dict) -> Path:
    """``root/data/<fingerprint>``."""
    return Path(root) / "data" / _hash(key)


def lookup(folder: Path, key: dict) -> dict | None:
    """The stored statistics when ``folder`` holds a complete dataset built for exactly ``key``, else ``None``."""
    meta = folder / "meta.json"
    if not meta.is_file():
        return None
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    # Round-trip our key through JSON so tuples and lists compare equal.
    if stored.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    return stored.get("stats", {})


def save(folder: Path, data: datasets.DatasetDict, key: dict, stats: dict) -> None:
    """Write ``data`` and its key under ``folder`` atomically (a temporary folder renamed into place), so a crash or
    a concurrent reader never sees half a cache.

    When several writers race (one per node on a shared file system, with ``prepare_data_per_node``), the first
    complete folder wins and the others discard theirs: a complete folder built for the same key is never replaced.
    A folder under this name built for another key (stale, or hand-copied) is deleted and replaced.
    """
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    data.save_to_disk(str(tmp))
    (tmp / "meta.json").write_text(json.dumps({"key": key, "stats": stats}, indent=1, default=str))
    if lookup(folder, key) is not None:  # another writer finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if folder.exists():  # a stale or foreign cache under this name: replace it, never reuse it
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # lost the race between the check and the rename: theirs is complete, keep it
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> datasets.DatasetDict:
    """Memory-map a saved dataset."""
    return datasets.load_from_disk(str(folder))


def prepare(root: str | Path, key: dict, build: Callable[[], tuple[datasets.DatasetDict, dict]], what: str) -> bool:
    """Tokenize once: run ``build`` (``() -> (data, stats)``) and save its result under ``root`` unless a complete
    build for ``key`` is already there. The data modules' ``prepare_data`` (local rank 0 under Lightning).

    Args:
        root: the cache root.
        key: the full key (:func:`cache_key`).
        build: makes the processed splits and their statistics.
        what: the data's name in the log line.

    Returns:
        Whether the cache was hit (nothing was built).
    """
    folder = cache_folder(root, key)
    if lookup(folder, key) is not None:
        return True
    data, stats = build()
    save(folder, data, key, stats)
    log.info("tokenized %s saved to %s", what, folder)
    return False


def open_prepared(
    root: str | Path, key: dict, prepare_here: Callable[[], object], distributed: bool
) -> tuple[datasets.DatasetDict, dict, bool]:
    """The prepared splits for ``key``, memory-mapped (the data modules' ``setup``, every rank).

    Args:
        root: the cache root.
        key: the full key (:func:`cache_key`).
        prepare_here: the data module's ``prepare_data``, run when nothing is prepared and there is one process
            (used outside a Trainer).
        distributed: more than one process: a missing build is an error (``prepare_data`` did not run on this node).

    Returns:
        ``(data, stats, found)``: the splits, the stored statistics plus ``cache_folder``, and whether a complete
        build was already there (prepared earlier, or by local rank 0 while this process waited).
    """
    folder = cache_folder(root, key)
    stats = lookup(folder, key)
    found = stats is not None
    if not found:
        if distributed:
            raise RuntimeError(f"no prepared data at {folder}: prepare_data did not run on this node")
        prepare_here()
        stats = lookup(folder, key)
    return load(folder), {**(stats or {}), "cache_folder": str(folder)}, found
