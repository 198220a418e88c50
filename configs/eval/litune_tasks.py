"""Loaders and metrics of litune's offline lm-evaluation-harness tasks (the YAML files beside this one).

The harness resolves ``!function litune_tasks.NAME`` relative to the YAML file, and each loader reads its data file
from this folder, so the tasks run from any working directory with no network.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _load(name: str, **kwargs: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def load_heldout_python(**kwargs: object) -> datasets.DatasetDict:
    """Held-out Python source (written for litune, in no training corpus): one document per row, ``text``."""
    return _load("heldout_python.jsonl")


def load_python_mc(**kwargs: object) -> datasets.DatasetDict:
    """Twelve hand-written code completions with four choices each: ``context``, ``choices``, ``label``."""
    return _load("python_mc.jsonl")


def perplexity_results(doc: dict, results: list) -> dict:
    """Per-document (loglikelihood, count) pairs for word, byte and bits-per-byte perplexity, as the harness's
    wikitext task counts them (words split on whitespace, UTF-8 bytes of the original text)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
