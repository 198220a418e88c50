"""Run folders: their layout, how one is chosen or found, and which job and process this is.

A run folder ``<runs_dir>/<YYYYmmdd-HHMMSS>-<experiment>/`` (or ``<experiment>-job<id>/`` in a job with an id) holds
``config.yaml``, ``tokenizer/``, the loggers' files and ``checkpoints/`` with ``last.ckpt``. Every command that writes
or reads a run folder takes these names from here.

The job id comes from the launcher, in one order of precedence: ``LITUNE_RUN_ID`` (for launchers with no id of their
own, e.g. ``launch/deepspeed.sh``), then SLURM's ``SLURM_JOB_ID``, then torchrun's ``TORCHELASTIC_RUN_ID``. Every rank
of one job, and every requeued incarnation of it, sees the same id and so the same run folder.

Nothing heavy is imported at module level (``litune.tuning.runner`` starts child runs with it).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from litune.errors import ConfigError
from litune.launcher_env import LAUNCHED_ENVS, RANK_ENVS, TORCHRUN_RUN_ID_ENV

CHECKPOINTS_DIR = "checkpoints"
"""Sub-folder of a run folder holding its checkpoints."""

LAST_CHECKPOINT = "last.ckpt"
"""The checkpoint ``--ckpt_path last`` resumes: written at every save (Lightning's ``save_last``)."""

TOKENIZER_DIR = "tokenizer"
"""Sub-folder of a run folder holding the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ...)."""

CONFIG_FILE = "config.yaml"
"""The resolved config of the run's ``litune fit``."""

DEFAULT_RUNS_DIR = "runs"

RUN_DIR_ENV = "LITUNE_RUN_DIR"
"""Set by the first process (or a launch script) so that every rank of a run writes into the same run folder."""

RUN_ID_ENV = "LITUNE_RUN_ID"
"""A job id for launchers that have none of their own (``launch/deepspeed.sh`` sets it)."""

JOB_ID_ENVS = (RUN_ID_ENV, "SLURM_JOB_ID", TORCHRUN_RUN_ID_ENV)
"""Where a job's id is read from, first found wins."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run>/checkpoints/last.ckpt`` (which may not exist yet)."""
    return checkpoints_dir(run_dir) / LAST_CHECKPOINT


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint lives in (``<run>/checkpoints/<name>.ckpt``), or None for a checkpoint elsewhere."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None


def run_tokenizer(run_dir: str | Path) -> Path | None:
    """The tokenizer folder ``litune fit`` saved in ``run_dir``, or None for a run folder written before it did."""
    folder = Path(run_dir) / TOKENIZER_DIR
    return folder if (folder / "tokenizer_config.json").is_file() else None


def job_id() -> str | None:
    """The id every rank (and every requeued incarnation) of this job shares, or None outside a launched job."""
    for var in JOB_ID_ENVS:
        value = os.environ.get(var)
        if value and value != "none":  # torchrun's default rendezvous id is "none"
            return value
    return None


def slurm_requeue_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def is_launched() -> bool:
    """Whether a launcher (torchrun, SLURM) started this process: then it owns the rendezvous port."""
    return any(var in os.environ for var in LAUNCHED_ENVS)


def is_launched_rank() -> bool:
    """Whether this process is a non-zero rank of a launched job (those share the launching rank's run folder)."""
    for var in RANK_ENVS:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value) != 0
    return False


def inherited_run_dir() -> Path | None:
    """The run folder the launching process handed to this rank (:data:`RUN_DIR_ENV`), if any."""
    value = os.environ.get(RUN_DIR_ENV)
    return Path(value) if value else None


def is_run_of(folder: str, experiment: str) -> bool:
    """Whether a run folder's name says it is a run of exactly ``experiment`` (not of one ending with its name)."""
    name = re.escape(experiment)
    return re.fullmatch(rf"\d{{8}}-\d{{6}}(\.\d+)?-{name}|{name}-job[^/]+", folder) is not None


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from: ``last.ckpt`` when it is complete, else the newest complete checkpoint of
    any name, a cadence ``step*.ckpt`` or a ``best-step*.ckpt`` (all a run killed before its first cadence save has).

    ``last.ckpt`` comes first even when a ``best-step*.ckpt`` is a few milliseconds newer: litune writes it at every
    cadence, preemption and final save, at the end of an optimizer step, while a best checkpoint is written when a
    validation ends; resuming from that one re-runs Lightning's loop from another point (a preempted run then lost its
    last logged step). Saves in progress have hidden names (:mod:`litune.strategies.atomic`) and are never chosen."""
    from litune.strategies.atomic import recover  # start-up time only: strategies imports Lightning

    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return None
    for hidden in folder.glob(".*.ckpt.old"):  # a folder save killed between its two renames: finish it
        recover(folder / hidden.name[1 : -len(".old")])
    recover(folder / LAST_CHECKPOINT)
    if _complete(folder / LAST_CHECKPOINT):
        return folder / LAST_CHECKPOINT
    candidates = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".") and _complete(p)]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _complete(checkpoint: Path) -> bool:
    from litune.strategies.atomic import COMMIT_MARKER  # start-up time only, as above

    if checkpoint.is_dir():  # DeepSpeed (latest) or FSDP2 (meta.pt) folders; atomic saves also leave COMMITTED
        return any((checkpoint / name).exists() for name in (COMMIT_MARKER, "latest", "meta.pt"))
    return checkpoint.is_file() and checkpoint.stat().st_size > 0


def latest_checkpoint(runs_dir: str, experiment: str) -> Path:
    """The newest complete checkpoint of any run of exactly ``experiment`` under ``runs_dir``.

    Raises:
        ConfigError: when no run of ``experiment`` has one.
    """
    runs = [c for c in Path(runs_dir).glob("*") if is_run_of(c.name, experiment)]
    found = [newest for c in runs if (newest := newest_checkpoint(c)) is not None]
    if not found:
        raise ConfigError(
            "ckpt_path",
            f"no run of experiment '{experiment}' under {runs_dir}/ has a checkpoint ({CHECKPOINTS_DIR}/*.ckpt)",
            "give the checkpoint's path instead of 'last', or check --experiment and --runs_dir",
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _took(checkpoint: Path) -> str:
    """Say which checkpoint ``--ckpt_path last`` resumes from (it may be a best-step one after an early kill)."""
    if not is_launched_rank():
        print(f"litune: --ckpt_path last: resuming from {checkpoint} (the run's newest checkpoint)", file=sys.stderr)
    return str(checkpoint)


def new_run_dir(runs_dir: str, experiment: str) -> Path:
    """A new run's folder: ``<experiment>-job<id>`` in a job with an id, else ``<YYYYmmdd-HHMMSS>-<experiment>``."""
    run_id = job_id()
    if run_id is not None:
        return Path(runs_dir) / f"{experiment}-job{run_id}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(runs_dir) / f"{stamp}-{experiment}"
    suffix = 1
    while run_dir.exists():  # two runs started within the same second (a sweep, a script)
        suffix += 1
        run_dir = Path(runs_dir) / f"{stamp}.{suffix}-{experiment}"  # sorts after the first
    return run_dir


def resolve_run_dir(runs_dir: str, experiment: str, ckpt_path: str | None) -> tuple[Path, str | None]:
    """Pick the run folder and resolve ``ckpt_path="last"``.

    A new run gets :func:`new_run_dir`. A resumed run (``ckpt_path`` given) continues in the folder its checkpoint
    lives in. A rank started by the launching process gets that process's folder (:data:`RUN_DIR_ENV`).

    ``ckpt_path="last"``: in a job with an id, that job's own folder's newest checkpoint (:func:`newest_checkpoint`),
    and a fresh start when it has none yet, so one batch script serves the first start and every requeue; otherwise
    the newest checkpoint of any run of exactly this experiment.

    Returns:
        The run folder and the checkpoint path to resume from (``None`` for a new run).
    """
    inherited = inherited_run_dir()
    if inherited is not None:
        if ckpt_path == "last":
            newest = newest_checkpoint(inherited)
            if newest is not None:
                ckpt_path = str(newest)
            else:  # a job with an id starts fresh; otherwise Lightning reports the missing last.ckpt
                ckpt_path = str(last_checkpoint(inherited)) if job_id() is None else None
        return inherited, ckpt_path
    if ckpt_path == "last" and job_id() is not None:
        run_dir = new_run_dir(runs_dir, experiment)
        newest = newest_checkpoint(run_dir)
        return run_dir, _took(newest) if newest else None
    if ckpt_path == "last":
        newest = latest_checkpoint(runs_dir, experiment)
        return newest.parent.parent, _took(newest)
    if ckpt_path:
        from litune.strategies.atomic import recover  # start-up time only, as above

        recover(ckpt_path)
        if not Path(ckpt_path).exists():
            raise ConfigError("ckpt_path", f"{ckpt_path} does not exist", "give an existing checkpoint, or 'last'")
        run_dir = run_dir_of(ckpt_path)
        if run_dir is not None:
            return run_dir, ckpt_path
    return new_run_dir(runs_dir, experiment), ckpt_path


def resolve_checkpoint(path: str | Path, field: str = "--checkpoint") -> Path:
    """Accept a checkpoint file, a sharded checkpoint directory or a run folder (its ``checkpoints/last.ckpt``)."""
    from litune.strategies.checkpoint import checkpoint_kind  # start-up time only, as above

    path = Path(path)
    if path.is_dir() and last_checkpoint(path).exists():
        path = last_checkpoint(path)
    if not path.exists():
        raise ConfigError(field, f"{path} does not exist", "give a .ckpt file or directory, or a run folder")
    if path.is_dir() and checkpoint_kind(path) == "file":
        raise ConfigError(
            field,
            f"{path} is a directory but neither a run folder nor a DeepSpeed checkpoint (no 'latest' file) nor a "
            "complete FSDP2 checkpoint (no '.metadata' and 'meta.pt')",
            f"give runs/<run>, runs/<run>/{CHECKPOINTS_DIR}/{LAST_CHECKPOINT} or a step*.ckpt inside it",
        )
    return path


def runs_root(runs_dir: str, default_root_dir: str | None) -> str:
    """Where run folders are created: ``--runs_dir``, or ``--trainer.default_root_dir`` (Lightning's name for where
    outputs go), which litune honours as the same thing: the run folder ``<time>-<experiment>/`` is made inside it.

    Raises:
        ConfigError: when both are given and differ (which one would hold the run was a guess).
    """
    if default_root_dir is None:
        return runs_dir
    if runs_dir != DEFAULT_RUNS_DIR and Path(runs_dir).resolve() != Path(default_root_dir).resolve():
        raise ConfigError(
            "trainer.default_root_dir",
            f"{default_root_dir} and --runs_dir={runs_dir} name two places for the run folders",
            "give only --runs_dir (each run's folder is created inside it; trainer.default_root_dir means the same)",
        )
    return default_root_dir
