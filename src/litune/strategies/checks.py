"""Checks that a run can start on this machine, made before any process is spawned.

Lightning quietly falls back in a few cases a user should hear about (``16-mixed`` on CPU becomes ``bf16-mixed``) and
happily spawns more CPU processes than there are cores (each then crawls). These checks turn such set-ups into a
:class:`~litune.errors.ConfigError` that says what to change. They take the trainer's raw settings (as written in the
config) so they work both from the CLI, before the Trainer exists, and from the strategies, inside the Trainer.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import torch

from litune.errors import ConfigError
from litune.launcher_env import LAUNCHED_ENVS
from litune.strategies.descriptor import StrategySpec, describe

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
"""The precision flags litune configs may use (``configs/precision/*.yaml``)."""

FP16_PRECISIONS = ("16-mixed", "16-true")


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's total, so containers count right)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def resolve_accelerator(accelerator: object) -> str:
    """Name the accelerator a run will use: ``"cpu"``, ``"cuda"`` or another Lightning accelerator name.

    Args:
        accelerator: the ``trainer.accelerator`` setting (``"auto"``, ``"gpu"``, a name, or an Accelerator object).
    """
    if accelerator is None or accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(accelerator, str):
        return "cuda" if accelerator == "gpu" else accelerator
    name = type(accelerator).__name__.lower()
    return "cuda" if "cuda" in name else "cpu" if "cpu" in name else name


def processes_per_node(devices: object, accelerator: str) -> int | None:
    """How many processes a node runs for a ``trainer.devices`` setting, or None when it cannot be told here."""
    if isinstance(devices, int):
        if devices == -1:
            return cpu_cores() if accelerator == "cpu" else torch.cuda.device_count()
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return None if devices.strip() == "auto" else processes_per_node(-1, accelerator)
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        if devices.strip().isdigit():
            return int(devices)
    return None


def check_deepspeed_installed(field: str = "trainer.strategy") -> None:
    """Fail early, naming the fix, when a DeepSpeed strategy is configured but the package is missing."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            field,
            "a DeepSpeed strategy is configured but the `deepspeed` package is not installed",
            "`pip install deepspeed` (litune's default dependencies include it), or use "
            "`--config configs/strategy/ddp.yaml`",
        )


def check_run(
    accelerator: str,
    processes: int | None,
    precision: str | None,
    deepspeed: bool = False,
) -> None:
    """Check that this machine can run the requested set-up; raise :class:`ConfigError` with the fix otherwise.

    Args:
        accelerator: the resolved accelerator name (see :func:`resolve_accelerator`).
        processes: processes per node (``trainer.devices``), or None when unknown.
        precision: the ``trainer.precision`` flag as configured (before Lightning's CPU fallback).
        deepspeed: whether the strategy is DeepSpeed.
    """
    precision = None if precision is None else str(precision)
    if precision is not None and precision in ("16", "32", "bf16", "64"):
        precision = {"16": "16-mixed", "32": "32-true", "bf16": "bf16-mixed", "64": "64-true"}[precision]
    if accelerator == "cpu":
        if precision in FP16_PRECISIONS:
            raise ConfigError(
                "trainer.precision",
                f"precision={precision!r} needs a CUDA GPU (CPUs have no fast fp16 kernels and no loss-scaling AMP)",
                "use `--config configs/precision/bf16-mixed.yaml` (or 32-true) on CPU",
            )
        cores = cpu_cores()
        if processes is not None and processes > cores:
            raise ConfigError(
                "trainer.devices",
                f"devices={processes} CPU processes requested but this machine gives the run only {cores} cores",
                f"set `--trainer.devices` to at most {cores}, or run on GPUs with `--trainer.accelerator gpu`",
            )
    elif accelerator == "cuda":
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError(
                "trainer.accelerator",
                "accelerator='gpu' requested but CUDA sees no GPU on this machine",
                "use `--trainer.accelerator cpu` (with bf16-mixed or 32-true precision) or run on a GPU node",
            )
        if processes is not None and processes > available:
            raise ConfigError(
                "trainer.devices",
                f"devices={processes} GPUs requested but this node has {available}",
                f"set `--trainer.devices` to at most {available} (or -1 for all)",
            )
        if precision is not None and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "trainer.precision",
                f"precision={precision!r} but this GPU has no bfloat16 support (pre-Ampere)",
                "use `--config configs/precision/16-mixed.yaml`",
            )
    if deepspeed:
        check_deepspeed_installed()


MULTI_NODE_ENVS = (
    "NODE_RANK", "MASTER_ADDR", "WORLD_SIZE", "GROUP_RANK",  # set by hand (Lightning's general cluster) or by torchrun
    *LAUNCHED_ENVS,  # a launched process (litune.runs.is_launched reads the same list)
    "SLURM_NNODES", "SLURM_JOB_NUM_NODES",  # a SLURM allocation
    "LSB_JOBID", "OMPI_COMM_WORLD_SIZE",  # LSF, MPI
)  # fmt: skip
"""Environment variables that show a launcher (or a user) has told the nodes of a multi-node run how to meet."""


def check_nodes(num_nodes: object) -> None:
    """Refuse ``num_nodes > 1`` where nothing tells the nodes how to meet.

    Without a launcher (srun, torchrun, the DeepSpeed launcher) or ``MASTER_ADDR``/``NODE_RANK`` set by hand, Lightning
    starts node 0 and waits for the other nodes at the rendezvous for as long as the collective timeout (30 min by
    default), printing nothing: a silent hang, not an error.
    """
    if not isinstance(num_nodes, int) or num_nodes <= 1:
        return
    if not any(var in os.environ for var in MULTI_NODE_ENVS):
        raise ConfigError(
            "trainer.num_nodes",
            f"num_nodes={num_nodes} but this process was not started by a multi-node launcher and no MASTER_ADDR / "
            "NODE_RANK is set, so it would wait forever for the other nodes",
            "use 1 on one machine; across machines start the run with launch/slurm.sbatch, "
            "launch/torchrun_multinode.sh or launch/deepspeed.sh (they set num_nodes)",
        )


def _getter(trainer: Mapping[str, Any]) -> Any:
    return trainer.get if hasattr(trainer, "get") else lambda key, default=None: getattr(trainer, key, default)


def describe_trainer(trainer: Mapping[str, Any]) -> StrategySpec:
    """The :class:`~litune.strategies.descriptor.StrategySpec` of a config's ``trainer`` section, with its world size
    (``devices`` x ``num_nodes``) when it can be told before launch."""
    get = _getter(trainer)
    processes = processes_per_node(get("devices", "auto"), resolve_accelerator(get("accelerator", "auto")))
    world_size = processes * (get("num_nodes", None) or 1) if processes is not None else None
    return describe(get("strategy", "auto"), world_size)


def check_trainer_config(trainer: Mapping[str, Any]) -> None:
    """Run :func:`check_run` on the ``trainer`` section of a parsed config (a dict or jsonargparse Namespace).

    Args:
        trainer: mapping with ``accelerator``, ``devices``, ``precision``, ``strategy`` entries (missing ones are
            treated as Lightning's defaults).
    """
    get = _getter(trainer)
    accelerator = resolve_accelerator(get("accelerator", "auto"))
    processes = processes_per_node(get("devices", "auto"), accelerator)
    spec = describe_trainer(trainer)
    if spec.fsdp2 and str(get("precision", None)) in ("16-mixed", "16"):
        # Lightning's ModelParallelStrategy refuses it too, but only once the Trainer is built, with a ValueError.
        raise ConfigError(
            "trainer.precision",
            "precision='16-mixed' is not supported with FSDP2 (no gradient scaler for sharded gradients in Lightning's "
            "ModelParallelStrategy)",
            "use `--config configs/precision/bf16-mixed.yaml` (bf16 compute, fp32 gradient reduction), or 32-true",
        )
    check_nodes(get("num_nodes", 1))
    check_run(accelerator, processes, get("precision", None), deepspeed=spec.deepspeed)


DS_ACCELERATOR_ENV = "DS_ACCELERATOR"


def select_deepspeed_accelerator(accelerator: str | None = None) -> str:
    """Choose DeepSpeed's accelerator before ``deepspeed`` is imported, and export it for the ranks to inherit.

    A value already in ``DS_ACCELERATOR`` (e.g. set by a launch script) wins. Otherwise ``cpu`` is chosen when the run
    is on CPU or CUDA is not available; on GPUs the variable stays unset so DeepSpeed's own detection runs (stock).

    Args:
        accelerator: the Lightning accelerator name if known (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"auto"``).

    Returns:
        The accelerator DeepSpeed will use (``"cpu"`` or ``"auto"`` for DeepSpeed's own detection).
    """
    if DS_ACCELERATOR_ENV in os.environ:
        return os.environ[DS_ACCELERATOR_ENV]
    if accelerator == "cpu" or not torch.cuda.is_available():
        os.environ[DS_ACCELERATOR_ENV] = "cpu"
        return "cpu"
    return "auto"
