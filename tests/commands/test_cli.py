"""The ``litune`` command end to end, as a user runs it: fit, resume, generate (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import litune_testing
from litune.cli import SUBCOMMANDS, main
from litune.commands.generate import build_parser, generate_texts, load_for_generation
from litune_testing import REPO


def tiny_args(tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return litune_testing.tiny_args(corpus_dir, tokenizer_dir, f"--runs_dir={tmp_path / 'runs'}", *extra)


@pytest.fixture(autouse=True)
def _fresh_run_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each in-process CLI call sets LITUNE_RUN_DIR for its own ranks; tests are separate runs.
    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)


def run_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs").glob("*-tiny"))


def test_fit_writes_a_run_folder_with_config_checkpoint_and_metrics(tmp_path, corpus_dir, tokenizer_dir) -> None:
    assert main(["fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir), "--validate_before_fit=true"]) == 0
    (run,) = run_dirs(tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 4 and saved["model"]["tokenizer"] == str(tokenizer_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"train/loss", "val/ppl", "step"} <= set(header)
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events in the run folder"
    # A program that imports litune (this test) keeps its malloc settings: only the `litune` command changes them.
    assert json.loads((run / "env.json").read_text())["host_allocator"] == "default"


def test_two_runs_in_one_process_get_their_own_folders(tmp_path, corpus_dir, tokenizer_dir) -> None:
    """The run folder handed to a run's ranks (LITUNE_RUN_DIR) must not leak into the next run in the process."""
    for _ in range(2):
        assert main(["fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir, "--trainer.max_steps=1")]) == 0
    assert len(run_dirs(tmp_path)) == 2
    assert "LITUNE_RUN_DIR" not in os.environ


def test_trainer_default_root_dir_is_where_run_folders_go(
    tmp_path, corpus_dir, tokenizer_dir, capsys, monkeypatch
) -> None:
    """Lightning's ``--trainer.default_root_dir`` is honoured as the runs folder (it used to be silently replaced)."""
    monkeypatch.chdir(tmp_path)  # so that the default ./runs would show up in tmp_path
    args = [a for a in tiny_args(tmp_path, corpus_dir, tokenizer_dir, "--trainer.max_steps=1") if "--runs_dir" not in a]
    assert main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'mine'}"]) == 0
    (run,) = (tmp_path / "mine").glob("*-tiny")
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert not (tmp_path / "runs").exists()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["runs_dir"] == str(tmp_path / "mine") and saved["trainer"]["default_root_dir"] is None
    capsys.readouterr()
    # Both, naming different places: refused before training, with the fix.
    both = tiny_args(tmp_path, corpus_dir, tokenizer_dir, f"--trainer.default_root_dir={tmp_path / 'other'}")
    assert main(["fit", *both]) == 2
    assert "trainer.default_root_dir" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_resume_from_last_continues_the_same_run(tmp_path, corpus_dir, tokenizer_dir) -> None:
    assert main(["fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir)]) == 0
    (run,) = run_dirs(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    args = tiny_args(tmp_path, corpus_dir, tokenizer_dir, "--trainer.max_steps=7", "--ckpt_path=last")
    assert main(["fit", *args]) == 0
    assert run_dirs(tmp_path) == [run]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7


def test_validate_and_test_evaluate_a_checkpoint_into_its_run_folder(tmp_path, corpus_dir, tokenizer_dir) -> None:
    assert main(["fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir)]) == 0
    (run,) = run_dirs(tmp_path)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    training_config = (run / "config.yaml").read_bytes()
    for subcommand, metric in (("validate", "val/ppl"), ("test", "test/ppl")):
        assert main([subcommand, *tiny_args(tmp_path, corpus_dir, tokenizer_dir), f"--ckpt_path={ckpt}"]) == 0
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert metric in header, f"{subcommand} logged {metric} into the run's metrics"
        assert (run / f"config-{subcommand}.yaml").exists(), f"{subcommand} saved its own config beside the run's"
    assert (run / "config.yaml").read_bytes() == training_config, "validate/test left the training config as it was"
    assert run_dirs(tmp_path) == [run]
    assert "train/loss" in header, "the training rows are kept"


def test_pretrained_gpt2_from_a_local_folder_fine_tunes_with_the_finetune_config(
    tmp_path, corpus_dir, tiny_gpt2_dir
) -> None:
    """configs/gpt2-finetune.yaml with the hub ids swapped for a tiny model saved by save_pretrained."""
    args = [
        "fit", "--config", str(REPO / "configs" / "gpt2-finetune.yaml"),
        f"--model.tokenizer={tiny_gpt2_dir}",
        f"--model.network.init_args.pretrained={tiny_gpt2_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        "--data.init_args.name=null", "--data.init_args.validation_split=null",
        "--data.init_args.block_size=32", "--data.init_args.batch_size=2",
        "--trainer.max_steps=3", "--trainer.accumulate_grad_batches=2", "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--model.lr_schedule.warmup_steps=1", f"--runs_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    assert main(args) == 0
    (run,) = sorted((tmp_path / "runs").glob("*-gpt2-finetune"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).state_dict()
    tuned = {k.removeprefix("network.model."): v for k, v in ckpt["state_dict"].items()}
    assert not torch.equal(tuned["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"])


def test_generate_returns_the_requested_number_of_sequences(tmp_path, corpus_dir, tokenizer_dir, capsys) -> None:
    assert main(["fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir)]) == 0
    (run,) = run_dirs(tmp_path)
    network, tokenizer = load_for_generation(str(run))
    args = build_parser().parse_args(
        ["--checkpoint", str(run), "--prompt", "def f(x):", "--max-length", "20", "--num-return-sequences", "3",
         "--do-sample", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8"]
    )  # fmt: skip
    texts = generate_texts(network, tokenizer, args)
    assert len(texts) == 3 and all(t.startswith("def f(x):") for t in texts)
    assert not any("<|endoftext|>" in t for t in texts), "special tokens are skipped when decoding"
    assert main(["generate", "--checkpoint", str(run), "--max-length", "12", "--num-return-sequences", "2",
                 "--do-sample"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("--- sequence") == 2
    assert main(["generate", "--checkpoint", str(run), "--num-return-sequences", "2"]) == 2  # greedy: all the same
    assert "--do-sample" in capsys.readouterr().err


def test_bare_litune_lists_every_subcommand(capsys) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)  # every subcommand, read from the one list


def remote_code_folder(root: Path, side_effect: Path) -> Path:
    """A local model folder whose config.json asks for its own code (``auto_map``), code that leaves ``side_effect``."""
    folder = root / "remote-code-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "litune-remote-test", "architectures": ["RemoteModel"], "vocab_size": 512, "n_embd": 32,'
        ' "n_layer": 1, "n_head": 2, "auto_map": {"AutoConfig": "remote.RemoteConfig",'
        ' "AutoModelForCausalLM": "remote.RemoteModel"}}'
    )
    (folder / "remote.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(side_effect)!r}).write_text('the folder\\'s code ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class RemoteConfig(GPT2Config):\n    model_type = 'litune-remote-test'\n"
        "class RemoteModel(GPT2LMHeadModel):\n    config_class = RemoteConfig\n"
    )
    return folder


def test_a_model_folder_that_asks_for_remote_code_is_refused_and_its_code_never_runs(
    tmp_path, corpus_dir, tokenizer_dir, capsys
) -> None:
    """``trust_remote_code`` is off unless a config turns it on: the folder is refused and its code is not run."""
    side_effect = tmp_path / "remote-code-ran"
    folder = remote_code_folder(tmp_path, side_effect)
    argv = [
        "fit", *tiny_args(tmp_path, corpus_dir, tokenizer_dir),
        f"--model.network.init_args.pretrained={folder}", "--model.network.init_args.config=null",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model.network.init_args.pretrained" in err and "trust_remote_code" in err and "Traceback" not in err, err
    assert not side_effect.exists()
    # Teeth: the folder's code is real and does run once remote code is trusted (in a child with its own module cache).
    load = f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)"
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    proc = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and side_effect.exists(), proc.stderr[-2000:]
