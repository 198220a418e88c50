"""MLflow against a real `mlflow server` on 127.0.0.1: params (secrets removed), metrics, artifacts, and a resumed
training continuing the same MLflow run, all read back with MlflowClient. Slow: the server takes ~20 s to start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from litune.cli import main
from litune.loggers import MLFLOW_RUN_ID_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.yaml")
MLFLOW_CONFIG = str(REPO / "configs" / "logger" / "mlflow.yaml")
FAKE_TOKEN = "fake-hf-token-0123456789abcdef"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real tracking server (SQLite backend, artifacts served over HTTP) on a free local port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
           "--artifacts-destination", str(root / "art")]  # fmt: skip
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_params_metrics_artifacts_and_resume_on_a_live_server(
    mlflow_server: str, tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)  # its value must not reach MLflow, wherever it is pasted
    runs_dir = tmp_path / "runs"
    args = [
        "fit", "--config", TINY, "--config", MLFLOW_CONFIG, f"--model.tokenizer={tokenizer_dir}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={runs_dir}", "--loggers=[csv]",
        "--trainer.limit_val_batches=0", f"--experiment=tiny-{FAKE_TOKEN}",
    ]  # fmt: skip
    try:
        assert main([*args, "--trainer.max_steps=2"]) == 0
        (run,) = runs_dir.iterdir()
        run_id = (run / MLFLOW_RUN_ID_FILE).read_text().strip()
        os.environ.pop("LITUNE_RUN_DIR", None)
        assert main([*args, "--trainer.max_steps=4", "--ckpt_path=last"]) == 0
        os.environ.pop("LITUNE_RUN_DIR", None)
        # `litune eval` of the run folder logs into the same MLflow run, at the last step (Lightning's index 3)
        assert main(["eval", "--checkpoint", str(run), "--tasks", "litune_python_mc", "--limit", "4"]) == 0
    finally:
        os.environ.pop("LITUNE_RUN_DIR", None)
    assert list(runs_dir.iterdir()) == [run]

    client = MlflowClient(tracking_uri=mlflow_server)
    (experiment,) = [e for e in client.search_experiments() if e.name == "litune"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == run_id, "the resumed training continued the same MLflow run"
    params = found.data.params
    assert params["config/trainer/max_steps"] == "2", "a resumed run keeps the params its first leg logged"
    assert params["config/model/optimizer/init_args/lr"] == "0.003"
    everything = json.dumps([params, found.data.tags])
    assert FAKE_TOKEN not in everything and "<redacted>" in everything
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == [0, 1, 2, 3], "metrics of both legs, each logged once"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "report", "eval"} <= artifacts
    evaluated = json.loads((run / "eval" / "eval_results.json").read_text())["metrics"]
    for key, value in evaluated.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == [(3, value)], key
    assert "eval/eval_results.json" in {a.path for a in client.list_artifacts(run_id, "eval")}
    assert client.get_run(run_id).info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(run_id, "report")}
    assert "report/loss.png" in plots
