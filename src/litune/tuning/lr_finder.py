"""``litune tune lr``: Lightning's learning-rate range test on the configured model and data.

Lightning's :meth:`~lightning.pytorch.tuner.Tuner.lr_find` does the work (an exponential LR sweep over
``num_training`` optimizer steps, the loss smoothed and the steepest descent suggested); this module builds the model,
data and trainer exactly as ``litune fit`` would, gives the finder a run folder of its own, and writes what it found.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from litune import host_memory
from litune.commands.fit import LituneCLI, parse_config
from litune.errors import ConfigError
from litune.runs import RUN_DIR_ENV, checkpoints_dir, resolve_run_dir


@dataclass
class LRFindResult:
    """The range test's outcome.

    Attributes:
        suggestion: the learning rate at the steepest loss descent.
        run_dir: the finder's run folder (``lr_find.png``, ``lr_find.json``).
        lrs: the learning rate of each optimizer step of the test.
        losses: the smoothed training loss after each step (``nan`` where it diverged).
    """

    suggestion: float
    run_dir: Path
    lrs: list[float]
    losses: list[float]


def build(argv: list[str], folder_suffix: str) -> tuple[LituneCLI, Path]:
    """Build model, data and trainer as ``litune fit`` does, running nothing, in a run folder of its own
    (``<experiment>-<folder_suffix>``) and without loggers: a range test's losses are not a training run's metrics.

    Returns:
        The built CLI (``.model``, ``.datamodule``, ``.trainer``) and the run folder.
    """
    cfg = parse_config(argv)
    run_dir, _ = resolve_run_dir(cfg.runs_dir, f"{cfg.experiment}-{folder_suffix}", None)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The finder's temporary checkpoint goes into the run folder, then is removed.
    overrides = [
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    if cfg.checkpoint.dirpath is None:
        overrides.append(f"--checkpoint.dirpath={checkpoints_dir(run_dir)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter")
        return LituneCLI(args=[*argv, *overrides], run=False), run_dir


def find_lr(argv: list[str], min_lr: float = 1e-7, max_lr: float = 1.0, num_training: int = 100) -> LRFindResult:
    """Run the range test on the config given by ``argv`` and write its plot and numbers into a new run folder.

    Args:
        argv: ``--config`` files and dotted overrides, as for ``litune fit``.
        min_lr: the learning rate of the first step.
        max_lr: the learning rate of the last step (the test stops earlier when the loss diverges).
        num_training: optimizer steps of the test, one learning rate each.

    Raises:
        ConfigError: a bad range, or a test that found no usable descent.
    """
    from lightning.pytorch.tuner import Tuner

    if not 0 < min_lr < max_lr:
        raise ConfigError("--min-lr/--max-lr", f"need 0 < min_lr < max_lr, got {min_lr} and {max_lr}", "fix the range")
    if num_training < 5:
        raise ConfigError("--num-training", f"{num_training} steps are too few for a range test", "use at least 20")
    cli, run_dir = build(argv, "lr-find")
    os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks that Lightning's launcher starts write into the same folder
    try:
        finder = Tuner(cli.trainer).lr_find(
            cli.model,
            datamodule=cli.datamodule,
            min_lr=min_lr,
            max_lr=max_lr,
            num_training=num_training,
            update_attr=False,  # the suggestion is reported (and written with --apply), never applied silently
        )
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    lrs = [float(x) for x in finder.results["lr"]]
    losses = [float(x) for x in finder.results["loss"]]
    suggestion = finder.suggestion()
    if suggestion is None or not math.isfinite(suggestion):
        raise ConfigError(
            "--num-training",
            f"the range test found no usable descent of the loss ({sum(map(math.isfinite, losses))} finite losses "
            f"out of {len(losses)})",
            "raise --num-training, lower --max-lr, or check that the training loss is finite",
        )
    if cli.trainer.is_global_zero:
        figure = finder.plot(suggest=True, show=False)
        figure.axes[0].set_title(f"learning-rate range test: suggestion {suggestion:.3g}")
        figure.savefig(run_dir / "lr_find.png", dpi=100)
        record = {"suggestion": suggestion, "min_lr": min_lr, "max_lr": max_lr, "lr": lrs, "loss": losses}
        record["host_allocator"] = "keep_freed" if host_memory.applied else "default"  # as env.json of a fit
        (run_dir / "lr_find.json").write_text(json.dumps(record, indent=1, allow_nan=True))
    return LRFindResult(suggestion=float(suggestion), run_dir=run_dir, lrs=lrs, losses=losses)


def write_lr_fragment(path: Path, lr: float) -> Path:
    """A config fragment that sets the optimizer's learning rate; add it as the last ``--config``.

    Only ``init_args.lr`` is given, so the configured optimizer class and its other arguments are kept when the
    fragment merges over the experiment's config.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fragment = {"model": {"optimizer": {"init_args": {"lr": float(f"{lr:.3g}")}}}}
    path.write_text("# written by `litune tune lr --apply`\n" + yaml.safe_dump(fragment, sort_keys=False))
    return path
