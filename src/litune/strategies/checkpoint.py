"""Checkpoints of every strategy: tell them apart, check a resume's world size, consolidate ZeRO shards.

A DDP (or single-device) checkpoint is one ``.ckpt`` file with the full ``state_dict``. A DeepSpeed checkpoint is a
*directory* named ``*.ckpt`` holding, under its tag folder, one model-state file and one optimizer-state file per rank
(the fp32 master weights are only in the optimizer shards). An FSDP2 checkpoint is a DCP (torch.distributed.checkpoint)
directory named ``*.ckpt`` with one shard file per rank, DCP's ``.metadata`` and Lightning's ``meta.pt`` (loop state,
hyperparameters); DCP reshards it onto any world size. Consolidation uses DeepSpeed's ``zero_to_fp32`` through
Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``, which keeps Lightning's own entries (hyperparameters, loop
state), so the result loads with ``LitLM.load_from_checkpoint`` like any DDP checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from litune.errors import ConfigError
from litune.strategies.fsdp2 import is_fsdp2_checkpoint

_OPTIM_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


KIND_LABELS = {"deepspeed": "DeepSpeed", "fsdp2": "FSDP2 (DCP)", "file": "single-file (DDP / one device)"}
"""Each :func:`checkpoint_kind`, named for messages."""


def checkpoint_kind(path: str | Path) -> str:
    """``"deepspeed"`` (a folder of ZeRO shards), ``"fsdp2"`` (a DCP folder) or ``"file"`` (one ``.ckpt`` file, or
    a folder that is neither: :func:`litune.runs.resolve_checkpoint` refuses it)."""
    if is_deepspeed_checkpoint(path):
        return "deepspeed"
    return "fsdp2" if is_fsdp2_checkpoint(path) else "file"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint directory (DeepSpeed writes a ``latest`` file naming the tag)."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def saved_world_size(path: str | Path) -> int | None:
    """The data-parallel world size a DeepSpeed checkpoint was written with (one optimizer shard per rank).

    Returns:
        The number of ranks, or None for a non-DeepSpeed checkpoint.
    """
    path = Path(path)
    if not is_deepspeed_checkpoint(path):
        return None
    tag = (path / "latest").read_text().strip()
    ranks = {int(m.group(1)) for f in (path / tag).iterdir() if (m := _OPTIM_SHARD.search(f.name))}
    return len(ranks) or None


def check_resume_world_size(path: str | Path, world_size: int) -> None:
    """Refuse to resume a ZeRO checkpoint on a different number of ranks, with the two ways out.

    DeepSpeed can only restore partitioned optimizer state onto the partitioning it was saved with (its "universal
    checkpoint" conversion is the reshard path and is not wired into litune). Failing here beats DeepSpeed's own
    error, which comes from deep inside ``load_checkpoint`` after every rank has started.
    """
    saved = saved_world_size(path)
    if saved is not None and saved != world_size:
        raise world_size_changed(path, saved, world_size)


def world_size_changed(checkpoint: str | Path, saved: int, now: int) -> ConfigError:
    """The one refusal of a resume on another number of processes than the checkpoint's (only FSDP2 reshards).

    ZeRO optimizer shards load only onto the partitioning they were saved with; under the other strategies Lightning's
    loop counts micro-batches per process, so the first resumed step would end its accumulation window early.
    """
    return ConfigError(
        "ckpt_path",
        f"the checkpoint {checkpoint} was saved by {saved} processes but this run has {now}; only FSDP2 checkpoints "
        "resume on another number of processes (ZeRO's optimizer shards and the training loop's per-process "
        "counters are laid out for the saved number)",
        f"resume with devices x num_nodes = {saved}, or start a new run from its weights: `litune export "
        f"--checkpoint {checkpoint} --output DIR`, then `--model.network.init_args.pretrained DIR`; train with "
        "configs/strategy/fsdp2.yaml to change the world size between resumes",
    )


def consolidate(path: str | Path, output_file: str | Path) -> Path:
    """Write a single-file Lightning checkpoint with the full fp32 ``state_dict`` of a DeepSpeed checkpoint.

    Args:
        path: a DeepSpeed checkpoint directory (ZeRO-1, -2 or -3, any world size).
        output_file: the ``.ckpt`` file to write.

    Returns:
        ``output_file``.
    """
    # Imported here, not at the top, only to keep this module free of torch for commands that never consolidate.
    from litune.strategies.checks import select_deepspeed_accelerator

    select_deepspeed_accelerator("cpu")  # consolidation is plain tensor work on the host
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(path), str(output_file))
    return Path(output_file)


def consolidate_fsdp2(path: str | Path, output_file: str | Path) -> Path:
    """Write a single-file Lightning checkpoint with the full ``state_dict`` of an FSDP2 (DCP) checkpoint.

    Runs in one process without a process group: DCP reads every rank's shards of the model's tensors (and only
    those: the optimizer state, twice the model's size under Adam, is skipped) and joins them into whole tensors.
    ``_EmptyStateDictLoadPlanner`` is the planner DCP's own ``dcp_to_torch_save`` uses; its ``keys`` argument is
    what lets it skip the optimizer.
    """
    from torch.distributed.checkpoint import FileSystemReader

    from litune.lightning_private import LIGHTNING_META_FILE, dcp_load_no_dist

    path = Path(path)
    state: dict = {}
    dcp_load_no_dist(state, FileSystemReader(path), keys={"state_dict"})
    from litune.strategies.safe_load import CORRUPT, allow_litune_classes, not_a_checkpoint

    allow_litune_classes()
    try:  # Lightning's loop state and hyperparameters: tensors, containers and litune's allow-listed classes only
        checkpoint = torch.load(path / LIGHTNING_META_FILE, map_location="cpu", weights_only=True)
    except CORRUPT as err:
        raise not_a_checkpoint(path / LIGHTNING_META_FILE, "--checkpoint", err) from None
    checkpoint["state_dict"] = state["state_dict"]
    torch.save(checkpoint, output_file)
    return Path(output_file)


def as_single_file(path: Path, directory: Path) -> Path:
    """``path`` if it is one ``.ckpt`` file, else its shards joined into ``directory/consolidated.ckpt``.

    The one place a checkpoint's kind decides how it is read (:func:`checkpoint_kind`).
    """
    kind = checkpoint_kind(path)
    if kind == "file":
        return path
    if kind == "deepspeed":
        from litune.strategies.safe_load import verify_deepspeed_checkpoint

        verify_deepspeed_checkpoint(path)  # DeepSpeed's consolidation unpickles its shards with weights_only=False
        return consolidate(path, directory / "consolidated.ckpt")
    return consolidate_fsdp2(path, directory / "consolidated.ckpt")
