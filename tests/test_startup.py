"""Start-up: the light subcommands do not import torch, transformers or Lightning (seconds of imports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "lightning", "deepspeed")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["report", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_light_commands_do_not_import_the_heavy_libraries(argv: list[str]) -> None:
    code = (
        "import sys\nfrom litune.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    assert proc.stdout.strip().splitlines()[-1] == "[]", f"litune {' '.join(argv)} imported heavy modules"


def test_fit_still_reaches_lightning_cli() -> None:
    """The lazy dispatcher hands `fit --help` to LightningCLI, which lists the trainer's and model's fields."""
    proc = subprocess.run(
        [sys.executable, "-m", "litune.cli", "fit", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "--trainer.max_steps" in proc.stdout and "--model.network" in proc.stdout
