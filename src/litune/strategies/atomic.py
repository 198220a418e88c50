"""Atomic checkpoints: a checkpoint is visible under its name only once it is complete on every rank.

A kill in the middle of a save (SIGKILL, node failure, a preemption grace period running out) must leave the previous
checkpoint loadable, never a truncated file or a folder mixing two steps' shards.

* One file (single device, DDP): :class:`AtomicCheckpointIO` writes ``.<name>.tmp-<pid>`` next to the target, flushes
  it to disk, then ``os.replace``-s it over the target (atomic on POSIX). Lightning's own ``TorchCheckpointIO``
  rewrites the target in place.
* A folder written by several ranks (DeepSpeed today, sharded DCP checkpoints later): :func:`atomic_directory`. The
  ranks write under ``.<name>.partial``; after a barrier the writer rank drops a ``COMMITTED`` marker in it and swaps it
  in (the old folder is first renamed to ``.<name>.old``: a non-empty folder cannot be replaced in one rename), then
  deletes the old one; a last barrier lets no rank go on before the checkpoint is in place. :func:`recover` finishes a
  swap that a kill interrupted between its two renames; the loaders call it before looking for a checkpoint.

Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` with the same ``trainer.save_checkpoint``, so ``last`` only ever
names a complete checkpoint. Assumes, like Lightning, a filesystem shared by all ranks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

COMMIT_MARKER = "COMMITTED"
"""File written into a staged checkpoint folder once every rank has finished writing its part."""


def staging_path(target: Path) -> Path:
    """Where a folder checkpoint is written before it is complete (hidden, next to the target)."""
    return target.with_name(f".{target.name}.partial")


def _old_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once the folder holding it is flushed.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(staged: Path, target: Path) -> None:
    """Swap a complete staged folder in as ``target`` (on one rank), keeping a loadable checkpoint at every moment."""
    (staged / COMMIT_MARKER).write_text("complete on every rank\n")
    _fsync_dir(staged)
    old = _old_path(target)
    if target.exists() or target.is_symlink():
        _remove(old)
        os.rename(target, old)  # from here until the next rename, recover() finds `old` (or the committed staging)
    os.rename(staged, target)
    _fsync_dir(target.parent)
    _remove(old)


def recover(target: str | Path) -> None:
    """Finish a swap interrupted between its renames, and clear what a killed save left behind.

    If ``target`` is missing, a committed staging folder becomes it, else the previous checkpoint (``.<name>.old``)
    gets its name back. An uncommitted staging folder is a save that did not finish on every rank: it is deleted.
    Safe to call from several processes at once (ranks started by torchrun resolve ``last`` together): a rename or
    removal that another process did first is skipped.
    """
    target = Path(target)
    staged, old = staging_path(target), _old_path(target)
    try:
        if not target.exists():
            if (staged / COMMIT_MARKER).is_file():
                os.rename(staged, target)
            elif old.exists():
                os.rename(old, target)
        if target.exists() and old.exists():
            _remove(old)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_directory(target: str | Path, is_writer: bool, barrier: Callable[[], None]) -> Iterator[Path]:
    """Write a checkpoint folder from several ranks so that it appears under ``target`` only when complete.

    Every rank must enter (it contains collective barriers)::

        with atomic_directory(path, trainer.is_global_zero, strategy.barrier) as staged:
            engine.save_checkpoint(staged, ...)   # every rank writes its shards into `staged`

    Args:
        target: the checkpoint folder's final path (e.g. ``checkpoints/last.ckpt``).
        is_writer: true on exactly one rank, which prepares, commits and swaps the folder.
        barrier: a barrier across all ranks (``strategy.barrier``).

    Yields:
        The staging folder every rank writes into.
    """
    target = Path(target)
    staged = staging_path(target)
    if is_writer:
        recover(target)
        _remove(staged)
        staged.mkdir(parents=True)
    barrier()
    yield staged
    barrier()  # every rank has written its part
    if is_writer:
        commit(staged, target)
    barrier()  # nobody goes on (or reports the checkpoint) before it is in place


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but a checkpoint file appears under its name only once fully written.

    Local paths are written to a temporary file in the same folder, flushed to disk and renamed over the target;
    remote (fsspec) paths keep Lightning's behavior, since object stores write whole objects anyway.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(target.parent)
