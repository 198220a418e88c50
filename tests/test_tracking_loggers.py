"""Loggers through the real ``litune fit``: CSV, TensorBoard and wandb (offline) read back, secrets kept out of every
file, the wandb run id kept across a resume, wandb failures survived, one wandb run under 2-process DDP."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from litune.cli import main
from litune.loggers import LOGGERS

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
LOGGER_CONFIGS = REPO / "configs" / "logger"
TOKENS_PER_STEP = 4 * 31  # tiny.yaml: batch_size 4, block_size 32, packed: 31 next-token targets a row
FAKE_ENV_KEY = "fake-env-wandb-key-5f1c0ffee0123456789abcdef"
FAKE_CONFIG_KEY = "fake-config-api-key-0badc0de987654321"


def fit_args(runs_dir: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", TINY, f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={runs_dir}", *extra,
    ]  # fmt: skip


def fit(*args: str) -> int:
    """One in-process ``litune fit``. A real ``litune fit`` is one process, whose exit closes the wandb run and whose
    LITUNE_RUN_DIR dies with it; several fits in one test process must do both by hand."""
    try:
        return main(list(args))
    finally:
        wandb.finish()
        os.environ.pop("LITUNE_RUN_DIR", None)


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Decode a ``run-<id>.wandb`` file into wandb's own protobuf records.

    wandb 0.31 ships its reader only inside the Go ``wandb-core`` binary, so the container is read here: a 7-byte
    ``:W&B`` header, then LevelDB-log framing (32 KiB blocks of chunks with a 7-byte header: crc32, length, type
    FULL=1/FIRST=2/MIDDLE=3/LAST=4). Each record is a ``wandb_internal_pb2.Record``.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_wandb_records(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a wandb run once its ``exit`` record is written: wandb's service process writes the file
    asynchronously, and ``wandb.finish()`` can return before the last records reach the disk."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def item_key(item: wandb_internal_pb2.HistoryItem | wandb_internal_pb2.ConfigItem) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_history(records: list[wandb_internal_pb2.Record], key: str) -> dict[int, float]:
    """``{trainer/global_step: value}`` of one metric from the history records."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            if key in items:
                out[int(items["trainer/global_step"])] = float(items[key])
    return out


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def csv_series(run_dir: Path, key: str) -> dict[int, float]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def the_run(runs_dir: Path) -> Path:
    (run,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    return run


def test_csv_tensorboard_and_wandb_combine_read_back_and_keep_secrets_out(
    tmp_path, corpus_dir, tokenizer_dir, monkeypatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_ENV_KEY)
    wandb_cfg = yaml.safe_load((LOGGER_CONFIGS / "wandb.yaml").read_text())
    wandb_cfg["trainer"]["logger+"][0]["init_args"]["api_key"] = FAKE_CONFIG_KEY  # a config field named api_key
    (tmp_path / "wandb-with-key.yaml").write_text(yaml.safe_dump(wandb_cfg))
    fragments = [LOGGER_CONFIGS / "csv.yaml", LOGGER_CONFIGS / "tensorboard.yaml", tmp_path / "wandb-with-key.yaml"]
    runs_dir = tmp_path / "runs"
    extra = [a for f in fragments for a in ("--config", str(f))]
    assert (
        fit(
            *fit_args(
                runs_dir, corpus_dir, tokenizer_dir, *extra, "--trainer.max_steps=4", "--trainer.val_check_interval=2"
            )
        )
        == 0
    )
    run = the_run(runs_dir)

    loss = csv_series(run, "train/loss")
    assert len(loss) == 4
    for key in ("train/ppl", "val/loss", "val/ppl", "train/grad_norm", "perf/tokens_per_sec", "perf/samples_per_sec",
                "perf/step_time_s", "perf/elapsed_s", "memory/peak_gib", "lr-AdamW/pg1"):  # fmt: skip
        assert csv_series(run, key), f"{key} missing from metrics.csv"
    assert csv_series(run, "train/tokens_seen") == {s: (s + 1) * TOKENS_PER_STEP for s in range(4)}
    with (run / "metrics.csv").open() as f:
        assert "perf/mfu" not in f.readline(), "no MFU on CPU (unknown peak), rather than a fake zero"

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(loss, rel=1e-6)
    assert {"perf/tokens_per_sec", "memory/peak_gib", "train/grad_norm"} <= set(events.Tags()["scalars"])

    (wandb_file,) = wandb_runs(run)
    records = finished_wandb_records(wandb_file)
    assert wandb_history(records, "train/loss") == pytest.approx(loss, rel=1e-6)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.project == "litune" and wandb_file.name == f"run-{run_record.run_id}.wandb"
    config = {item_key(i): json.loads(i.value_json) for r in records for i in r.config.update}
    assert config["env"]["versions"]["torch"] == torch.__version__ and config["env"]["world_size"] == 1
    assert config["config"]["trainer"]["max_steps"] == 4, "the resolved config is logged to wandb"

    env = json.loads((run / "env.json").read_text())
    assert env["accelerator"] == "cpu" and env["versions"]["lightning"] and env["devices"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (wandb_entry,) = [e for e in saved["trainer"]["logger"] if e["class_path"].endswith("WandbLogger")]
    assert wandb_entry["init_args"]["api_key"] == "<redacted>"
    for path in run.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert FAKE_ENV_KEY.encode() not in content and FAKE_CONFIG_KEY.encode() not in content, path


def test_mfu_through_the_cli_matches_the_palm_formula_computed_by_hand(tmp_path, corpus_dir, tokenizer_dir) -> None:
    # tiny.yaml's GPT-2: vocab V=512, positions P=64, d=32, L=2 layers, sequences of T=32 tokens.
    # Matmul weights per block: c_attn 32*96 + attn c_proj 32*32 + c_fc 32*128 + mlp c_proj 128*32 = 12,288.
    # N = output layer (tied to the token table) 512*32 + 2 blocks = 16,384 + 24,576 = 40,960
    #   (lookups, layer norms and biases are no matmul: left out).
    # flops/token = 6N + 12*L*d*T = 245,760 + 24,576 = 270,336.
    flops_per_token, peak = 270_336, 1.0e12  # a made-up peak: the CPU has none
    runs_dir = tmp_path / "runs"
    monitor = ["--trainer.callbacks+=litune.callbacks.ThroughputMonitor", f"--trainer.callbacks.peak_flops={peak}"]
    args = fit_args(runs_dir, corpus_dir, tokenizer_dir, "--loggers=[csv]", "--trainer.max_steps=3", *monitor)
    assert fit(*args) == 0
    run = the_run(runs_dir)
    tokens_per_sec, mfu = csv_series(run, "perf/tokens_per_sec"), csv_series(run, "perf/mfu")
    assert set(mfu) == set(tokens_per_sec) == {0, 1, 2}
    for step, value in mfu.items():
        assert value == pytest.approx(flops_per_token * tokens_per_sec[step] / peak, rel=1e-9)
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["callbacks"]
    assert [c["class_path"] for c in saved].count("litune.callbacks.ThroughputMonitor") == 1, "not added twice"


def test_resume_continues_the_same_wandb_run(tmp_path, corpus_dir, tokenizer_dir, capsys) -> None:
    runs_dir = tmp_path / "runs"
    args = fit_args(runs_dir, corpus_dir, tokenizer_dir, "--loggers=[csv,wandb]")
    assert fit(*args, "--trainer.max_steps=3", "--trainer.enable_progress_bar=true") == 0
    # stdout is not a terminal under pytest: the progress bar prints plain lines, one per logging step
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("train/loss" in line and "perf/tokens_per_sec" in line and "eta" in line for line in lines)
    run = the_run(runs_dir)
    (first,) = wandb_runs(run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["callbacks"]["WandbRunId"]["wandb_id"] == first.stem.removeprefix("run-")

    assert fit(*args, "--trainer.max_steps=5", "--ckpt_path=last") == 0
    assert the_run(runs_dir) == run, "a resume continues in the same run folder"
    first_again, second = wandb_runs(run)
    assert first_again == first and second.parent != first.parent
    assert second.name == first.name, "the resumed wandb run has the same id"
    tokens = {s: (s + 1) * TOKENS_PER_STEP for s in range(5)}
    assert csv_series(run, "train/tokens_seen") == tokens, "metrics.csv continues (not restarted) on resume"
    resumed = finished_wandb_records(second)
    assert wandb_history(resumed, "train/tokens_seen") == {3: 4 * TOKENS_PER_STEP, 4: 5 * TOKENS_PER_STEP}


@pytest.mark.parametrize(
    ("api_key", "expected"),
    [
        ("too-short-to-be-a-wandb-key", "AuthenticationError"),  # a login problem
        ("f" * 40, "127.0.0.1:9"),  # a well-formed key, but the server cannot be reached
    ],
    ids=["bad-key", "unreachable-server"],
)
def test_wandb_login_or_server_failure_warns_once_and_training_finishes(
    tmp_path, corpus_dir, tokenizer_dir, monkeypatch, api_key, expected
) -> None:
    # No internet here, and none is needed: a closed loopback port stands for an unreachable wandb server.
    # (A settings field rather than $WANDB_BASE_URL: wandb ignores environment changes once its service runs.)
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    init_args = {"mode": "online", "init_timeout": 3, "settings": {"base_url": "http://127.0.0.1:9"}}
    online = {"trainer": {"logger+": [{"class_path": "litune.loggers.WandbLogger", "init_args": init_args}]}}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(online))
    runs_dir = tmp_path / "runs"
    args = fit_args(runs_dir, corpus_dir, tokenizer_dir, "--config", str(tmp_path / "online.yaml"))
    with pytest.warns(UserWarning, match="(?s)wandb: .*training goes on") as caught:
        assert fit(*args, "--trainer.max_steps=2", "--loggers=[csv]") == 0
    messages = [str(w.message) for w in caught if "training goes on" in str(w.message)]
    assert len(messages) == 1 and expected in messages[0], messages
    run = the_run(runs_dir)
    assert len(csv_series(run, "train/loss")) == 2, "local logging went on"
    (offline,) = wandb_runs(run)
    assert wandb_history(finished_wandb_records(offline), "train/loss"), "wandb fell back to an offline run"


def test_unknown_logger_name_fails_before_training_with_the_valid_names(
    tmp_path, corpus_dir, tokenizer_dir, capsys
) -> None:
    runs_dir = tmp_path / "runs"
    assert fit(*fit_args(runs_dir, corpus_dir, tokenizer_dir, "--loggers=[csv,wandbb]")) == 2
    err = capsys.readouterr().err
    assert "wandbb" in err and str(sorted(LOGGERS)) in err  # the valid names, read from the source
    assert not list(runs_dir.glob("*/checkpoints")), "nothing trained"


def fit_two_processes(runs_dir: Path, corpus_dir: Path, tokenizer_dir: Path, *strategy: str) -> Path:
    """A real 2-process CPU ``litune fit`` (3 steps, CSV + wandb), started as a user would; returns the run folder."""
    args = fit_args(runs_dir, corpus_dir, tokenizer_dir, "--loggers=[csv,wandb]", "--trainer.max_steps=3",
                    "--trainer.devices=2", "--trainer.accelerator=cpu", *strategy)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("LITUNE_RUN_DIR", None)
    env.pop("WANDB_SERVICE", None)  # set by earlier in-process wandb runs: the new process must start its own
    result = subprocess.run(
        [sys.executable, "-m", "litune.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return the_run(runs_dir)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    return fit_two_processes(tmp_path_factory.mktemp("ddp"), corpus_dir, tokenizer_dir, "--trainer.strategy=ddp")


@pytest.mark.distributed
def test_ddp_with_two_processes_makes_one_wandb_run_with_global_counts(ddp_run) -> None:
    (wandb_file,) = wandb_runs(ddp_run)  # exactly one wandb run for two ranks
    assert not list(ddp_run.glob("wandb/run-*")), "no online run attempted"
    # tokens are counted on each rank and summed: 2 ranks x 128 tokens per step
    assert wandb_history(finished_wandb_records(wandb_file), "train/tokens_seen") == {
        s: 2 * (s + 1) * TOKENS_PER_STEP for s in range(3)
    }
    header = (ddp_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"memory/peak_gib/rank0", "memory/peak_gib/rank1", "train/grad_norm", "perf/tokens_per_sec"} <= set(header)
    env_json = json.loads((ddp_run / "env.json").read_text())
    assert env_json["world_size"] == 2 and env_json["strategy"] == "DDPStrategy"


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero2_logs_the_same_metrics_as_ddp(ddp_run, tmp_path, corpus_dir, tokenizer_dir) -> None:
    """Same seed, data and world size: ZeRO-2 (gradients partitioned, norm read from the DeepSpeed engine) must log
    the same losses, gradient norms and token counts as DDP, into one wandb run."""
    zero2 = str(REPO / "configs" / "strategy" / "deepspeed_zero2.yaml")
    run = fit_two_processes(tmp_path / "runs", corpus_dir, tokenizer_dir, "--config", zero2)
    (wandb_file,) = wandb_runs(run)
    for key in ("train/loss", "train/grad_norm", "train/tokens_seen"):
        assert csv_series(run, key) == pytest.approx(csv_series(ddp_run, key), rel=1e-4), key
    assert wandb_history(finished_wandb_records(wandb_file), "train/grad_norm") == pytest.approx(
        csv_series(run, "train/grad_norm"), rel=1e-6
    )
    assert json.loads((run / "env.json").read_text())["strategy"] == "DeepSpeedStrategy"
