"""The Python standard library's own source files: real text that every machine has, for offline runs.

The quickstart trains on these because nothing can be downloaded in CI and nobody on this team wrote them.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

STDLIB_SOURCE = "stdlib"
"""The source name that data and tokenizer configs use to mean "the standard library's .py files"."""

# Test suites and vendored packages are repetitive, and encodings/ is mostly generated code-point tables: they would
# dominate a small corpus and teach a model little Python.
_SKIPPED_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "turtledemo", "encodings"
}  # fmt: skip


def stdlib_python_files(max_bytes: int | None = None) -> list[Path]:
    """List the standard library's ``.py`` files in a fixed order (sorted by relative path).

    Args:
        max_bytes: skip every file that would take the total size past this many bytes, and keep going in order
            (a later, smaller file may still fit); ``None``: all files.

    Returns:
        Paths of ``.py`` files, sorted by relative path so that every machine with the same Python gets the same list.
        Their encoding is not checked here.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, Path]] = []
    # os.walk with pruning, not rglob: the stdlib folder usually holds site-packages, which can be many times larger
    # than the stdlib itself and would otherwise be walked only to be skipped.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = Path(folder) / name
                candidates.append((path.relative_to(root).as_posix(), path))
    files: list[Path] = []
    total = 0
    for _, path in sorted(candidates):
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            continue
        files.append(path)
        total += size
    return files
