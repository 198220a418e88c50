"""Tiny seeded fixtures shared by the tests: a corpus, a trained BPE tokenizer and a tiny GPT-2, all made locally.

Nothing is downloaded: the "pretrained" model is a random tiny GPT-2 written with ``save_pretrained``, so the real
``from_pretrained`` loading path is exercised on it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

# Before litune is imported: keep the tests' tokenizer/data caches out of the user's home, and wandb offline.
os.environ.setdefault("LITUNE_CACHE", tempfile.mkdtemp(prefix="litune-test-cache-"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# DeepSpeed JIT-builds its CPU ops into ~/.cache/torch_extensions, one folder shared by every venv: a venv at another
# path rebuilds them (its include paths differ) and the others wait on the build's lock, for minutes on a busy machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

from litune.data.stdlib import stdlib_python_files  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 512


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU-only path; never faked on CPU)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text (standard-library source), ~200 KB, as a .txt file per module and one .jsonl with a text field."""
    root = tmp_path_factory.mktemp("corpus")
    files = stdlib_python_files(max_bytes=200_000)
    with (root / "docs.jsonl").open("w") as jsonl:
        for path in files:
            text = path.read_text(encoding="utf-8")
            (root / f"{path.stem}.txt").write_text(text, encoding="utf-8")
            jsonl.write(json.dumps({"text": text}) + "\n")
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with 512 tokens trained on the corpus, saved as a Hugging Face tokenizer folder."""
    from litune.data.tokenizer import TrainedBPE

    folder = tmp_path_factory.mktemp("tokenizer")
    bpe = TrainedBPE(corpus=sorted(str(p) for p in corpus_dir.glob("*.txt")), vocab_size=TINY_VOCAB, cache_dir=folder)
    bpe.load().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 (n_embd=32) and its tokenizer, saved like a hub model folder."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=TINY_VOCAB)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path) -> Path:
    """The 1-process reference run that the strategy, export and FSDP2 tests compare against (run once)."""
    from litune_testing import reference_run

    return reference_run(tmp_path_factory.getbasetemp(), corpus_dir, tokenizer_dir)


@pytest.fixture(scope="session")
def resumed_reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, tokenizer_dir: Path) -> Path:
    """The reference run resumed from its first leg (see :func:`litune_testing.reference_run`)."""
    from litune_testing import reference_run

    return reference_run(tmp_path_factory.getbasetemp(), corpus_dir, tokenizer_dir, resumed=True)
