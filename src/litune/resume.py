"""A run folder is self-contained, and resuming never silently changes the model.

``litune fit`` saves the tokenizer's files (not the recipe that made them) in ``<run>/tokenizer/``. Every later command
on that run (resume, ``validate``, ``test``, ``generate``, ``export``) loads those files, so a machine with an empty
cache never retrains a BPE that could differ from the one the model learned.

Resuming (or evaluating) a checkpoint with a config whose network or tokenizer differs from the checkpoint's is an
error raised before anything is built or written: Lightning would otherwise either replace the override by the
checkpoint's hyperparameters (``LightningCLI._parse_ckpt_path``) or fail deep inside ``load_state_dict``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from litune.errors import NETWORK_FIELD, ConfigError
from litune.module import LitLM
from litune.runs import TOKENIZER_DIR, resolve_checkpoint, run_dir_of, run_tokenizer
from litune.strategies.checkpoint import KIND_LABELS, as_single_file, check_resume_world_size, checkpoint_kind
from litune.strategies.descriptor import StrategySpec
from litune.strategies.safe_load import allow_litune_classes, load_checkpoint_file

SOURCE_FILE = "litune_source.json"
"""In the tokenizer folder: the source (hub id, folder or recipe) the run was configured with, to recognise it."""

NOT_ARCHITECTURE = ("gradient_checkpointing", "attn_implementation", "trust_remote_code", "revision")
"""Network arguments a resumed run may change: they change how the same weights are computed, not which exist."""


def save_run_tokenizer(tokenizer: Any, run_dir: str | Path, source: Any = None) -> Path:
    """Save ``tokenizer``'s files into ``run_dir/tokenizer`` unless they are there already (a resumed run keeps them).

    Written into a temporary folder and renamed, so a crash never leaves half a tokenizer that a later command loads.

    Args:
        tokenizer: the loaded tokenizer.
        run_dir: the run folder.
        source: the configured ``model.tokenizer`` (recorded, so that resuming with the same recipe is recognised).
    """
    folder = Path(run_dir) / TOKENIZER_DIR
    if run_tokenizer(run_dir) is not None:
        return folder
    tmp = folder.with_name(f".{TOKENIZER_DIR}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(_flatten(source, "model.tokenizer"), default=str, sort_keys=True))
    try:
        tmp.rename(folder)
    except OSError:  # another process (or a crashed earlier run) put one there first: keep it
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``, so two configs can be compared key by key."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _is_architecture(key: str) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name not in NOT_ARCHITECTURE and "dropout" not in name and "pdrop" not in name


def _new_run_fix(checkpoint: str | Path) -> str:
    return (
        "resume with the checkpoint's settings (drop the override), or start a new run from its weights: "
        f"`litune export --checkpoint {checkpoint} --output DIR`, then train a litune.models.HFCausalLM with "
        "`pretrained: DIR` (--model.network.init_args.pretrained=DIR --model.network.init_args.config=null) and "
        "without --ckpt_path"
    )


def check_network_matches(saved: Any, requested: Any, checkpoint: str | Path) -> None:
    """Raise :class:`ConfigError` when the configured network differs from the checkpoint's in its architecture.

    Args:
        saved: the checkpoint's ``hyper_parameters["network"]`` (``class_path`` + ``init_args``), or None when the
            checkpoint was made outside the CLI and holds no network config (nothing to compare).
        requested: the config's ``model.network`` (a dict or jsonargparse Namespace).
        checkpoint: the checkpoint's path, for the message.
    """
    if saved is None or requested is None:
        return
    old, new = _flatten(saved, NETWORK_FIELD), _flatten(requested, NETWORK_FIELD)

    def compared(key: str) -> bool:
        # A key on one side only: in a Hugging Face `config` dict it is an override of the family's default (a real
        # change); among init_args it is an argument added to the class since the checkpoint (not a change).
        return _is_architecture(key) and (key in old and key in new or ".init_args.config." in key)

    differ = sorted(key for key in old.keys() | new.keys() if compared(key) and old.get(key) != new.get(key))
    if differ:
        changes = "; ".join(
            f"{key} is {old.get(key)!r} in the checkpoint but {new.get(key)!r} here" for key in differ[:3]
        )
        if len(differ) > 3:
            changes += f"; and {len(differ) - 3} more"
        raise ConfigError(
            differ[0],
            f"resuming {checkpoint} would change the model's architecture ({changes}); a resumed run continues the "
            "checkpoint's model and cannot take another one",
            _new_run_fix(checkpoint),
        )


def check_tokenizer_matches(saved: Any, requested: Any, run_dir: Path | None, checkpoint: str | Path) -> None:
    """Raise :class:`ConfigError` when the configured tokenizer is not the one the checkpoint was trained with.

    The same source as the checkpoint's (the recipe or folder it was configured with) always matches. Another source
    matches when it has the same vocabulary and special tokens as the files saved in the run folder (e.g. the same
    tokenizer folder at another path).
    """
    if saved is None or requested is None:
        return
    old, new = _flatten(saved, "model.tokenizer"), _flatten(requested, "model.tokenizer")
    if old == new:
        return
    saved_folder = run_tokenizer(run_dir) if run_dir is not None else None
    if saved_folder is not None:
        if str(requested) in (str(saved_folder), str(saved_folder.resolve())):
            return  # the run folder's own copy
        recorded = saved_folder / SOURCE_FILE
        if recorded.is_file() and json.loads(recorded.read_text()) == json.loads(json.dumps(new, default=str)):
            return  # the source the run was first configured with (its hparams now name the saved copy)
    if saved_folder is not None and _same_tokenizer(saved_folder, requested):
        return
    raise ConfigError(
        "model.tokenizer",
        f"the tokenizer configured here ({_describe(requested)}) is not the one {checkpoint} was trained with "
        f"({_describe(saved)}); token ids would mean other text",
        "drop the model.tokenizer override to use the run's saved tokenizer, or " + _new_run_fix(checkpoint),
    )


def _describe(source: Any) -> str:
    flat = _flatten(source, "")
    return ", ".join(f"{k.lstrip('.')}={v!r}" for k, v in flat.items()) if len(flat) > 1 else repr(source)


def _same_tokenizer(saved_folder: Path, requested: Any) -> bool:
    """Whether ``requested`` (a folder path; recipes are compared by their settings only) equals the saved files."""
    if not isinstance(requested, str) or not Path(requested).expanduser().is_dir():
        return False
    from transformers import AutoTokenizer

    try:
        a, b = AutoTokenizer.from_pretrained(saved_folder), AutoTokenizer.from_pretrained(requested)
    except (OSError, ValueError):
        return False
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def use_run_tokenizer(cfg: Any, run_dir: Path | None) -> None:
    """Point ``model.tokenizer`` (and the data's linked copy) at the run folder's saved tokenizer files, if any."""
    folder = run_tokenizer(run_dir) if run_dir is not None else None
    if folder is None:
        return
    cfg.model.tokenizer = str(folder)
    data_args = cfg.get("data") and cfg.data.get("init_args")
    if data_args is not None and "tokenizer" in data_args:
        data_args.tokenizer = str(folder)


def check_strategy_matches(checkpoint: str | Path, strategy: StrategySpec) -> None:
    """A sharded checkpoint resumes only under the strategy that wrote it (DeepSpeed: also on as many processes), and
    a single-file checkpoint not under DeepSpeed; otherwise the strategy fails deep inside its loader.

    Args:
        checkpoint: the checkpoint to resume from.
        strategy: this run's strategy, with its world size (devices x nodes) when known before launch.
    """
    kind = checkpoint_kind(checkpoint)
    if strategy.loads(kind):
        if strategy.world_size is not None:  # only ZeRO shards are bound to their number of ranks
            check_resume_world_size(checkpoint, strategy.world_size)
        return
    raise ConfigError(
        "trainer.strategy",
        f"{checkpoint} is a {KIND_LABELS[kind]} checkpoint but this run uses {strategy.label}; one strategy's "
        "checkpoint (its sharded optimizer state) cannot be loaded by another",
        "resume with the strategy the checkpoint was written with, or " + _new_run_fix(checkpoint),
    )


def load_system(path: str | Path) -> LitLM:
    """Load a :class:`~litune.module.LitLM` on CPU from any strategy's checkpoint or a run folder (shards joined),
    with the run folder's saved tokenizer files, not the recipe in the hyperparameters (no retraining elsewhere)."""
    path = resolve_checkpoint(path)
    run_dir = run_dir_of(path)
    saved_tokenizer = run_tokenizer(run_dir) if run_dir is not None else None
    overrides = {"tokenizer": str(saved_tokenizer)} if saved_tokenizer is not None else {}
    allow_litune_classes()  # weights_only=True below: litune's hparam classes, nothing else, may be unpickled
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="litune-consolidate-") as tmp:
        # An adapter checkpoint leaves out the frozen base (rebuilt from its pretrained source); LitLM checks that the
        # adapter weights are all there (on_load_checkpoint), and other checkpoints load strictly.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        single = as_single_file(path, Path(tmp))
        load_checkpoint_file(single, mmap=True)  # a truncated, foreign or code-carrying file fails here, clearly
        return LitLM.load_from_checkpoint(single, map_location="cpu", weights_only=True, **overrides)
