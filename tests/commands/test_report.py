"""``litune report`` and the TensorBoard dashboard on real tiny runs made by ``litune fit``."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from matplotlib.image import imread

from litune.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")


def fit(runs_dir: Path, corpus_dir: Path, tokenizer_dir: Path, *extra: str) -> Path:
    """One real tiny ``litune fit`` (6 steps, validation at steps 3 and 6); returns its run folder."""
    before = set(runs_dir.glob("*")) if runs_dir.exists() else set()
    args = [
        "fit", "--config", TINY, f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={runs_dir}",
        "--trainer.max_steps=6", "--trainer.val_check_interval=3", *extra,
    ]  # fmt: skip
    try:
        assert main(args) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)  # the CLI sets it for its own ranks; the next fit is a new run
    (run,) = set(runs_dir.glob("*")) - before
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir, tokenizer_dir) -> tuple[Path, Path]:
    """Two identical seeded runs: one logging CSV + TensorBoard (the default), one TensorBoard only."""
    runs_dir = tmp_path_factory.mktemp("runs")
    default = fit(runs_dir, corpus_dir, tokenizer_dir, "--experiment=csv-and-tb")
    tb_only = fit(runs_dir, corpus_dir, tokenizer_dir, "--experiment=tb-only", "--loggers=[tensorboard]")
    return default, tb_only


def csv_columns(run: Path) -> dict[str, list[float]]:
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r[key]] for key in rows[0] if key not in ("step", "epoch")}


def table(summary_md: str) -> dict[str, list[str]]:
    """``{metric: [cell per run]}`` from the Markdown table."""
    lines = [line for line in summary_md.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_report_writes_plots_and_a_table_matching_the_csv(runs, tmp_path, capsys) -> None:
    run, _ = runs
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    for stem in ("loss", "perplexity", "learning_rate", "tokens_per_sec"):
        image = imread(out / f"{stem}.png")  # [H, W, RGBA] in [0, 1]
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.02, f"{stem}.png is blank"
    summary = (out / "summary.md").read_text()
    assert summary.split("\n\nRuns:")[0].removeprefix("# litune report\n\n") in capsys.readouterr().out
    cells = {k: v[0] for k, v in table(summary).items()}
    columns = csv_columns(run)
    assert number(cells["final train/loss"]) == pytest.approx(columns["train/loss"][-1], rel=1e-3)
    assert number(cells["final val/loss"]) == pytest.approx(columns["val/loss"][-1], rel=1e-3)
    assert number(cells["best val/loss"]) == pytest.approx(min(columns["val/loss"]), rel=1e-3)
    assert number(cells["final val/ppl"]) == pytest.approx(columns["val/ppl"][-1], rel=1e-3)
    assert number(cells["tokens seen"]) == columns["train/tokens_seen"][-1] == 6 * 4 * 31  # target tokens
    tps = columns["perf/tokens_per_sec"]
    assert number(cells["mean tokens/s"]) == pytest.approx(sum(tps) / len(tps), rel=1e-3)
    assert number(cells["peak memory (GiB)"]) == pytest.approx(max(columns["memory/peak_gib"]), rel=1e-3)
    assert cells["mean MFU"] == "–", "no MFU on CPU: its peak FLOP/s is unknown"
    elapsed = columns["perf/elapsed_s"][-1]
    if cells["wall time"].endswith(" s"):
        assert float(cells["wall time"][:-2]) == pytest.approx(elapsed, abs=0.05)
    else:
        h, m, s = map(int, cells["wall time"].split(":"))
        assert h * 3600 + m * 60 + s == round(elapsed)
    assert number(cells["steps"]) == 6


def test_report_puts_runs_side_by_side_and_reads_tensorboard_only_runs(runs, tmp_path) -> None:
    default, tb_only = runs
    assert not list(tb_only.rglob("metrics.csv"))
    out = tmp_path / "both"
    assert main(["report", str(default), str(tb_only), "--out", str(out)]) == 0
    rows = table((out / "summary.md").read_text())
    header = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| metric"))
    assert default.name in header and tb_only.name in header
    # Same seed and config: the TensorBoard-only run reached the same losses (float32 events vs CSV text).
    for key in ("final train/loss", "final val/loss", "tokens seen"):
        assert number(rows[key][0]) == pytest.approx(number(rows[key][1]), rel=1e-3), key
    assert imread(out / "loss.png")[..., :3].std() > 0.02


def test_report_rejects_a_folder_without_metrics(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.csv" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
        return json.loads(response.read())


def test_tensorboard_server_serves_the_run_scalars(runs) -> None:
    run, _ = runs
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [str(tensorboard), "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    try:
        deadline, tags = time.monotonic() + 90, {}
        while time.monotonic() < deadline and "train/loss" not in str(tags):
            assert server.poll() is None, server.stderr.read()
            try:
                tags = get_json(f"{base}/tags")
            except OSError:
                pass  # not listening yet, or still loading the run
            time.sleep(0.5)
        assert "train/loss" in str(tags), f"tags seen: {tags}"
        (run_name,) = tags  # the run folder itself is the only run: "."
        query = urllib.parse.urlencode({"run": run_name, "tag": "train/loss"})
        points = get_json(f"{base}/scalars?{query}")  # [[wall_time, step, value], ...]
    finally:
        server.terminate()
        server.wait(timeout=30)
    losses = csv_columns(run)["train/loss"]
    assert [p[2] for p in points] == pytest.approx(losses, rel=1e-5)
    assert [p[1] for p in points] == sorted(p[1] for p in points)
    assert re.fullmatch(r"\.?", run_name)
