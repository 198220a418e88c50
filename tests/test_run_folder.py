"""A run folder is complete on its own and loaded safely: the tokenizer's files are in it and used by every later
command (also with an empty cache), export writes the special-token ids, checkpoints load with weights_only=True, and
one process at a time writes into it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import litune.data.tokenizer
from litune.cli import main
from litune.data.tokenizer import TrainedBPE
from litune.errors import ConfigError
from litune.models.hf import HFCausalLM
from litune.module import LitLM
from litune.optim import LRSchedule
from litune.run_guard import LOCK_FILE, RunLock
from litune.strategies.safe_load import allow_litune_classes

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
# No bos/eos ids: the Hugging Face default (GPT-2's 50256) is then wrong for a 512-token BPE; export must fix it.
BARE_GPT2 = "{model_type: gpt2, vocab_size: 512, n_positions: 64, n_embd: 32, n_layer: 2, n_head: 2}"


@pytest.fixture(autouse=True)
def _fresh_run_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)


def recipe_args(tmp_path: Path, corpus_dir: Path, *extra: str) -> list[str]:
    """A tiny run whose tokenizer is a recipe (a BPE trained from local files into litune's cache)."""
    corpus = json.dumps(sorted(str(p) for p in corpus_dir.glob("*.txt"))[:4])
    return [
        "--config", TINY,
        "--model.tokenizer.class_path=litune.data.tokenizer.TrainedBPE",
        f"--model.tokenizer.init_args.corpus={corpus}", "--model.tokenizer.init_args.vocab_size=400",
        f"--model.network.init_args.config={BARE_GPT2}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", "--data.init_args.max_bytes=30000",
        f"--runs_dir={tmp_path / 'runs'}", "--trainer.limit_val_batches=2",
        *extra,
    ]  # fmt: skip


def test_every_command_uses_the_run_folders_tokenizer_files_with_an_empty_cache(
    tmp_path, corpus_dir, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(litune.data.tokenizer, "DEFAULT_CACHE", tmp_path / "cache")
    assert main(["fit", *recipe_args(tmp_path, corpus_dir, "--trainer.max_steps=2")]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    saved = AutoTokenizer.from_pretrained(run / "tokenizer")
    trained = TrainedBPE(corpus=sorted(str(p) for p in corpus_dir.glob("*.txt"))[:4], vocab_size=400).load()
    assert saved.get_vocab() == trained.get_vocab() and not list(run.glob(LOCK_FILE))

    # Another machine: an empty cache, and any attempt to build the tokenizer from its recipe fails the test.
    empty = tmp_path / "empty-cache"
    monkeypatch.setattr(litune.data.tokenizer, "DEFAULT_CACHE", empty)

    def no_retraining(self: TrainedBPE) -> None:
        raise AssertionError("the tokenizer was rebuilt from its recipe instead of loaded from the run folder")

    monkeypatch.setattr(TrainedBPE, "load", no_retraining)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def f(x):", "--max-length", "12"]) == 0
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0
    for command in ("validate", "test"):
        assert main([command, *recipe_args(tmp_path, corpus_dir), f"--ckpt_path={ckpt}"]) == 0
    for steps in (3, 4):  # resumed twice: the second resume finds the run folder's copy in the hyperparameters
        assert (
            main(["fit", *recipe_args(tmp_path, corpus_dir, f"--trainer.max_steps={steps}", "--ckpt_path=last")]) == 0
        )
    assert not (empty / "tokenizers").exists(), "no tokenizer was trained on this machine"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]

    # The export: the trained tokenizer, with its special-token ids in the model's config and generation config.
    hf = tmp_path / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.get_vocab() == saved.get_vocab()
    config = json.loads((hf / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(hf)
    for name in ("bos", "eos", "pad"):
        want = getattr(tokenizer, f"{name}_token_id")
        assert want is not None and want < 400
        assert config[f"{name}_token_id"] == want and getattr(generation, f"{name}_token_id") == want, name
    # ...so a user's plain transformers call stops at the tokenizer's eos without being told (safetensors weights).
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id and (hf / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(hf), "--max-length", "8"]) == 0  # a safetensors HF folder
    assert "--- sequence 0 ---" in capsys.readouterr().out


def test_checkpoints_load_weights_only_with_litunes_classes_allow_listed(tmp_path, corpus_dir) -> None:
    """A LitLM built in Python keeps a TrainedBPE and an LRSchedule object in its hyperparameters: they are
    allow-listed, everything else a pickle could carry is refused."""
    tokenizer = TrainedBPE(corpus=sorted(str(p) for p in corpus_dir.glob("*.txt"))[:2], vocab_size=300,
                           cache_dir=str(tmp_path / "c"))  # fmt: skip
    network = HFCausalLM(config={"model_type": "gpt2", "vocab_size": 300, "n_positions": 32, "n_embd": 16,
                                 "n_layer": 1, "n_head": 2})  # fmt: skip
    system = LitLM(network, tokenizer, lr_schedule=LRSchedule(name="constant"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)  # fmt: skip
    batch = {"input_ids": torch.randint(0, 300, (2, 16)), "labels": torch.randint(0, 300, (2, 16))}
    trainer.fit(system, torch.utils.data.DataLoader([batch], batch_size=None))
    ckpt = tmp_path / "python.ckpt"
    trainer.save_checkpoint(ckpt)
    allowed = torch.serialization.get_safe_globals()  # other tests in this process may have allow-listed them
    torch.serialization.clear_safe_globals()
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    finally:
        torch.serialization.add_safe_globals(allowed)
    assert {"litune.data.tokenizer.TrainedBPE", "litune.optim.LRSchedule"} <= unsafe, "the allow-list has work to do"
    allow_litune_classes()
    loaded = LitLM.load_from_checkpoint(ckpt, network=network, weights_only=True)
    assert isinstance(loaded.hparams["lr_schedule"], LRSchedule)
    assert loaded.tokenizer.get_vocab() == tokenizer.load().get_vocab()


def test_the_lock_refuses_a_second_holder_and_takes_over_a_killed_ones(tmp_path, capsys) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": killed.pid, "job": None}))
    lock = RunLock(tmp_path).acquire()  # the killed process's lock is reported and replaced
    assert f"stale lock {tmp_path / LOCK_FILE} of process {killed.pid}" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
