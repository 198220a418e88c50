"""Adapters for every litune network through ``peft``: LoRA, DoRA, and QLoRA (LoRA on a 4-bit NF4 base).

``peft`` injects its adapter layers into the network *in place* (``h.0.attn.c_attn`` becomes a ``lora.Linear`` whose
``base_layer`` is the original layer) and freezes every base weight. The network object, its ``forward``/``generate``
and its litune interface stay the same, so the LightningModule and every strategy see one ordinary ``nn.Module``;
only the trainable adapter weights reach the optimizer.

The ``PeftModel`` that ``peft`` wraps around the base is kept *beside* the network (:func:`peft_model_of`), not as a
sub-module, so the network's state-dict keys do not change with it and a strategy never wraps the network twice. It
writes the adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) and merges the adapters for export.

Where adapters attach: a Hugging Face network's adapters go on its ``PreTrainedModel`` (``HFCausalLM.model``), so the
folder loads with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``; litune's own
networks (``DecoderLM``, ``Seq2SeqLM``) get them on the network itself (``PeftModel.from_pretrained(network, folder)``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from litune.errors import NETWORK_ARGS, ConfigError

log = logging.getLogger(__name__)

FIELD = "model.adapters"
"""Where users configure adapters in YAML (an argument of :class:`litune.module.LitLM`)."""

PRESETS: dict[str, tuple[str, ...]] = {
    # A linear layer belongs to a preset when one of the module names on its path contains one of these words.
    "all-linear": (),
    "attention": ("attn", "attention"),
    "mlp": ("mlp", "ffn", "feed_forward", "feedforward"),
}
"""Named sets of target layers; ``all-linear`` is every linear layer except the output head."""


@dataclass
class Adapters:
    """Which adapters to train, and where (``model.adapters`` in a config, e.g. ``configs/peft/lora.yaml``).

    Args:
        method: ``lora`` (low-rank update ``B @ A``) or ``dora`` (LoRA plus a learned per-output magnitude).
        r: rank of the update.
        alpha: scale numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input (the base path is untouched).
        target_modules: a preset (``all-linear``, ``attention``, ``mlp``) or a list of layer names or name suffixes
            (``[c_attn, attn.c_proj]``, or ``[q_proj, v_proj]`` for Llama-style models).
        train_embeddings: also train the token embedding (a full trainable copy; saved with the adapters).
        train_head: also train the output head (a full trainable copy; saved with the adapters).
    """

    method: Literal["lora", "dora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    train_embeddings: bool = False
    train_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("lora", "dora"):
            raise ConfigError(f"{FIELD}.method", f"unknown method {self.method!r}", "use lora or dora")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{FIELD}.r", f"r={self.r!r} must be a positive integer", "use e.g. r: 8")
        if not self.alpha > 0:
            raise ConfigError(f"{FIELD}.alpha", f"alpha={self.alpha} must be positive", "use e.g. alpha: 16 (2 * r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{FIELD}.dropout", f"dropout={self.dropout} is outside [0, 1)", "use e.g. 0.05")
        if isinstance(self.target_modules, str) and self.target_modules not in PRESETS:
            raise ConfigError(
                f"{FIELD}.target_modules",
                f"unknown preset {self.target_modules!r}",
                f"use one of {sorted(PRESETS)} or a list of layer names",
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{FIELD}.target_modules", "the list is empty", "name at least one layer, or all-linear")


def adapter_base(network: nn.Module) -> nn.Module:
    """The module adapters attach to: a wrapped Hugging Face model (``HFCausalLM.model``) or the network itself."""
    inner = network._modules.get("model")  # not getattr: a DeferredHFCausalLM raises before it is built
    return inner if isinstance(inner, PreTrainedModel) else network


def _output_head(base: nn.Module) -> nn.Module | None:
    if isinstance(base, PreTrainedModel):
        return base.get_output_embeddings()
    return getattr(base, "lm_head", None)


def _input_embedding(base: nn.Module) -> nn.Module | None:
    if isinstance(base, PreTrainedModel):
        return base.get_input_embeddings()
    return getattr(base, "wte", None)


def _linear_layers(base: nn.Module) -> dict[str, nn.Module]:
    """Every layer LoRA can adapt, by full name: ``nn.Linear`` (incl. bitsandbytes' 4-bit) and GPT-2's ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    head = _output_head(base)
    return {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head and name
    }


def _matches(name: str, target: str) -> bool:
    """peft's rule for a name in ``target_modules``: the full name, or a suffix starting at a ``.``."""
    return name == target or name.endswith(f".{target}")


def _shortest_suffixes(chosen: list[str], all_names: list[str]) -> list[str]:
    """The shortest name suffixes that select exactly ``chosen`` among ``all_names`` (a short adapter_config.json).

    e.g. GPT-2's attention layers -> ``["attn.c_attn", "attn.c_proj"]`` rather than every ``transformer.h.N...``.
    """
    chosen_set, suffixes = set(chosen), set()
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in chosen_set for n in all_names if _matches(n, suffix)):
                suffixes.add(suffix)
                break
    return sorted(suffixes)


def resolve_targets(base: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The ``target_modules`` list passed to peft, from a preset or user names (checked against the network).

    Raises:
        ConfigError: a name matches no linear layer, or a preset selects none.
    """
    layers = _linear_layers(base)
    names = list(layers)
    if isinstance(target_modules, str):
        words = PRESETS[target_modules]
        chosen = [n for n in names if not words or any(w in part for part in n.split(".")[:-1] for w in words)]
    else:
        unknown = [t for t in target_modules if not any(_matches(n, t) for n in names)]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(
                f"{FIELD}.target_modules",
                f"{unknown} name no linear layer of {type(base).__name__} (the output head is never a target)",
                f"use layer names such as {leaves} (suffixes like attn.c_proj work), or a preset {sorted(PRESETS)}",
            )
        chosen = [n for n in names if any(_matches(n, t) for t in target_modules)]
    if not chosen:
        raise ConfigError(
            f"{FIELD}.target_modules",
            f"the preset {target_modules!r} selects no layer of {type(base).__name__}",
            "name the layers explicitly, or use all-linear",
        )
    return _shortest_suffixes(chosen, names)


def _modules_to_save(base: nn.Module, adapters: Adapters) -> list[str]:
    """Names of the embedding / head that are trained in full (peft keeps a trainable copy and saves it)."""
    wanted: list[nn.Module] = []
    if adapters.train_embeddings:
        wanted.append(_input_embedding(base))
    if adapters.train_head:
        wanted.append(_output_head(base))
    names = [name for name, module in base.named_modules() if any(module is w for w in wanted if w is not None)]
    tied = isinstance(base, nn.Module) and not isinstance(base, PreTrainedModel) and _is_tied(base)
    if names and tied:
        # peft re-ties copies only for Hugging Face models (their _tied_weights_keys); a litune network's tied
        # embedding and head would silently come apart.
        raise ConfigError(
            f"{FIELD}.train_embeddings",
            "the network ties its token embedding and output head; training one as a separate copy unties them",
            "set model.network.init_args.tie_embeddings: false, or leave train_embeddings/train_head off",
        )
    return names


def _is_tied(base: nn.Module) -> bool:
    head, embedding = _output_head(base), _input_embedding(base)
    return head is not None and embedding is not None and head.weight is embedding.weight


def is_quantized(network: nn.Module) -> bool:
    """Whether the network's base weights were loaded in 4-bit or 8-bit (bitsandbytes)."""
    base = adapter_base(network)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def base_is_reloadable(network: nn.Module) -> bool:
    """Whether the frozen base is rebuilt from its ``pretrained`` source, so checkpoints need not carry it.

    Networks initialised at random (a ``config`` instead of ``pretrained``, litune's own networks) keep their frozen
    base in the checkpoint too: it cannot be rebuilt bit for bit.
    """
    return getattr(network, "pretrained", None) is not None


def add_adapters(network: nn.Module, adapters: Adapters) -> None:
    """Inject ``adapters`` into ``network`` in place and freeze every other weight; log trainable vs total.

    Args:
        network: a litune network (``HFCausalLM``, ``DecoderLM``, ``Seq2SeqLM``, ...), built (not deferred).
        adapters: what to add.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if peft_model_of(network) is not None:
        raise ConfigError(FIELD, "the network already has adapters", "add adapters once")
    base = adapter_base(network)
    targets = resolve_targets(base, adapters.target_modules)
    _check_rank(base, targets, adapters.r)
    hf = isinstance(base, PreTrainedModel)
    config = LoraConfig(
        r=adapters.r,
        lora_alpha=adapters.alpha,
        lora_dropout=adapters.dropout,
        target_modules=targets,
        use_dora=adapters.method == "dora",
        modules_to_save=_modules_to_save(base, adapters) or None,
        ensure_weight_tying=hf and (adapters.train_embeddings or adapters.train_head),
        # GPT-2's Conv1D stores [in, out]: peft must transpose the update when it merges it.
        fan_in_fan_out=hf and any(type(m).__name__ == "Conv1D" for m in _linear_layers(base).values()),
        task_type="CAUSAL_LM" if hf else None,
    )
    if is_quantized(network):
        # Layer norms to fp32, frozen base; litune's own gradient_checkpointing flag stays in charge of recomputation.
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    # autocast_adapter_dtype: adapter weights in fp32 even on a bf16 base, as master weights should be.
    peft_model = get_peft_model(base, config, autocast_adapter_dtype=True)
    network.__dict__["_peft_model"] = peft_model  # beside the network, deliberately not a registered sub-module
    trainable, total = count_parameters(network)
    log.info(
        f"adapters: {adapters.method} r={adapters.r} alpha={adapters.alpha:g} on {', '.join(targets)}; "
        f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
    )


def _check_rank(base: nn.Module, targets: list[str], r: int) -> None:
    """A rank above a layer's smaller side adds weights but no capacity (the update's rank is at most that side), and a
    huge one would allocate until memory runs out: refuse it before peft builds anything."""
    sides = {
        # in/out features where the layer has them (a 4-bit layer's weight is packed); GPT-2's Conv1D: its weight
        name: min(module.in_features, module.out_features)
        if hasattr(module, "in_features")
        else min(module.weight.shape)
        for name, module in _linear_layers(base).items()
        if any(_matches(name, target) for target in targets)
    }
    if not sides:
        return
    name = min(sides, key=sides.get)
    if r > sides[name]:
        raise ConfigError(
            f"{FIELD}.r",
            f"r={r} is larger than the smaller side ({sides[name]}) of the adapted layer {name}; a rank above it adds "
            "weights but no capacity",
            f"use r <= {sides[name]}, e.g. r: 8",
        )


def peft_model_of(network: nn.Module) -> nn.Module | None:
    """The ``peft.PeftModel`` around the network's adapters, or None when it has none."""
    return network.__dict__.get("_peft_model")


def count_parameters(network: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, tied weights once and 4-bit weights at their real size."""
    peft_model = peft_model_of(network)
    if peft_model is not None:
        return peft_model.get_nb_trainable_parameters()
    params = {id(p): p for p in network.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_adapter_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of the peft model's ``state_dict`` that it trains (adapter weights, ``modules_to_save`` copies),
    under the keys ``save_pretrained(state_dict=...)`` expects; sharded (``DTensor``) where FSDP2 shards them."""
    peft_model = peft_model_of(network)
    if peft_model is None:
        return {}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    return {k: v for k, v in peft_model.state_dict().items() if k in trainable}


def save_adapters(network: nn.Module, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter folder: ``adapter_model.safetensors`` and ``adapter_config.json`` (peft's format).

    Args:
        state: the adapter weights to write (:func:`trainable_adapter_state`, gathered whole where they were sharded);
            None: peft reads them from the model.
    """
    peft_model = peft_model_of(network)
    if peft_model is None:
        raise ConfigError("--checkpoint", "this network has no adapters", "train with model.adapters set")
    directory = Path(directory)
    peft_model.save_pretrained(directory, state_dict=state)
    return directory


def merge_adapters(network: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights in place (``W + alpha/r * B @ A``) and remove them; returns network.

    Afterwards the network is a plain network again (e.g. ``save_pretrained`` writes an ordinary Hugging Face folder).
    """
    peft_model = peft_model_of(network)
    if peft_model is None:
        raise ConfigError("--merge-adapters", "this checkpoint has no adapters to merge", "drop --merge-adapters")
    if is_quantized(network):
        raise ConfigError(
            "--merge-adapters",
            "the base is 4-bit: merging would round the update into NF4 and change the model",
            "export the adapter folder (no --merge-adapters) and merge it onto the full-precision base with peft",
        )
    merged = peft_model.merge_and_unload()
    base = adapter_base(network)
    if merged is not base:  # peft returns the same module object it unwrapped
        raise RuntimeError("peft returned a different base module than it was given")
    del network.__dict__["_peft_model"]
    return network


def load_adapters(network: nn.Module, directory: str | Path) -> None:
    """Attach a saved adapter folder to ``network`` (in place), as :func:`add_adapters` would have made it."""
    from peft import PeftModel

    base = adapter_base(network)
    peft_model = PeftModel.from_pretrained(base, str(directory))
    network.__dict__["_peft_model"] = peft_model


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16) -> object:
    """The QLoRA quantization: bitsandbytes 4-bit NF4 with double quantization and ``compute_dtype`` compute.

    Raises:
        ConfigError: bitsandbytes is missing or cannot run 4-bit on this machine.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{NETWORK_ARGS}.quantize",
            "4-bit loading needs the bitsandbytes package, which is not installed",
            "pip install 'bitsandbytes>=0.50' (or drop quantize for plain LoRA)",
        )
    import bitsandbytes
    from packaging.version import Version

    if not torch.cuda.is_available() and Version(bitsandbytes.__version__) < Version("0.50"):
        raise ConfigError(
            f"{NETWORK_ARGS}.quantize",
            f"bitsandbytes {bitsandbytes.__version__} runs 4-bit only on CUDA and this machine has no GPU",
            "pip install 'bitsandbytes>=0.50' (4-bit on CPU too), run on a GPU, or drop quantize",
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
