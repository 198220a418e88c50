"""The bad-input battery: every case exits 2 with one paragraph naming the field and the fix, no traceback, leaves
every existing file of the runs folder as it was (hashes before and after) and writes no new one.

Cases call the CLI's ``main(argv)`` in-process (same exit code and stderr as the console script, without paying
~4 s of imports per case); a few at the end run the real ``litune`` process to show that no traceback reaches a user's
terminal. Every runs folder holds a copy of a really trained run, so "nothing in the run folder changed" is checked
against real checkpoints, metrics and the saved tokenizer.

Mocked, because it cannot exist here: a missing optional package (they are all installed; the import is made to fail
the way a missing package fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from litune.cli import main
from litune.run_guard import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
PREFIX = "litune: configuration error: "


@pytest.fixture(autouse=True)
def _fresh_run_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LITUNE_RUN_DIR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    """~40 KB of real text (standard-library source) as JSON Lines: enough for a few steps, quick to tokenize."""
    out = tmp_path_factory.mktemp("data") / "docs.jsonl"
    lines = (corpus_dir / "docs.jsonl").read_text().splitlines()
    out.write_text("\n".join(line for line in lines if len(line) < 8000)[:40_000].rsplit("\n", 1)[0] + "\n")
    return out


def fit_args(runs: Path, data: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY, f"--model.tokenizer={tokenizer}", f"--data.init_args.path={data}", f"--runs_dir={runs}",
        "--trainer.limit_val_batches=0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_file: Path, tokenizer_dir: Path) -> Path:
    """A run folder of 2 real training steps: checkpoints, metrics, config, tokenizer files."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    assert main(["fit", *fit_args(runs, data_file, tokenizer_dir, "--trainer.max_steps=2")]) == 0
    (run,) = runs.iterdir()
    os.environ.pop("LITUNE_RUN_DIR", None)
    return run


@pytest.fixture
def runs(tmp_path: Path, trained: Path) -> Path:
    """A runs folder holding a copy of the trained run (the run a failing command must leave alone)."""
    shutil.copytree(trained, tmp_path / "runs" / trained.name)
    return tmp_path / "runs"


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def expect_error(capsys: pytest.CaptureFixture, argv: list[str], field: str, *words: str, root: Path | None) -> str:
    """Run ``litune <argv>`` in-process and check the contract; return the message."""
    before = hashes(root) if root is not None else {}
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, f"exit {code}; stderr:\n{captured.err[-3000:]}"
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, captured.err[-3000:]
    message = lines[0]
    print(message)  # shown by `pytest -rP`: the battery's messages, to read them all at once
    assert message.startswith(PREFIX + field), message
    assert ". Fix: " in message and len(message.split(". Fix: ", 1)[1]) > 10, message
    for word in words:
        assert word in message, message
    if root is not None:
        after = hashes(root)
        assert {name: after.get(name) for name in before} == before, "an existing file of the run folder changed"
        assert not after.keys() - before.keys(), f"a failed command wrote {sorted(after.keys() - before.keys())}"
        assert not [p for p in root.iterdir() if not any(p.iterdir())], "no empty run folder is left behind"
    return message


# --- configs --------------------------------------------------------------------------------------------------------

HF = "--model.network.init_args.config="
SP2 = ["--config", str(REPO / "configs" / "strategy" / "fsdp2_sp2.yaml")]
CONFIG_CASES = {
    "unknown key": (["--trainer.max_stepz=3"], "trainer.max_stepz", "did you mean --trainer.max_steps"),
    "unknown network arg": (["--model.network.init_args.n_layers=3"], "model.network.init_args.n_layers"),
    "unknown key in a yaml file": (["--config", "{tmp}/extra.yaml"], "trainer.max_stepz"),
    "wrong type int": (["--trainer.max_steps=abc"], "trainer.max_steps", "abc"),
    "wrong type batch size": (["--data.init_args.batch_size=two"], "data.init_args.batch_size"),
    "wrong type in a data argument": (["--data.init_args.pad_to_multiple_of=abc"], "data.init_args.pad_to_multiple_of"),
    "negative model size": (["--model.network.init_args.config.n_positions=-1"],
                            "model.network.init_args.config.n_positions", "1 or more"),
    "model larger than memory": (["--model.network.init_args.config.n_embd=1000000000"],
                                 "model.network.init_args.config.n_embd", "GiB", "litune estimate"),
    "negative token id": (["--model.network.init_args.config.eos_token_id=-1"],
                          "model.network.init_args.config.eos_token_id"),
    "checkpoint interval beyond time": (["--checkpoint.every_n_minutes=1e30"], "checkpoint.every_n_minutes"),
    "seed outside numpy's range": (["--seed_everything=-1"], "seed_everything", "4294967295"),
    "unknown checkpoint mode": (["--best_checkpoint.mode=lowest"], "best_checkpoint.mode", "min or max"),
    "adapter rank above the layer": (["--config", str(REPO / "configs" / "peft" / "lora.yaml"),
                                      "--model.adapters.r=1000000"], "model.adapters.r", "r <= 32"),
    "wrong type lr": (["--model.optimizer.init_args.lr=fast"], "model.optimizer.init_args.lr"),
    "negative lr": (["--model.optimizer.init_args.lr=-0.01"], "model.optimizer.init_args.lr", "learning rate"),
    "zero lr": (["--model.optimizer.init_args.lr=0"], "model.optimizer.init_args.lr", "learning rate"),
    "zero batch size": (["--data.init_args.batch_size=0"], "data.init_args.batch_size"),
    "no accumulation window": (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches", ">= 1"),
    "negative clipping norm": (["--trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "flip"),
    "zero max_steps": (["--trainer.max_steps=0"], "trainer.max_steps", "-1"),
    "negative logging interval": (["--trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps"),
    "val batches out of range": (["--trainer.limit_val_batches=1.5"], "trainer.limit_val_batches", "fraction"),
    "zero-width validation interval": (["--trainer.val_check_interval=0.0"], "trainer.val_check_interval"),
    "negative sanity steps": (["--trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps"),
    "zero nodes": (["--trainer.num_nodes=0"], "trainer.num_nodes"),
    "two nodes without a launcher": (["--trainer.num_nodes=2"], "trainer.num_nodes", "launcher"),
    "a billion nodes without a launcher": (["--trainer.num_nodes=1000000000"], "trainer.num_nodes", "launcher"),
    "zero devices": (["--trainer.devices=0"], "trainer.devices"),
    "zero global batch": (["--global_batch_size=0"], "global_batch_size"),
    "negative dist timeout": (["--dist_timeout=-5"], "dist_timeout"),
    "negative checkpoint cadence": (["--checkpoint.every_n_train_steps=-1"], "checkpoint.every_n_train_steps"),
    "best checkpoints below -1": (["--best_checkpoint.save_top_k=-2"], "best_checkpoint.save_top_k"),
    "negative weight decay": (["--model.optimizer.init_args.weight_decay=-1"],
                              "model.optimizer.init_args.weight_decay"),
    "beta above one": (["--model.optimizer.init_args.betas=[1.5, 0.9]"], "model.optimizer.init_args.betas"),
    "negative warmup": (["--model.lr_schedule.warmup_steps=-1"], "model.lr_schedule.warmup_steps"),
    "warmup not shorter than the run": (
        # 2 processes: refused before they start (configure_optimizers would refuse it after the run folder is written)
        ["--model.lr_schedule.name=cosine", "--model.lr_schedule.warmup_steps=1000", "--trainer.devices=2"],
        "model.lr_schedule.warmup_steps",
        "1000 warmup steps",
    ),
    "negative workers": (["--data.init_args.num_workers=-1"], "data.init_args.num_workers"),
    "block size one": (["--data.init_args.block_size=1"], "data.init_args.block_size"),
    "unknown strategy": (["--trainer.strategy=foo"], "trainer.strategy", "foo"),
    "unknown precision": (["--trainer.precision=17"], "trainer.precision", "bf16-mixed"),
    "unknown logger": (["--loggers=[foo]"], "loggers", "csv"),
    "unknown optimizer": (["--model.optimizer=torch.optim.AdamX"], "model.optimizer", "AdamX"),
    "unknown schedule": (["--model.lr_schedule.name=cosinez"], "model.lr_schedule.name", "'cosine'"),
    "unknown layout": (["--data.init_args.layout=zigzag"], "data.init_args.layout"),
    "text column not in the file": (["--data.init_args.text_column=body"], "data.init_args.text_column", "body"),
    "fp16 on cpu": (["--trainer.precision=16-mixed"], "trainer.precision", "bf16-mixed"),
    "more processes than cores": (["--trainer.devices=4096"], "trainer.devices"),
    "gpu without cuda": (["--trainer.accelerator=gpu"], "trainer.accelerator"),
    "block size over context": (["--data.init_args.block_size=4096"], "data.init_args.block_size", "64"),
    "vocab smaller than tokenizer": ([HF + "{model_type: gpt2, vocab_size: 100, n_embd: 32, n_head: 2, n_layer: 1}"],
                                     "model.network.init_args.vocab_size"),
    "global batch not divisible": (["--global_batch_size=6"], "global_batch_size", "divisible"),
    "adapters under tensor parallelism": (["--config", str(REPO / "configs" / "peft" / "lora.yaml"),
                                           "--config", str(REPO / "configs" / "strategy" / "fsdp2_tp2.yaml")],
                                          "model.adapters", "tensor_parallel_size: 1"),
    "deferred network under tensor parallelism": (["--config", str(REPO / "configs" / "strategy" / "fsdp2_tp2.yaml"),
                                                   "--trainer.devices=2",
                                                   "--model.network.class_path=litune.models.DeferredHFCausalLM"],
                                                  "model.network.class_path", "HFCausalLM"),
    "4-bit base under FSDP2": (["--config", str(REPO / "configs" / "peft" / "qlora.yaml"),
                                "--config", str(REPO / "configs" / "strategy" / "fsdp2.yaml")],
                               "model.adapters", "ddp.yaml"),
    "tensor parallel size zero": (["--config", str(REPO / "configs" / "strategy" / "fsdp2_tp2.yaml"),
                                   "--trainer.strategy.init_args.tensor_parallel_size=0"],
                                  "trainer.strategy.init_args.tensor_parallel_size", "positive"),
    "sequence parallel over one process": (SP2, "trainer.strategy.init_args.sequence_parallel_size", "divide"),
    "heads not divisible by sequence parallel": ([*SP2, "--trainer.devices=2",
                                                  "--model.network.init_args.config.n_head=1"],
                                                 "model.network.init_args.config.num_attention_heads", "divisible"),
    "eager attention under sequence parallelism": ([*SP2, "--trainer.devices=2",
                                                    "--model.network.init_args.attn_implementation=eager"],
                                                   "model.network.init_args.attn_implementation", "sdpa"),
    "odd block size under sequence parallelism": ([*SP2, "--trainer.devices=2", "--data.init_args.block_size=31"],
                                                  "data.init_args.block_size", "multiple of 2"),
    "sequence with tensor parallelism": ([*SP2, "--trainer.devices=2",
                                          "--trainer.strategy.init_args.tensor_parallel_size=2"],
                                         "trainer.strategy.init_args.sequence_parallel_size", "tensor_parallel_size"),
    "val fraction out of range": (["--data.init_args.val_fraction=1.5"], "data.init_args.val_fraction"),
    "pretrained and config": (["--model.network.init_args.pretrained={tmp}"], "model.network.init_args",
                              "exactly one"),
    "pretrained folder missing": (["--model.network.init_args.pretrained=/nonexistent/gpt2",
                                   "--model.network.init_args.config=null"], "model.network.init_args.pretrained"),
    "pretrained folder without a model": (["--model.network.init_args.pretrained={tmp}",
                                           "--model.network.init_args.config=null"],
                                          "model.network.init_args.pretrained"),
    "eos id outside the vocabulary": ([HF + "{model_type: gpt2, vocab_size: 512, n_embd: 32, n_head: 2, n_layer: 1, "
                                        "eos_token_id: 1000000000000}"],
                                       "model.network.init_args.config.eos_token_id", "[0, 512)"),
    "unknown attention implementation": (["--model.network.init_args.attn_implementation=no-such-kernel"],
                                         "model.network.init_args.attn_implementation", "sdpa"),
    "unknown model type": ([HF + "{model_type: gpt9}"], "model.network.init_args.config", "gpt9"),
    "heads do not divide width: HF gpt2": ([HF + "{model_type: gpt2, vocab_size: 512, n_embd: 32, n_head: 3}"],
                                           "model.network.init_args.config", "divisible"),
    "heads do not divide width: HF llama": ([HF + "{model_type: llama, vocab_size: 512, hidden_size: 32, "
                                             "num_attention_heads: 3, num_hidden_layers: 1, intermediate_size: 64}"],
                                            "model.network.init_args.config", "multiple"),
    "heads do not divide width: ZeRO-3 deferred HF": (
        ["--model.network=litune.models.DeferredHFCausalLM",
         HF + "{model_type: gpt2, vocab_size: 512, n_embd: 32, n_head: 3}"],
        "model.network.init_args.config", "divisible"),
    "heads do not divide width: litune decoder": (
        ["--model.network=litune.models.transformer.DecoderLM", "--model.network.init_args.d_model=30",
         "--model.network.init_args.nhead=4", "--model.network.init_args.vocab_size=512"],
        "model.network.init_args.nhead", "choose nhead in {1, 2, 3, 5"),
    "heads do not divide width: litune encoder-decoder": (
        ["--model.network=litune.models.seq2seq.Seq2SeqLM", "--model.network.init_args.d_model=30",
         "--model.network.init_args.nhead=4", "--model.network.init_args.vocab_size=512"],
        "model.network.init_args.nhead", "choose nhead"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config(case, runs, tmp_path, data_file, tokenizer_dir, capsys) -> None:
    extra, field, *words = CONFIG_CASES[case]
    (tmp_path / "extra.yaml").write_text("trainer:\n  max_stepz: 3\n")
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    expect_error(capsys, ["fit", *fit_args(runs, data_file, tokenizer_dir, *extra)], field, *words, root=runs)


# --- data -----------------------------------------------------------------------------------------------------------

DATA_CASES = {
    "missing file": (None, "missing.jsonl", [], "data.init_args.path", "does not exist"),
    "empty file": (b"", "empty.jsonl", [], "data.init_args.path", "empty"),
    "whitespace only": (b"\n  \n\n", "blank.txt", [], "data.init_args.path", "empty"),
    "not UTF-8": (b"good line\ncaf\xe9 au lait\n", "latin1.txt", [], "data.init_args.path", "UTF-8"),
    "not JSON": (b'{"text": "fine"}\nthis is not json\n', "bad.jsonl", [], "data.init_args.path", "line 2"),
    "wrong column": (b'{"body": "some text here"}\n', "col.jsonl", [], "data.init_args.text_column", "text"),
    "numbers in the text column": (
        b'{"text": 123}\n{"text": 456}\n',
        "num.jsonl",
        [],
        "data.init_args.text_column",
        "text",
    ),
    "lists in the text column": (b'{"text": ["a", "b"]}\n', "list.jsonl", [], "data.init_args.text_column", "text"),
    "nulls in the text column": (
        b'{"text": null}\n{"text": null}\n',
        "null.jsonl",
        [],
        "data.init_args.text_column",
        "",
    ),
    "a JSON object, not rows": (b'{"a": {"b": 1}}', "obj.json", [], "data.init_args.text_column", ""),
    "empty folder": ("dir", "folder", [], "data.init_args.path", "no file"),
    "glob matching nothing": (None, "*.nothing", [], "data.init_args.path", "matches no file"),
    "csv without the column": (b"a,b\n1,2\n", "table.csv", [], "data.init_args.text_column", "text"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data(case, runs, tmp_path, tokenizer_dir, capsys) -> None:
    content, name, extra, field, word = DATA_CASES[case]
    path = tmp_path / "input" / name
    path.parent.mkdir()
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    argv = ["fit", *fit_args(runs, path, tokenizer_dir, *extra), f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    expect_error(capsys, argv, field, word, root=runs)


# --- checkpoints ----------------------------------------------------------------------------------------------------


class NotATensor:
    """A class a checkpoint must not be able to make litune unpickle (any class could run code in __reduce__)."""


def _write_checkpoint(kind: str, run: Path, tmp_path: Path) -> Path:
    last = run / "checkpoints" / "last.ckpt"
    target = tmp_path / "bad" / f"{kind}.ckpt"
    target.parent.mkdir(exist_ok=True)
    if kind == "text":
        target.write_text("this is a text file, not a checkpoint\n")
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        data = last.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "unsafe":
        torch.save({"state_dict": {}, "payload": NotATensor()}, target)
    elif kind == "no-state-dict":
        torch.save({"weights": torch.zeros(2)}, target)
    return target


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "unsafe", "no-state-dict"])
@pytest.mark.parametrize("command", ["fit", "validate", "generate", "export"])
def test_not_a_checkpoint(kind, command, runs, tmp_path, data_file, tokenizer_dir, capsys) -> None:
    (run,) = runs.iterdir()
    bad = _write_checkpoint(kind, run, tmp_path)
    if command in ("fit", "validate"):
        argv = [command, *fit_args(runs, data_file, tokenizer_dir), f"--ckpt_path={bad}"]
        field = "ckpt_path"
    elif command == "generate":
        argv, field = ["generate", "--checkpoint", str(bad)], "--checkpoint"
    else:
        argv, field = ["export", "--checkpoint", str(bad), "--output", str(tmp_path / "out")], "--checkpoint"
    word = "weights_only" if kind == "unsafe" else "state_dict" if kind == "no-state-dict" else "truncated"
    expect_error(capsys, argv, field, word, root=runs)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_deepspeed_shard_that_could_run_code(command, runs, tmp_path, capsys) -> None:
    """DeepSpeed unpickles its shards with weights_only=False: litune reads their opcodes first and refuses."""
    ckpt = tmp_path / "ds" / "checkpoints" / "last.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    torch.save({"module": {}, "payload": NotATensor()}, ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    argv = [command, "--checkpoint", str(ckpt), *(["--output", str(tmp_path / "o")] if command == "export" else [])]
    expect_error(capsys, argv, "--checkpoint", "NotATensor", "weights_only", root=runs)


def _resume(runs: Path, data: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["fit", *fit_args(runs, data, tokenizer, "--trainer.max_steps=4", "--ckpt_path=last", *extra)]


def test_resume_with_another_architecture(runs, data_file, tokenizer_dir, capsys) -> None:
    argv = _resume(runs, data_file, tokenizer_dir, "--model.network.init_args.config.n_layer=3")
    message = expect_error(capsys, argv, "model.network.init_args.config.n_layer", "litune export", "pretrained",
                           root=runs)  # fmt: skip
    assert "is 2 in the checkpoint but 3 here" in message


def test_resume_with_another_network_class(runs, data_file, tokenizer_dir, capsys) -> None:
    argv = _resume(runs, data_file, tokenizer_dir, "--model.network=litune.models.transformer.DecoderLM",
                   "--model.network.init_args.vocab_size=512", "--model.network.init_args.max_seq_len=64")  # fmt: skip
    expect_error(capsys, argv, "model.network", "litune export", root=runs)


def test_resume_with_another_tokenizer(runs, tmp_path, data_file, tokenizer_dir, capsys) -> None:
    from litune.data.tokenizer import TrainedBPE

    other = tmp_path / "other-tokenizer"
    TrainedBPE(corpus=[str(data_file)], vocab_size=300, cache_dir=str(tmp_path / "c")).load().save_pretrained(other)
    expect_error(capsys, _resume(runs, data_file, other), "model.tokenizer", "trained with", root=runs)


def test_resume_with_another_strategy(runs, data_file, tokenizer_dir, capsys) -> None:
    argv = _resume(
        runs, data_file, tokenizer_dir, "--config", str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")
    )
    expect_error(capsys, argv, "trainer.strategy", "DeepSpeed", root=runs)


def test_resume_with_another_world_size(runs, tmp_path, data_file, tokenizer_dir, capsys) -> None:
    """The layout DeepSpeed writes for 2 ranks (file names only: shard contents are not read before the check)."""
    ckpt = tmp_path / "ds" / "checkpoints" / "last.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    for rank in (0, 1):
        (ckpt / "checkpoint" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, f"--ckpt_path={ckpt}", "--trainer.devices=1"),
            "--config", str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")]  # fmt: skip
    expect_error(capsys, argv, "ckpt_path", "saved by 2 processes", root=runs)


@pytest.mark.parametrize(
    ("ckpt", "word"), [("/nonexistent/last.ckpt", "does not exist"), ("last", "no run of experiment")]
)
def test_missing_checkpoint(ckpt, word, runs, data_file, tokenizer_dir, capsys) -> None:
    argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, f"--ckpt_path={ckpt}", "--experiment=nothing-here")]
    expect_error(capsys, argv, "ckpt_path", word, root=runs)


def test_second_writer_is_refused(runs, data_file, tokenizer_dir, capsys) -> None:
    (run,) = runs.iterdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "job": None}))
        before = (run / LOCK_FILE).read_text()
        code = main(_resume(runs, data_file, tokenizer_dir))
        message = capsys.readouterr().err
        assert code == 2 and f"being written by another litune process (pid {holder.pid}" in message
        assert "Traceback" not in message and (run / LOCK_FILE).read_text() == before, "the holder's lock is kept"
    finally:
        holder.kill()
        holder.wait()


def test_lock_that_names_no_process(runs, data_file, tokenizer_dir, capsys) -> None:
    (run,) = runs.iterdir()
    (run / LOCK_FILE).write_text("garbage")
    before = hashes(runs)
    assert main(_resume(runs, data_file, tokenizer_dir)) == 2
    err = capsys.readouterr().err
    assert f"rm {run / LOCK_FILE}" in err and "Traceback" not in err and hashes(runs) == before


# --- generation -----------------------------------------------------------------------------------------------------

GENERATION_CASES = {
    "zero length": (["--max-length", "0"], "--max-length", "positive"),
    "length not a number": (["--max-length", "ten"], "--max-length", "invalid int"),
    "zero temperature": (["--do-sample", "--temperature", "0"], "--temperature", "drop --do-sample"),
    "negative temperature": (["--do-sample", "--temperature", "-1"], "--temperature", "positive"),
    "top-p zero": (["--do-sample", "--top-p", "0"], "--top-p", "(0, 1]"),
    "top-p above one": (["--do-sample", "--top-p", "1.5"], "--top-p", "(0, 1]"),
    "top-k zero": (["--do-sample", "--top-k", "0"], "--top-k", "positive"),
    "no sequences": (["--num-return-sequences", "0"], "--num-return-sequences", "positive"),
    "greedy copies": (["--num-return-sequences", "3"], "--num-return-sequences", "--do-sample"),
    "length over context": (["--max-length", "500"], "--max-length", "context of 64"),
    "prompt longer than context": (["--prompt", "def f(x): return x " * 60], "--prompt", "context is 64"),
    "length shorter than prompt": (["--prompt", "def f(x): return x", "--max-length", "3"], "--max-length",
                                   "greater than"),
    "missing checkpoint": (["--checkpoint", "/nonexistent/run"], "--checkpoint", "does not exist"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generation(case, runs, capsys) -> None:
    (run,) = runs.iterdir()
    extra, field, word = GENERATION_CASES[case]
    argv = ["generate", *(["--checkpoint", str(run)] if "--checkpoint" not in extra else []), *extra]
    expect_error(capsys, argv, field, word, root=runs)


# --- environment ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_unwritable_runs_folder(where, runs, tmp_path, data_file, tokenizer_dir, capsys) -> None:
    # The tests run as root here, for whom chmod does not stop a write: a path under a regular file, or in /proc,
    # cannot be created by anyone.
    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "runs" if where == "under a file" else Path("/proc/litune-runs")
    argv = ["fit", *fit_args(runs, data_file, tokenizer_dir), f"--runs_dir={target}"]
    expect_error(capsys, argv, "runs_dir", str(target.parent if where == "under a file" else target), root=runs)


def test_missing_optional_logger_package(runs, data_file, tokenizer_dir, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as for an uninstalled package
    argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, "--loggers=[wandb]")]
    expect_error(capsys, argv, "", "wandb", "pip install", root=runs)


def test_missing_deepspeed(runs, data_file, tokenizer_dir, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    argv = ["fit", *fit_args(runs, data_file, tokenizer_dir), "--config",
            str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")]  # fmt: skip
    expect_error(capsys, argv, "trainer.strategy", "pip install deepspeed", root=runs)


@pytest.mark.parametrize("port", ["taken", "not-a-number"])
def test_master_port(port, runs, data_file, tokenizer_dir, capsys, monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]) if port == "taken" else "http")
        argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, "--trainer.devices=2", "--trainer.strategy=ddp")]
        expect_error(capsys, argv, "MASTER_PORT", "in use" if port == "taken" else "port number", root=runs)


# --- real processes: nothing but the paragraph reaches the terminal -------------------------------------------------


def run_litune(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LITUNE_RUN_DIR", "MASTER_PORT")}
    litune = str(Path(sys.executable).parent / "litune")
    return subprocess.run([litune, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize(
    "case",
    [
        "unknown strategy",
        pytest.param("truncated checkpoint", marks=pytest.mark.slow),  # ~10 s each: one real process is enough
        pytest.param("another architecture", marks=pytest.mark.slow),  # in the default suite
    ],
)
def test_real_process(case, runs, tmp_path, data_file, tokenizer_dir) -> None:
    (run,) = runs.iterdir()
    before = hashes(runs)
    if case == "unknown strategy":
        argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, "--trainer.strategy=foo")]
    elif case == "truncated checkpoint":
        argv = ["generate", "--checkpoint", str(_write_checkpoint("truncated", run, tmp_path))]
    else:
        argv = _resume(runs, data_file, tokenizer_dir, "--model.network.init_args.config.n_embd=64")
    proc = run_litune(*argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]) == 1
    after = hashes(runs)
    assert {name: after.get(name) for name in before} == before


def test_resume_full_checkpoint_with_adapters(runs, data_file, tokenizer_dir, capsys) -> None:
    argv = _resume(runs, data_file, tokenizer_dir, "--config", str(REPO / "configs" / "peft" / "lora.yaml"))
    expect_error(capsys, argv, "model.adapters", "adapter weights", root=runs)


@pytest.mark.parametrize("run", ["new", "resumed"])
def test_val_check_interval_longer_than_an_epoch(run, runs, data_file, tokenizer_dir, capsys) -> None:
    """Known only once Lightning's loop set the data up (after its setup hooks wrote): a resumed run's folder is put
    back, a new run's folder removed."""
    extra = ["--trainer.val_check_interval=100000", "--trainer.limit_val_batches=1"]
    argv = _resume(runs, data_file, tokenizer_dir, *extra)
    if run == "new":
        argv = ["fit", *fit_args(runs, data_file, tokenizer_dir, "--trainer.max_steps=4", *extra)]
    expect_error(capsys, argv, "trainer.val_check_interval", "training batches of an epoch", root=runs)


def test_folder_snapshot_puts_back_every_change(runs) -> None:
    """The backstop alone (no early check involved): changed, new and deleted files and new folders are undone."""
    from litune.run_guard import FolderSnapshot

    (run,) = runs.iterdir()
    before = hashes(runs)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    snapshot = FolderSnapshot(run)
    (run / "config.yaml").write_text("rewritten")
    (run / "hparams.yaml").unlink()
    (run / "events.out.tfevents.1").write_bytes(b"new")
    (run / "lightning_logs" / "version_0").mkdir(parents=True)
    snapshot.restore()
    assert hashes(runs) == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == mtimes
    assert not (run / "lightning_logs").exists()
    new = FolderSnapshot(runs / "new-run")
    (runs / "new-run" / "sub").mkdir(parents=True)
    (runs / "new-run" / "sub" / "config.yaml").write_text("x")
    new.restore()
    assert not (runs / "new-run").exists()


def test_last_after_an_early_kill_resumes_from_a_best_checkpoint(runs, data_file, tokenizer_dir, capsys) -> None:
    """Killed before its first cadence save, a run has only best-step*.ckpt: `--ckpt_path last` resumes from it."""
    (run,) = runs.iterdir()
    checkpoints = run / "checkpoints"
    for other in checkpoints.glob("step*.ckpt"):
        other.unlink()
    best = checkpoints / "best-step000002.ckpt"
    (checkpoints / "last.ckpt").rename(best)
    assert main(_resume(runs, data_file, tokenizer_dir, "--trainer.max_steps=3")) == 0
    assert f"resuming from {best}" in capsys.readouterr().err
    assert torch.load(checkpoints / "last.ckpt", weights_only=False, mmap=True)["global_step"] == 3


# --- sweeps ---------------------------------------------------------------------------------------------------------


def _sweep(tmp_path: Path, runs: Path, data: Path, tokenizer: Path, spec: dict, *extra: str) -> list[str]:
    import yaml

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    return ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "sweep"),
            *fit_args(runs, data, tokenizer, "--trainer.max_steps=2", *extra)]  # fmt: skip


@pytest.mark.slow  # one real trial (a child `litune fit`), ~15 s
def test_sweep_metric_never_logged_stops_after_the_first_trial(runs, tmp_path, data_file, tokenizer_dir, capsys):
    spec = {"method": "grid", "metric": "val/acc", "parameters": {"model.optimizer.init_args.lr": [1e-3, 2e-3, 3e-3]}}
    argv = _sweep(tmp_path, runs, data_file, tokenizer_dir, spec, "--trainer.limit_val_batches=1",
                  "--trainer.val_check_interval=1")  # fmt: skip
    message = expect_error(capsys, argv, "metric", "never logged 'val/acc'", "val/loss", root=runs)
    assert "train/loss" in message  # the metrics that do exist are named
    assert len(list((tmp_path / "sweep" / "trials").iterdir())) == 1, "the sweep went on after the first trial"


@pytest.mark.slow  # two real trials, ~30 s
def test_sweep_whose_trials_all_failed_exits_non_zero(runs, tmp_path, data_file, tokenizer_dir, capsys):
    # An absurd learning rate makes the loss non-finite at the second step; nonfinite=stop ends each trial (exit 1).
    spec = {"method": "grid", "parameters": {"model.optimizer.init_args.lr": [1e30, 1e31]}}
    argv = _sweep(tmp_path, runs, data_file, tokenizer_dir, spec, "--model.nonfinite=stop", "--trainer.max_steps=3")
    before = hashes(runs)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "all 2 trial(s) failed" in err and "Traceback" not in err
    assert hashes(runs) == before
