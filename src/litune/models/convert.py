"""Weights between Hugging Face GPT-2 (``GPT2LMHeadModel``) and litune's :class:`~litune.models.transformer.DecoderLM`.

The two share parameter names, so conversion is a one-to-one renaming with two explicit differences:

- Hugging Face GPT-2 stores its projections as ``Conv1D`` with weights ``[in, out]``; ours are ``nn.Linear`` with
  ``[out, in]``: the four projection weights per block (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.c_proj``) are transposed, nothing else.
- Hugging Face prefixes the body with ``transformer.``; we don't.

Loading is strict: a state dict with missing or unexpected keys (or wrong shapes) raises a :class:`ConfigError`
that lists them, instead of silently leaving random weights in place.

This module is the layer above the network: :class:`DecoderLM` knows nothing of GPT-2 checkpoints, and this module
reads and writes them (:func:`from_gpt2`, :func:`save_pretrained`), as ``litune export`` does for every network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from litune.errors import NETWORK_ARGS, NETWORK_FIELD, ConfigError
from litune.models.state_dict import load_strict
from litune.models.transformer import DecoderLM

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""Weights that Hugging Face GPT-2 keeps as ``Conv1D`` ``[in, out]`` and we keep as ``nn.Linear`` ``[out, in]``."""

HF_PREFIX = "transformer."
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old GPT-2 checkpoints, not weights

GPT2_CONFIG_FIELDS = {
    "d_model": "n_embd",
    "nhead": "n_head",
    "num_decoder_layers": "n_layer",
    "dim_feedforward": "n_inner",
    "dropout": "resid_pdrop",
    "vocab_size": "vocab_size",
    "max_seq_len": "n_positions",
    "layer_norm_eps": "layer_norm_epsilon",
    "init_std": "initializer_range",
    "tie_embeddings": "tie_word_embeddings",
}
""":class:`TransformerConfig` field -> the ``GPT2Config`` field holding the same value (read in both directions)."""

ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _is_conv1d(key: str) -> bool:
    return key.startswith("h.") and key.endswith(CONV1D_SUFFIXES)


def gpt2_to_litune(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose a ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict into :class:`DecoderLM` keys.

    A missing ``lm_head.weight`` (checkpoints of tied models often omit it) is filled with ``wte.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix(HF_PREFIX)
        if key.endswith(HF_BUFFERS):
            continue
        out[key] = value.t().contiguous() if _is_conv1d(key) else value
    if "lm_head.weight" not in out and "wte.weight" in out:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def litune_to_gpt2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`gpt2_to_litune`: :class:`DecoderLM` keys into ``GPT2LMHeadModel`` keys."""
    return {
        (key if key == "lm_head.weight" else HF_PREFIX + key): (value.t().contiguous() if _is_conv1d(key) else value)
        for key, value in state.items()
    }


def decoder_kwargs_from_gpt2_config(config: object) -> dict[str, object]:
    """:class:`DecoderLM` arguments equivalent to a ``transformers.GPT2Config``."""
    activation = config.activation_function
    if activation not in ACTIVATION_FROM_HF:
        raise ConfigError(
            NETWORK_FIELD,
            f"GPT-2 activation {activation!r} has no litune equivalent",
            f"use {list(ACTIVATION_FROM_HF)}",
        )
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise ConfigError(
            NETWORK_FIELD,
            "this GPT-2 config scales attention differently from litune",
            "use default attention scaling",
        )
    kwargs: dict[str, object] = {ours: getattr(config, theirs, None) for ours, theirs in GPT2_CONFIG_FIELDS.items()}
    kwargs["dim_feedforward"] = config.n_inner or 4 * config.n_embd  # GPT-2's None: 4 x the width
    kwargs["tie_embeddings"] = kwargs["tie_embeddings"] is not False  # tied unless the config says otherwise
    return {**kwargs, "activation": ACTIVATION_FROM_HF[activation]}


def to_hf_gpt2(network: DecoderLM, **config_overrides: object) -> nn.Module:
    """A ``transformers.GPT2LMHeadModel`` with ``network``'s weights (its dtype, on CPU), ready for ``save_pretrained``.

    Raises:
        ConfigError: for a post-norm network, which GPT-2 cannot represent.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = network.config
    if not cfg.norm_first:
        raise ConfigError(
            f"{NETWORK_ARGS}.norm_first",
            "a post-norm network (norm_first=False) has no GPT-2 equivalent",
            "train with norm_first=True to export to Hugging Face",
        )
    special = {} if cfg.vocab_size > 50256 else {"bos_token_id": None, "eos_token_id": None}
    hf_config = GPT2Config(
        **{theirs: getattr(cfg, ours) for ours, theirs in GPT2_CONFIG_FIELDS.items()},
        embd_pdrop=cfg.dropout,  # one dropout rate in litune, three in GPT-2
        attn_pdrop=cfg.dropout,
        activation_function=ACTIVATION_TO_HF[cfg.activation],
        **{**special, **config_overrides},
    )
    # Same dtype as the network, so `litune export --dtype bfloat16` (which casts the network first) writes bf16.
    hf = GPT2LMHeadModel(hf_config).to(next(network.parameters()).dtype)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    if not cfg.bias:
        # GPT-2 always has biases; a bias-free network is the same function with all of them zero.
        for key, value in hf.state_dict().items():
            name = key.removeprefix(HF_PREFIX)
            if key.endswith(".bias") and not key.endswith(HF_BUFFERS) and name not in state:
                state[name] = torch.zeros_like(value)
    load_strict(hf, litune_to_gpt2(state), source=f"{type(network).__name__}")
    return hf


def from_gpt2(source: str | Path | nn.Module, gradient_checkpointing: bool = False) -> DecoderLM:
    """Build a :class:`DecoderLM` with the weights of a Hugging Face GPT-2.

    Args:
        source: a ``GPT2LMHeadModel`` instance, or a local folder / hub id that ``from_pretrained`` loads.
        gradient_checkpointing: passed to the new network.
    """
    from transformers import GPT2LMHeadModel  # only here: building a network needs no transformers import

    hf = source if isinstance(source, nn.Module) else GPT2LMHeadModel.from_pretrained(source)
    network = DecoderLM(**decoder_kwargs_from_gpt2_config(hf.config), gradient_checkpointing=gradient_checkpointing)
    where = f"GPT-2 {source if isinstance(source, str) else ''}"
    load_strict(network, gpt2_to_litune(hf.state_dict()), source=where)
    return network


def has_hf_format(network: nn.Module) -> bool:
    """Whether :func:`save_pretrained` can write ``network`` as a Hugging Face folder."""
    return isinstance(network, DecoderLM) or hasattr(network, "save_pretrained")


def save_pretrained(network: nn.Module, directory: str | Path, **config_overrides: object) -> None:
    """Write ``network`` as a folder that ``AutoModelForCausalLM.from_pretrained`` loads (``config.json`` + weights).

    A :class:`DecoderLM` is written as GPT-2 (:func:`to_hf_gpt2`); a network that wraps a Hugging Face model writes
    itself (its own ``save_pretrained``).

    Args:
        network: the network; :func:`has_hf_format` must hold.
        directory: output folder.
        **config_overrides: for a :class:`DecoderLM`, extra ``GPT2Config`` fields, e.g. the tokenizer's
            ``bos_token_id``/``eos_token_id``.
    """
    if isinstance(network, DecoderLM):
        to_hf_gpt2(network, **config_overrides).save_pretrained(directory)
    else:
        network.save_pretrained(directory)
