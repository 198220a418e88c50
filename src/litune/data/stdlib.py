"""Python's standard-library source as a corpus for offline runs: a fixed snapshot shipped with litune.

The quickstart trains on these files because nothing can be downloaded in CI and nobody on this team wrote them. They
are not read from the running Python's own standard library: every Python version has other files, so a tokenizer,
a split and the quickstart's perplexities would differ from one Python to the next. ``stdlib-3.11.7.tar.xz`` (next
to this module) holds the ``.py`` files of CPython 3.11.7's ``Lib/`` (without tests, ``idlelib``, ``lib2to3``,
``turtledemo`` and ``encodings``; its ``LICENSE.txt`` is the PSF license it is distributed under), 458 files, 9.6 MB.
It is unpacked once into ``$LITUNE_CACHE/stdlib-3.11.7/`` (default ``~/.cache/litune``), so every machine and every
supported Python reads the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

STDLIB_SOURCE = "stdlib"
"""The source name that data and tokenizer configs use to mean "the standard library's .py files"."""

SNAPSHOT_VERSION = "3.11.7"
SNAPSHOT = Path(__file__).with_name(f"stdlib-{SNAPSHOT_VERSION}.tar.xz")
"""The shipped snapshot of CPython's standard-library source."""


def _cache_root() -> Path:
    return Path(os.environ.get("LITUNE_CACHE", Path.home() / ".cache" / "litune"))


def stdlib_root() -> Path:
    """The folder of the unpacked snapshot, unpacked on first use (atomically: concurrent ranks may race here)."""
    root = _cache_root() / f"stdlib-{SNAPSHOT_VERSION}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(SNAPSHOT, mode="r:xz") as tar:
        # The "data" filter (plain files only, inside tmp) exists from Python 3.10.12/3.11.4; the archive is ours.
        tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    try:
        tmp.rename(root)
    except OSError:  # another process unpacked it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
        if not root.is_dir():
            raise
    return root


def stdlib_python_files(max_bytes: int | None = None) -> list[Path]:
    """List the snapshot's ``.py`` files in a fixed order (sorted by relative path).

    Args:
        max_bytes: skip every file that would take the total size past this many bytes, and keep going in order
            (a later, smaller file may still fit); ``None``: all files.

    Returns:
        Paths of ``.py`` files under :func:`stdlib_root`, sorted by relative path: the same list on every machine.
    """
    root = stdlib_root()
    candidates = sorted((path.relative_to(root).as_posix(), path) for path in root.rglob("*.py"))
    files: list[Path] = []
    total = 0
    for _, path in candidates:
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            continue
        files.append(path)
        total += size
    return files
