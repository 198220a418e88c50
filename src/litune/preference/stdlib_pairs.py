"""Preference pairs built from real text that ships with litune: the Python standard library's source (the snapshot of
:mod:`litune.data.stdlib`), for the offline preference quickstart.

Each pair's prompt is a few consecutive lines of a standard-library module; the chosen response is the line that
really follows; the rejected response is that same line with its words in reverse order (same tokens, so the length
and vocabulary match and only the order tells them apart). Deterministic: the same Python gives the same pairs.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from litune.data.stdlib import SNAPSHOT_VERSION, stdlib_python_files

STDLIB_PAIRS = "stdlib"
"""The ``data.path`` that means "pairs built from the standard library" (:func:`stdlib_pairs_file`)."""

VERSION = 1


def stdlib_pairs(max_pairs: int = 4000, context_lines: int = 3, seed: int = 0) -> list[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}`` rows (see the module docstring), at most one per 8 lines of source."""
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    for path in stdlib_python_files(max_bytes=6_000_000):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for i in range(context_lines, len(lines), 8):
            line = lines[i]
            words = line.split()
            if len(words) < 4 or len(line) > 100 or words[0].startswith("#"):
                continue
            indent = line[: len(line) - len(line.lstrip())]
            rejected = indent + " ".join(reversed(words))
            if rejected == line:
                continue
            prompt = "\n".join(lines[i - context_lines : i]) + "\n"
            pairs.append({"prompt": prompt, "chosen": line + "\n", "rejected": rejected + "\n"})
    rng.shuffle(pairs)
    return pairs[:max_pairs]


def stdlib_examples(max_pairs: int = 4000) -> list[dict]:
    """KTO's unpaired ``{"prompt", "completion", "label"}`` rows: of each pair, alternately its chosen line
    (desirable) or its rejected line (undesirable), so no prompt appears twice."""
    return [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, p in enumerate(stdlib_pairs(max_pairs))
    ]


def stdlib_pairs_file(root: Path, max_pairs: int = 4000, unpaired: bool = False) -> Path:
    """The rows of :func:`stdlib_pairs` (or :func:`stdlib_examples`) as a JSON Lines file under ``root`` (written
    once, atomically)."""
    kind = "examples" if unpaired else "pairs"
    path = Path(root) / "preference" / f"stdlib-{SNAPSHOT_VERSION}-{kind}-v{VERSION}-{max_pairs}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        for row in stdlib_examples(max_pairs) if unpaired else stdlib_pairs(max_pairs):
            fh.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path
