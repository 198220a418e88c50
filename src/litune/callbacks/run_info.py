"""Record what a run was: the resolved config (secrets removed) and the environment it ran in.

Both are written into the run folder (``config.yaml`` by the CLI's config saver through :func:`log_once`, ``env.json``
by :class:`EnvironmentLogger`) and logged once to every logger, so a dashboard
or ``litune report`` weeks later can tell which versions, devices and settings produced a curve.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from litune import host_memory
from litune.tracking.secrets import scrub

_PACKAGES = ("litune", "torch", "lightning", "deepspeed", "transformers", "datasets", "tokenizers", "wandb")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change numbers, read from metadata (importing DeepSpeed is slow)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(directory: str | Path = ".") -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout containing ``directory``, or ``None`` outside one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def device_names(device: torch.device) -> list[str]:
    """Names of this node's devices of ``device``'s type (other nodes are assumed to match)."""
    if device.type == "cuda":
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"]


def environment(trainer: pl.Trainer) -> dict[str, Any]:
    """The environment of a run: versions, devices, world size, strategy, precision, git commit, command line."""
    device = trainer.strategy.root_device
    return {
        "versions": package_versions(),
        "accelerator": device.type,
        "devices": device_names(device),
        "cuda": torch.version.cuda,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "devices_per_node": trainer.num_devices,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
        # glibc malloc keeping freed buffers (litune.host_memory): only litune's own command, on CPU.
        "host_allocator": "keep_freed" if host_memory.applied else "default",
        "git": git_commit(),
        "host": platform.node(),
        "command": sys.argv,
    }


def log_once(trainer: pl.Trainer, name: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (scrubbed) into the run folder as ``name`` and log it to every logger under ``name``'s stem.

    The run folder is ``trainer.default_root_dir`` (the CLI points it at ``runs/<time>-<experiment>/``). Must be called
    on rank 0 only.
    """
    payload = scrub(payload)
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    if name.endswith(".json"):
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        path.write_text(yaml.safe_dump(payload, sort_keys=False))
    for logger in trainer.loggers:
        logger.log_hyperparams({Path(name).stem: payload})


class EnvironmentLogger(Callback):
    """Writes ``env.json`` into the run folder and logs it to every logger once, at the start of fitting."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            log_once(trainer, "env.json", environment(trainer))
