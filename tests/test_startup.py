"""Start-up: the light subcommands do not import torch, transformers or Lightning (seconds of imports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "lightning", "deepspeed")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["report", "--help"], ["estimate", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_light_commands_do_not_import_the_heavy_libraries(argv: list[str]) -> None:
    code = (
        "import sys\nfrom litune.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"litune {' '.join(argv)} imported heavy modules"


def test_fit_still_reaches_lightning_cli() -> None:
    """The lazy dispatcher hands `fit --help` to LightningCLI, which lists the trainer's and model's fields."""
    proc = subprocess.run(
        [sys.executable, "-m", "litune.cli", "fit", "--help"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "--trainer.max_steps" in proc.stdout and "--model.network" in proc.stdout


def test_report_on_a_csv_run_does_not_import_torch(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss,train/ppl\n0,5.0,148.4\n1,4.5,90.0\n")
    code = (
        "import sys\nfrom litune.cli import main\n"
        f"assert main(['report', {str(run)!r}, '--out', {str(tmp_path / 'out')!r}]) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "summary.md").exists()
