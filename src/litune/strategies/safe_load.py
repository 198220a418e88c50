"""Load checkpoint files without running code from them, and say clearly when a file is not a usable checkpoint.

Every ``.ckpt`` litune reads goes through ``torch.load(weights_only=True)``: the unpickler only rebuilds tensors,
containers and primitive types, plus the few litune classes a checkpoint made in Python may hold in its
hyperparameters (allow-listed below). A downloaded checkpoint therefore cannot execute code when it is loaded.
"""

from __future__ import annotations

import pathlib
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from litune.errors import ConfigError

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def litune_safe_globals() -> list[Any]:
    """The classes besides torch's defaults that a litune checkpoint may hold (hyperparameters of a Python-built LitLM).

    Returns:
        Globals for ``torch.serialization.add_safe_globals``: the weights-only unpickler rebuilds these classes by
        setting their pickled attributes (their ``__init__`` is not run) and refuses every other global.
    """
    from litune.data.tokenizer import TrainedBPE
    from litune.optim import LRSchedule, default_optimizer

    # default_optimizer is a function: unpickling yields a reference to it and never calls it.
    return [LRSchedule, TrainedBPE, default_optimizer, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


def allow_litune_classes() -> None:
    """Add :func:`litune_safe_globals` to torch's weights-only allow-list (idempotent), also for Lightning's own
    ``torch.load`` when ``trainer.fit(ckpt_path=...)`` resumes."""
    torch.serialization.add_safe_globals(litune_safe_globals())


def not_a_checkpoint(path: str | Path, field: str, err: BaseException) -> ConfigError:
    """The :class:`ConfigError` for a file ``torch.load`` cannot read (or refuses to), by the family of ``err``."""
    if isinstance(err, pickle.UnpicklingError) and (match := _UNSAFE_GLOBAL.search(str(err))):
        return ConfigError(
            field,
            f"{path} holds a pickled object of type {match.group(1)}, which is not a tensor or a litune class; "
            "loading it could run arbitrary code, so litune loads checkpoints with torch.load(weights_only=True)",
            "use a checkpoint written by litune; if you trust this file's source, load it in Python with "
            "torch.load(..., weights_only=False) and save only its state_dict",
        )
    return ConfigError(
        field,
        f"{path} is not a readable checkpoint: it is truncated, corrupt or another kind of file "
        f"({type(err).__name__}: {_first_sentence(err)})",
        "give a complete .ckpt written by litune fit (runs/<run>/checkpoints/last.ckpt), or the run folder; "
        "a checkpoint cut off by a crash cannot be repaired, use the previous step*.ckpt",
    )


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(". ", 1)[0] if text else "no details"


CORRUPT = (
    pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError,
    IndexError, KeyError, TypeError, struct.error,
)  # fmt: skip
"""What ``torch.load`` raises for a file that is not a complete torch checkpoint (RuntimeError: a zip archive without
its central directory; UnpicklingError: not a pickle, or a forbidden global; EOFError: cut-off legacy pickle;
IndexError/KeyError/struct.error: bytes that the weights-only unpickler reads as nonsense opcodes)."""


def load_checkpoint_file(path: str | Path, field: str = "--checkpoint", mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` a single-file checkpoint on CPU, weights only, with errors as :class:`ConfigError`.

    Args:
        path: a ``.ckpt`` (or ``.pt``) file.
        field: the option the path came from, for the message.
        mmap: memory-map the tensors instead of reading them (to look at the hyperparameters of a large file).
    """
    allow_litune_classes()
    mmap = mmap and zipfile.is_zipfile(path)  # torch can only memory-map its zip format
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CORRUPT as err:
        raise not_a_checkpoint(path, field, err) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint and "module" not in checkpoint:
        raise ConfigError(
            field,
            f"{path} is a torch file but not a Lightning checkpoint (no state_dict)",
            "give a .ckpt written by litune fit, or export a Hugging Face folder and use it as `pretrained:`",
        )
    return checkpoint


def checkpoint_hparams(path: str | Path, field: str = "ckpt_path") -> dict[str, Any]:
    """The hyperparameters a checkpoint (file or DeepSpeed directory) was saved with; ``{}`` when it has none.

    Reading them loads (memory-maps) the whole pickle, so a truncated or foreign file is reported here, before
    anything is built or written.
    """
    return dict(checkpoint_meta(path, field).get("hyper_parameters") or {})


def checkpoint_meta(path: str | Path, field: str = "ckpt_path") -> dict[str, Any]:
    """The top-level entries Lightning saved in a checkpoint (``global_step``, ``hyper_parameters``, loop and callback
    states), of a ``.ckpt`` file, a DeepSpeed directory or an FSDP2 (DCP) directory; weights memory-mapped, not read.

    Raises:
        ConfigError: the path is a truncated or foreign file, or a folder that is no checkpoint.
    """
    path = Path(path)
    if path.is_dir() and (path / "meta.pt").is_file():  # FSDP2 (DCP): Lightning's loop state and hparams
        allow_litune_classes()
        try:
            return dict(torch.load(path / "meta.pt", map_location="cpu", weights_only=True))
        except CORRUPT as err:
            raise not_a_checkpoint(path / "meta.pt", field, err) from None
    if path.is_dir():  # DeepSpeed: Lightning's client state (hparams included) is in rank 0's model-states file
        verify_deepspeed_checkpoint(path, field)
        tag = (path / "latest").read_text().strip()
        files = sorted((path / tag).glob("*mp_rank_00_model_states.pt"))
        if not files:
            raise ConfigError(field, f"{path} is a folder but not a DeepSpeed checkpoint", "give a .ckpt path")
        try:
            allow_litune_classes()
            return dict(torch.load(files[0], map_location="cpu", weights_only=True, mmap=True))
        except CORRUPT as err:
            raise not_a_checkpoint(files[0], field, err) from None
    return dict(load_checkpoint_file(path, field, mmap=True))


DEEPSPEED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    }
)
"""The non-tensor types DeepSpeed itself pickles into its shards (an enum, a named tuple, the loss scaler's state)."""


def verify_deepspeed_checkpoint(path: str | Path, field: str = "--checkpoint") -> None:
    """Refuse a DeepSpeed checkpoint directory whose shard files reference anything beyond tensors and DeepSpeed's
    own few state types.

    DeepSpeed's loader (and Lightning's ZeRO consolidation) call ``torch.load(weights_only=False)`` on every shard;
    litune cannot change that, so it reads each shard's pickle opcodes first (no object is built, no tensor read) and
    stops if one names a global that could run code.
    """
    path = Path(path)
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else ""
    shards = sorted((path / tag).glob("*.pt")) if tag else []
    if not shards:
        raise ConfigError(field, f"{path} has no DeepSpeed shard files", "give a complete DeepSpeed checkpoint")
    allowed = DEEPSPEED_GLOBALS | {f"{g.__module__}.{g.__qualname__}" for g in litune_safe_globals()}
    for shard in shards:
        if not zipfile.is_zipfile(shard):
            raise not_a_checkpoint(shard, field, ValueError("not a torch zip archive"))
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(shard)) - allowed
        except CORRUPT as err:
            raise not_a_checkpoint(shard, field, err) from None
        if unsafe:
            name = sorted(unsafe)[0]
            raise not_a_checkpoint(shard, field, pickle.UnpicklingError(f"Unsupported global: GLOBAL {name}"))
