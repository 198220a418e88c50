"""``litune sweep --config X [--config Y ...] --sweep sweep.yaml [--sweep-dir DIR] [overrides]``

Grid, random or Bayesian (Optuna TPE) search over any config field named with dots. Each trial is an ordinary
``litune fit`` run folder under ``DIR/trials/``; bad trials are pruned early from their logged validation metric; the
results table (``DIR/results.md``, ``DIR/results.csv``) is sorted by the metric and ``litune report`` compares the best
trials in ``DIR/report/``. Run the same command again after an interruption: finished trials are kept, the one that was
running is run again, and the rest follow.

A sweep file::

    method: random            # grid | random | bayes
    metric: val/loss          # a validation metric the runs log
    direction: minimize
    trials: 8                 # grid: every combination unless fewer are asked for
    parallel: 1               # trials at once (GPUs: one device each)
    pruner: median            # or none; startup_trials and warmup_steps tune it
    parameters:
      model.optimizer.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
      model.optimizer.init_args.weight_decay: {values: [0.0, 0.1]}
      data.init_args.batch_size: {values: [8, 16]}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from litune.errors import ConfigError
from litune.run_guard import RunLock


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litune sweep", add_help=False)
    parser.add_argument("--sweep", type=Path, required=True, help="the sweep YAML file")
    parser.add_argument("--sweep-dir", type=Path, default=None, help="sweep folder (default: runs/sweep-<file name>)")
    return parser


def main(argv: list[str]) -> int:
    from litune.commands.tune import launch_shape
    from litune.tuning.sweep import load_spec

    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    if not any(a == "--sweep" or a.startswith("--sweep=") for a in argv):
        raise ConfigError("--sweep", "no sweep file given", "add --sweep sweep.yaml")
    args, fit_args = build_parser().parse_known_args(argv)
    spec = load_spec(args.sweep)
    on_gpu, _, _ = launch_shape(fit_args)  # also rejects a bad config before any trial starts
    folder = args.sweep_dir or Path("runs") / f"sweep-{args.sweep.stem}"
    lock = _lock_sweep_folder(folder)
    try:
        return _run(args.sweep, spec, fit_args, folder, on_gpu)
    finally:
        lock.release()


def _lock_sweep_folder(folder: Path) -> RunLock:
    """Hold ``<folder>/.litune.lock`` (litune's run-folder lock) so that two sweeps never share a folder.

    Raises:
        ConfigError: another live sweep holds it (a killed sweep's lock is reported and taken over).
    """
    try:
        return RunLock(folder).acquire()
    except ConfigError as err:
        raise ConfigError(
            "--sweep-dir",
            f"{folder} is in use by another litune sweep ({err.problem}); two sweeps in one folder would run the "
            "same trials twice",
            f"wait for that sweep to finish, or give another --sweep-dir ({err.fix})",
        ) from None


def _run(sweep_file: Path, spec: Any, fit_args: list[str], folder: Path, on_gpu: bool) -> int:
    """Run the sweep; the exit status: 0, or 1 when every trial failed (the sweep found nothing)."""
    from litune.commands import report
    from litune.tuning.sweep import Sweep

    saved = folder / "sweep.yaml"
    if saved.exists() and saved.read_text() != sweep_file.read_text():
        raise ConfigError(
            "--sweep-dir",
            f"{folder} holds a sweep started from another sweep file (its copy: {saved})",
            "give a new --sweep-dir, or restore the sweep file to continue that sweep",
        )
    saved.write_text(sweep_file.read_text())
    sweep = Sweep(spec, fit_args, folder, accelerator="gpu" if on_gpu else "cpu")
    rows = sweep.run()
    print(f"\n{sweep.write_table(rows)}\n\nresults: {folder / 'results.md'}, {folder / 'results.csv'}", flush=True)
    if rows and all(r.state == "failed" for r in rows):
        print(
            f"litune sweep: all {len(rows)} trial(s) failed, so the sweep found nothing; each trial's output is in "
            f"{folder / 'logs'}",
            file=sys.stderr,
        )
        return 1
    best = [Path(r.run_dir) for r in rows if r.state == "complete" and r.run_dir][: spec.best]
    if best:
        runs = [report.load_run(p) for p in best]
        report.write_report(runs, folder / "report")
        print(f"report of the best {len(best)} trial(s): {folder / 'report' / 'summary.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
