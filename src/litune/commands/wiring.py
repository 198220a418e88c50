"""Config editing for ``litune fit``: which loggers and callbacks a run gets, added by
:class:`litune.commands.fit.LituneCLI` (``add_tracking_arguments`` when it builds the parser, ``add_tracking`` before it
instantiates the classes). It edits the parsed config only: nothing here is a callback.

The callbacks are added to the parsed config (``trainer.callbacks``) rather than hidden in code, so the saved
``config.yaml`` lists them and a user configures one by listing it with its own ``init_args`` (then it is not added a
second time), e.g.::

    trainer:
      callbacks:
        - class_path: litune.callbacks.ThroughputMonitor
          init_args: {peak_flops: 4.0e14}   # an accelerator the peak table does not know
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from litune.loggers import LOGGERS, logger_entries, resume_wandb_id

_TRACKING_CALLBACKS: list[tuple[str, dict[str, Any]]] = [
    ("litune.callbacks.ThroughputMonitor", {}),
    ("litune.callbacks.MemoryMonitor", {}),
    ("litune.callbacks.GradNormMonitor", {}),
    ("litune.callbacks.EnvironmentLogger", {}),
    ("lightning.pytorch.callbacks.LearningRateMonitor", {"logging_interval": "step"}),
]
_RESILIENCE_CALLBACKS: list[tuple[str, dict[str, Any]]] = [
    ("litune.callbacks.ExactResume", {}),  # random-number states per rank, metrics.csv without a killed attempt's tail
    ("litune.callbacks.Preemption", {}),  # SIGTERM/SIGUSR1: save at the next step boundary, exit 75, SLURM requeue
]
_ATOMIC_IO = "litune.strategies.atomic.AtomicCheckpointIO"
_PROGRESS_BAR = "litune.callbacks.LituneProgressBar"
_WANDB_RUN_ID = "litune.loggers.WandbRunId"


def add_tracking_arguments(parser: LightningArgumentParser) -> None:
    """Add ``--loggers`` (names) to a LightningCLI parser; call from ``add_arguments_to_parser``."""
    parser.add_argument(
        "--loggers",
        type=list[str] | None,
        default=None,
        help=f"Loggers by name, any of {sorted(LOGGERS)}, e.g. --loggers=[csv,wandb]; added to trainer.logger. "
        "Default: CSV and TensorBoard. For options, use a configs/logger/*.yaml fragment.",
    )


def _class_name(entry: Any) -> str:
    """``"ThroughputMonitor"`` for a config entry ``{class_path: litune.callbacks.throughput.ThroughputMonitor}``
    or for an already built object."""
    if isinstance(entry, (Namespace, dict)):
        return str(entry.get("class_path", "")).rsplit(".", 1)[-1]
    return type(entry).__name__


def as_list(value: Any) -> list[Any]:
    """A config entry that is one item, a list or unset (``None``, or a bool as in ``logger: false``) as a list."""
    if value in (None, True, False):
        return []
    return list(value) if isinstance(value, list) else [value]


def add_loggers(cfg: Namespace) -> None:
    """The logger part of :func:`add_tracking` (also used by ``litune eval`` to rebuild a run's loggers): ``--loggers``
    names become ``trainer.logger`` entries (an unknown name raises a ConfigError listing the valid ones), and a
    wandb logger continuing from ``ckpt_path`` gets the wandb run id stored in that checkpoint."""
    trainer = cfg.trainer
    if cfg.get("loggers") is not None:
        configured = as_list(trainer.logger)
        present = {_class_name(e) for e in configured}
        combined = configured + [e for e in logger_entries(cfg.loggers) if _class_name(e) not in present]
        trainer.logger = combined or False
    loggers = as_list(trainer.logger)
    wandb_entries = [e for e in loggers if isinstance(e, Namespace) and "Wandb" in _class_name(e)]
    if wandb_entries and cfg.get("ckpt_path"):
        run_id = resume_wandb_id(cfg.ckpt_path)
        for entry in wandb_entries:
            if entry.get("init_args") is None:
                entry.init_args = Namespace()
            if run_id and entry.init_args.get("id") is None:
                entry.init_args.id = run_id


def add_tracking(cfg: Namespace) -> None:
    """Complete a parsed ``fit`` config before its classes are built; call from ``before_instantiate_classes``
    *before* the CLI points the loggers at the run folder.

    * ``--loggers`` names become logger entries (an unknown name raises a ConfigError listing the valid ones);
    * a wandb logger resuming from ``ckpt_path`` gets the wandb run id stored in that checkpoint;
    * the tracking callbacks (throughput/MFU, memory, gradient norm, environment, learning rate, the wandb id keeper)
      and the progress bar are appended to ``trainer.callbacks`` unless already listed there, and so are the
      callbacks that make runs survive kills (:class:`~litune.callbacks.ExactResume`,
      :class:`~litune.callbacks.Preemption`);
    * checkpoint files are written atomically (:class:`~litune.strategies.atomic.AtomicCheckpointIO` in
      ``trainer.plugins``) unless a ``CheckpointIO`` is configured there.
    """
    add_loggers(cfg)
    trainer = cfg.trainer
    callbacks = as_list(trainer.get("callbacks"))
    present = {_class_name(c) for c in callbacks}
    wanted = list(_TRACKING_CALLBACKS) + list(_RESILIENCE_CALLBACKS)
    if trainer.logger is False or trainer.logger == []:  # LearningRateMonitor refuses to run without a logger
        wanted = [w for w in wanted if not w[0].endswith("LearningRateMonitor")]
    # Always kept, even without wandb: a run resumed with a different set of loggers then finds the state it expects.
    wanted.append((_WANDB_RUN_ID, {}))
    has_progress = any("ProgressBar" in p for p in present)
    if trainer.get("enable_progress_bar") is not False and not has_progress:
        wanted.append((_PROGRESS_BAR, {}))
    for class_path, init_args in wanted:
        if class_path.rsplit(".", 1)[-1] not in present:
            callbacks.append(Namespace(class_path=class_path, init_args=Namespace(**init_args)))
    trainer.callbacks = callbacks
    plugins = as_list(trainer.get("plugins"))
    if not any("CheckpointIO" in _class_name(p) for p in plugins):  # a user's own CheckpointIO (e.g. async) wins
        trainer.plugins = [*plugins, Namespace(class_path=_ATOMIC_IO, init_args=Namespace())]
