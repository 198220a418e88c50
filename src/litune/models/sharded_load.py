"""Load pretrained weights into an already sharded (FSDP2) network, one tensor at a time: never the whole model.

``from_pretrained`` materializes the whole model on every rank before any strategy can shard it, which is what limits
the model size under plain data parallelism. For FSDP2 the network is instead created with its parameters on the
``meta`` device (no storage), sharded, given storage for its own shards only, and filled from the checkpoint's
safetensors files here: each rank reads one tensor at a time (safetensors maps the file, so only that tensor is read)
and keeps its own rows. The largest single tensor is the most any rank ever holds beyond its shards.

torch and transformers have no public helper for this: ``torch.distributed.checkpoint`` reads DCP folders, not
safetensors, and transformers' own low-memory FSDP loading goes through ``accelerate`` (rank 0 loads everything).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from litune.errors import NETWORK_ARGS, ConfigError


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` registered inside the block on the ``meta`` device; buffers stay where they are.

    Buffers (position ids, rotary frequencies) are computed at construction and not always in checkpoints, so they
    are kept real; parameters take no memory until the strategy materializes its shards.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def safetensors_files(pretrained: str, revision: str | None = None) -> list[Path]:
    """The safetensors files of a local model folder or hub id (a sharded checkpoint's index names them)."""
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(pretrained, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ConfigError(
        f"{NETWORK_ARGS}.pretrained",
        f"{pretrained} has no safetensors weights (model.safetensors or an index), which FSDP2 loads shard by shard",
        "convert it once: AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst), and point pretrained at dst",
    )


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into a parameter or buffer, keeping only this rank's shard of a DTensor."""
    full = full.to(dtype=target.dtype)
    if hasattr(target, "device_mesh"):  # a DTensor: distribute locally (every rank has `full`: no communication)
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(full.to(target.device) if not hasattr(full, "device_mesh") else full)


@torch.no_grad()
def load_safetensors_into(model: nn.Module, files: list[Path], prefix: str = "") -> None:
    """Fill ``model``'s (sharded) parameters and persistent buffers from safetensors files, one tensor at a time.

    Args:
        model: the Hugging Face model, parameters materialized (possibly as FSDP2 DTensor shards).
        files: its checkpoint's safetensors files.
        prefix: the model's ``base_model_prefix`` (``"transformer"`` for GPT-2); checkpoints saved from the base model
            (e.g. the original ``gpt2`` on the hub) name their keys without it.

    Raises:
        ConfigError: when a parameter is missing from the checkpoint or a shape differs.
    """
    from safetensors import safe_open

    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                targets[f"{module_name}.{name}" if module_name else name] = buffer
    loaded: set[int] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = key if key in targets else f"{prefix}.{key}" if f"{prefix}.{key}" in targets else None
                if name is None:
                    continue  # e.g. GPT-2's old attention-mask buffers, which transformers no longer keeps
                target = targets[name]
                shape = weights.get_slice(key).get_shape()
                if list(shape) != list(target.shape):
                    raise ConfigError(
                        f"{NETWORK_ARGS}.pretrained",
                        f"checkpoint tensor {key} has shape {list(shape)}, the model's {name} {list(target.shape)}",
                        "check that config.json belongs to these weights",
                    )
                _copy_into(target, weights.get_tensor(key))
                loaded.add(id(target))
    missing = sorted(name for name, p in model.named_parameters() if id(p) not in loaded)
    if missing:
        raise ConfigError(
            f"{NETWORK_ARGS}.pretrained",
            f"the checkpoint has no weights for {len(missing)} parameters, e.g. {missing[:3]}",
            "use a checkpoint of this architecture, or HFCausalLM (which lets transformers initialize missing weights)",
        )
