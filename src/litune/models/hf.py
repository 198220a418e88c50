"""A Hugging Face causal LM behind litune's one network interface."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from litune.errors import NETWORK_ARGS, ConfigError, quoted_argument
from litune.models.chunked_loss import check_chunk_size, chunked_lm_output, use_chunked_loss
from litune.models.flops import matmul_weights
from litune.models.generation import SamplingSettings
from litune.models.output import LMOutput, causal_targets, lm_output
from litune.models.sequence_parallel import ULYSSES, SequenceSplit, register_ulysses_attention

_HEAD_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Hugging Face config fields that transform the logits after ``lm_head`` (Gemma 2, Cohere, Granite, ...)."""


def _check_plain_head(hf_config: PretrainedConfig) -> None:
    """The chunked loss calls ``lm_head`` itself: refuse models whose forward changes the logits after it."""
    for name in _HEAD_POSTPROCESSING:
        value = getattr(hf_config, name, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(
                f"{NETWORK_ARGS}.loss_chunk_size",
                f"{hf_config.model_type} applies {name}={value} to its logits after the output layer, which the "
                "chunked loss (it calls the output layer itself) would skip",
                "remove loss_chunk_size for this model",
            )


def build_hf_config(
    pretrained: str | None, config: dict[str, Any] | None, revision: str | None, trust_remote_code: bool
) -> PretrainedConfig:
    """Check the ``pretrained``/``config`` choice and return the Hugging Face config it names (a small JSON file).

    Args:
        pretrained: hub id or local folder, or ``None``.
        config: Hugging Face config keyword arguments with ``model_type``, or ``None``.
        revision: hub revision of ``pretrained``.
        trust_remote_code: allow config code from the hub.
    """
    if (pretrained is None) == (config is None):
        raise ConfigError(
            NETWORK_ARGS,
            "give exactly one of `pretrained` and `config`",
            "set `pretrained: gpt2` (or a local folder) to fine-tune, or `config: {model_type: gpt2, ...}` "
            "to train from scratch",
        )
    if pretrained is not None:
        if pretrained.startswith((".", "/", "~")) and not Path(pretrained).expanduser().exists():
            raise ConfigError(f"{NETWORK_ARGS}.pretrained", f"folder {pretrained} does not exist", "fix the path")
        with transformers_errors(f"{NETWORK_ARGS}.pretrained"):
            return AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{NETWORK_ARGS}.config", "`model_type` is missing", "add model_type: gpt2")
    _check_dimensions(kwargs)
    with transformers_errors(f"{NETWORK_ARGS}.config"):
        hf_config = AutoConfig.for_model(model_type, **kwargs)
    _check_token_ids(kwargs, getattr(hf_config, "vocab_size", None))
    return hf_config


NETWORK_ARGUMENTS = ("attn_implementation",)
"""Arguments of the HF networks that transformers quotes in its errors under the same name (``attn_implementation="x"``
is not supported): such an error is about that argument, ``model.network.init_args.<it>``, not a key of the config."""

_DIMENSION = re.compile(r"^(n_|num_)|(_size|_dim|_positions|_layers|_heads|_inner)$")
"""Config keys that are sizes (``n_embd``, ``hidden_size``, ``num_hidden_layers``, ``n_positions``...)."""


def _check_dimensions(config: dict[str, Any]) -> None:
    """Sizes transformers takes as given: 0 or a negative size fails deep inside torch (a tensor of negative size),
    a negative token id at the first batch."""
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        field = f"{NETWORK_ARGS}.config.{key}"
        if key.endswith("_token_id") and value < 0:
            raise ConfigError(field, f"{key}={value} is not a token id", "use an id in [0, vocab_size)")
        if _DIMENSION.search(key) and not key.endswith("_token_id") and value < 1:
            raise ConfigError(field, f"{key}={value} is not a size", f"set {key} to 1 or more")


def _check_token_ids(config: dict[str, Any], vocab_size: int | None) -> None:
    """A special token id the config sets must index the embedding (``[0, vocab_size)``): a larger one fails only
    when generation first emits or pads with it (an index error deep inside the embedding), long after training."""
    if not isinstance(vocab_size, int):
        return
    for key, value in config.items():
        ids = value if isinstance(value, list) else [value]
        bad = [i for i in ids if key.endswith("_token_id") and isinstance(i, int) and not isinstance(i, bool)]
        if any(i >= vocab_size for i in bad):
            raise ConfigError(
                f"{NETWORK_ARGS}.config.{key}",
                f"{key}={value} is not a token id of a vocabulary of {vocab_size}",
                f"use an id in [0, {vocab_size}) (the tokenizer's, e.g. its <|endoftext|>), or raise vocab_size",
            )


def check_model_fits(hf_config: PretrainedConfig, config: dict[str, Any] | None, budget_bytes: float) -> None:
    """Refuse a model whose fp32 weights alone need more than ``budget_bytes``, before a byte is allocated: a huge
    size (a typo, one zero too many) would otherwise fill the machine's memory, or build modules for hours.

    The count is the dense transformer's (layers x (4 H^2 + 2 H x MLP width) + embeddings), from the config's
    standard attributes; families without them are not checked.
    """
    layers, width = getattr(hf_config, "num_hidden_layers", None), getattr(hf_config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(width, int):
        return
    inner = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * width
    vocab = getattr(hf_config, "vocab_size", 0) or 0
    positions = getattr(hf_config, "max_position_embeddings", 0) or 0
    params = float(layers) * (4.0 * width * width + 2.0 * width * inner) + float(vocab + positions) * width
    if params * 4 <= budget_bytes:
        return
    sizes = {k: v for k, v in (config or {}).items() if isinstance(v, int) and _DIMENSION.search(k)}
    key = max(sizes, key=sizes.get) if sizes else "model_type"
    raise ConfigError(
        f"{NETWORK_ARGS}.config.{key}" if sizes else f"{NETWORK_ARGS}.config",
        f"{key}={sizes.get(key)}: a model of these sizes has about {params:.3g} parameters ({params * 4 / 2**30:.3g} "
        f"GiB in fp32), more than the {budget_bytes / 2**30:.0f} GiB this process could hold",
        "reduce the sizes; `litune estimate --config ...` shows the memory per device under each strategy",
    )


def host_memory_bytes() -> float:
    """This machine's physical memory."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@contextmanager
def transformers_errors(field: str) -> Iterator[None]:
    """Turn what transformers raises for a bad config or model folder into a :class:`ConfigError` for ``field``.

    transformers checks its configs where it builds them (an unknown ``model_type``, heads that do not divide the
    width, a folder without ``config.json``) and raises ``ValueError``/``KeyError``/``OSError``/``TypeError``: one
    boundary here covers every model family instead of litune repeating each family's rules.
    """
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError, TypeError, AttributeError, StrictDataclassError) as err:
        # huggingface_hub's strict-dataclass validation (transformers 5 configs) chains the ValueError as its cause.
        message = " ".join(str(err.__cause__ or err).split()) or type(err).__name__
        if argument := quoted_argument(message, NETWORK_ARGUMENTS):  # the network's own argument, not a config key
            field = f"{NETWORK_ARGS}.{argument}"
        raise ConfigError(
            field,
            f"transformers cannot build this model: {message}",
            "fix the value it names (e.g. n_head/num_attention_heads must divide n_embd/hidden_size); the model "
            "family's Hugging Face config documents every key",
        ) from None


def _quantization_kwargs(quantize: str | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the weights quantized (4-bit NF4) onto this process's device."""
    if quantize is None:
        return {}
    from litune.models.adapters import nf4_config

    # bitsandbytes quantizes while loading onto the target device; each DDP rank loads onto its own GPU.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": nf4_config(), "device_map": {"": device}}


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights, which training cannot go through.

    On a CPU with AVX512-BF16, a ``Linear4bit`` in eval mode whose input needs no gradient (validation before
    training, for one) repacks its weight in place into an inference-only layout
    (``quant_state.packing_format_for_cpu``) and from then on, in training too, computes with bitsandbytes'
    inference kernel, which autograd does not differentiate: ``litune fit`` with ``configs/peft/qlora.yaml`` failed
    at the first training step inside ``matmul_4bit`` ("a view of a leaf Variable that requires grad is being used
    in an in-place operation"). With the repacking off (``support_avx512bf16_for_cpu``, set per layer by bitsandbytes
    from the CPU's flags) every forward takes the trainable path; CPU inference of a 4-bit model is slower for it.
    GPUs are unaffected.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


TENSOR_PARALLEL_STYLES = ("colwise", "rowwise")
"""The styles of transformers' plans litune applies: a family whose plan uses others (packed, gathered, expert) is
refused before launch."""

GPT2_TENSOR_PARALLEL_LAYOUT = {
    "h.*.attn": "local_heads",
    "h.*.attn.c_attn": "conv1d_colwise_qkv",
    "h.*.attn.c_proj": "conv1d_rowwise",
    "h.*.mlp.c_fc": "conv1d_colwise",
    "h.*.mlp.c_proj": "conv1d_rowwise",
}
"""litune's plan of GPT-2 (transformers declares none: its fused ``Conv1D`` q|k|v needs the heads exchange of
:func:`litune.models.tensor_parallel.heads_of_this_rank`): the Megatron layout of :meth:`DecoderLM.tensor_parallel_plan`
on HF's module names, each attention running on ``n_head/N`` heads."""


def tensor_parallel_layout(hf_config: PretrainedConfig) -> dict[str, str]:
    """The family's tensor-parallel layout of its base model, ``{module pattern: style}``: GPT-2's is litune's
    (:data:`GPT2_TENSOR_PARALLEL_LAYOUT`); the others are transformers' own (``base_model_tp_plan``), e.g. Llama's
    ``{"layers.*.self_attn.q_proj": "colwise", ..., "layers.*.mlp.down_proj": "rowwise"}``.

    Read from transformers, not written per family here: Llama, Mistral, Qwen2/3, Gemma and the other families whose
    config declares one get the same Megatron layout transformers uses for ``from_pretrained(tp_plan="auto")``.

    Raises:
        ConfigError: a GPT-2 with cross-attention, or a family that declares no plan or one with other styles than
            column/row-wise.
    """
    if hf_config.model_type == "gpt2":
        if getattr(hf_config, "add_cross_attention", False):
            raise ConfigError(
                f"{NETWORK_ARGS}.config.add_cross_attention",
                "GPT-2's cross-attention projections (q_attn, a k|v c_attn) are not in litune's tensor-parallel plan",
                "set add_cross_attention: false, or tensor_parallel_size: 1 (FSDP2 alone)",
            )
        return dict(GPT2_TENSOR_PARALLEL_LAYOUT)
    layout = dict(getattr(hf_config, "base_model_tp_plan", None) or {})
    others = sorted({style for style in layout.values() if style not in TENSOR_PARALLEL_STYLES})
    if not layout or others:
        why = f"uses the styles {others}" if others else "declares no tensor-parallel plan"
        raise ConfigError(
            "model.network",
            f"transformers' {hf_config.model_type} {why} (litune applies column/row-wise plans: GPT-2, Llama, Mistral, "
            "Qwen2 and other families whose config has base_model_tp_plan)",
            "use GPT-2, a Llama-style family or litune.models.transformer.DecoderLM, or tensor_parallel_size: 1 "
            "(FSDP2 alone)",
        )
    return layout


def tensor_parallel_sizes_of(hf_config: PretrainedConfig) -> dict[str, int]:
    """The sizes a column/row-wise plan splits, by config key (each must divide by the tensor-parallel size). The
    vocabulary need not: DTensor splits it unevenly (``ceil(V/N)`` rows per rank, fewer on the last ones)."""
    if hf_config.model_type == "gpt2":
        return {
            "config.n_head": int(hf_config.n_head),
            "config.n_inner": int(hf_config.n_inner or 4 * hf_config.n_embd),
        }
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {f"config.{key}": int(getattr(hf_config, key)) for key in keys if getattr(hf_config, key, None)}


def _tensor_parallel_style(style: str) -> Any:  # noqa: ANN401 (a torch ParallelStyle)
    """The ``ParallelStyle`` of a layout's style name."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from litune.models.tensor_parallel import Conv1DColwiseParallel, Conv1DRowwiseParallel, LocalHeads

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "local_heads": LocalHeads,
        "conv1d_colwise": Conv1DColwiseParallel,
        "conv1d_colwise_qkv": partial(Conv1DColwiseParallel, fused_parts=3),
        "conv1d_rowwise": Conv1DRowwiseParallel,
    }[style]()


def sequence_parallel_sizes_of(hf_config: PretrainedConfig) -> dict[str, int]:
    """The head counts Ulysses splits, by config field (``config.num_attention_heads``, ``config.num_key_value_heads``
    when the family has grouped-query attention)."""
    sizes = {}
    for name in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int):
            sizes[f"config.{name}"] = value
    return sizes


def context_length(hf_config: PretrainedConfig) -> int:
    """The longest sequence a Hugging Face model's position table allows (no limit for rotary/relative positions)."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if getattr(hf_config, name, None):
            return int(getattr(hf_config, name))
    return 2**31 - 1


def model_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """The Hugging Face model's inputs: with ``position_ids`` (packed rows) no 2-D mask, so that transformers builds
    the block-diagonal causal mask from the restarting positions and attention never crosses documents."""
    if position_ids is not None:
        attention_mask = None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class BuildNow:
    """When :class:`HFCausalLM` makes its weights: when it is constructed, whole, in host memory."""

    def memory_budget(self) -> float:
        """Bytes a model typed by hand may take: it is built whole here, in host memory."""
        return host_memory_bytes()

    def at_construction(self, network: HFCausalLM) -> None:
        network.build()


class BuildInConfigureModel:
    """When :class:`DeferredHFCausalLM` makes its weights: in ``configure_model``, inside the strategy's sharded
    context; at construction only ``config.json`` is read."""

    def memory_budget(self) -> float:
        """Built sharded later: only absurd sizes are refused."""
        return 1e14

    def at_construction(self, network: HFCausalLM) -> None:
        # No weights yet; one build on the meta device (no memory) makes a config transformers rejects (heads that do
        # not divide the width, ...) fail now, before processes spawn, not in configure_model on every rank.
        with transformers_errors(f"{NETWORK_ARGS}.config"), torch.device("meta"):
            AutoModelForCausalLM.from_config(network.hf_config, trust_remote_code=network.trust_remote_code)


class HFCausalLM(nn.Module):
    """Any ``AutoModelForCausalLM``: pretrained (hub id or local folder) or built from a config for scratch training.

    The loss is not taken by the Hugging Face model (no ``labels`` are passed to it): litune computes it in
    :func:`~litune.models.output.lm_output` from :func:`~litune.models.output.causal_targets`, so every network shifts
    labels in the same single place.

    Args:
        pretrained: hub id (``"gpt2"``) or local folder loaded with ``from_pretrained``. Exactly one of ``pretrained``
            and ``config`` must be given.
        config: keyword arguments of a Hugging Face config for training from scratch, with ``model_type``, e.g.
            ``{"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 4096}``.
        revision: hub revision (branch, tag or commit) of ``pretrained``.
        trust_remote_code: run model code from the hub; off unless the config says so.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        quantize: ``"nf4"`` loads the pretrained weights in 4-bit NF4 (bitsandbytes, double quantization, bf16
            compute) for QLoRA: the base is frozen, so ``model.adapters`` must be set (``configs/peft/qlora.yaml``).
        loss_chunk_size: take the training loss this many token rows at a time through the output layer, so the
            ``[batch, seq, vocab]`` logits never exist at once (:mod:`litune.models.chunked_loss`); ``None``: the
            plain loss. Needs a model whose logits are exactly ``lm_head(base_model(...))`` (no logit soft-capping or
            scaling after the head).
    """

    weight_timing: ClassVar[BuildNow | BuildInConfigureModel] = BuildNow()
    """When the weights are made (a part, not an override: :class:`DeferredHFCausalLM` has the other one)."""

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        quantize: Literal["nf4"] | None = None,
        loss_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if quantize is not None and pretrained is None:
            raise ConfigError(
                f"{NETWORK_ARGS}.quantize",
                "4-bit quantization needs pretrained weights to quantize, but the network is built from `config`",
                "set `pretrained` (a hub id or local folder), or drop quantize",
            )
        check_chunk_size(loss_chunk_size, f"{NETWORK_ARGS}.loss_chunk_size")
        self.loss_chunk_size = loss_chunk_size
        self.pretrained = pretrained
        self.quantize = quantize
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.hf_config = build_hf_config(pretrained, config, revision, trust_remote_code)
        if config is not None:  # sizes typed by hand; built whole here, or (deferred) sharded: only absurd ones refused
            check_model_fits(self.hf_config, config, self.weight_timing.memory_budget())
        if loss_chunk_size is not None:
            _check_plain_head(self.hf_config)
        self.sequence_group: torch.distributed.ProcessGroup | None = None
        self.weight_timing.at_construction(self)

    def build(self) -> None:
        """Create ``self.model``: load the pretrained weights or initialise a fresh model from the config."""
        field = f"{NETWORK_ARGS}.pretrained" if self.pretrained else f"{NETWORK_ARGS}.config"
        with transformers_errors(field):
            if self.pretrained is not None:
                self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
                    self.pretrained,
                    config=self.hf_config,
                    revision=self.revision,
                    trust_remote_code=self.trust_remote_code,
                    attn_implementation=self.attn_implementation,
                    dtype=torch.float32,  # master weights in fp32; Lightning's precision plugin casts for compute
                    **_quantization_kwargs(self.quantize),
                )
                # from_pretrained returns the model in eval mode; training must see the model's own dropout (as a model
                # built from a config does, and as transformers' Trainer does by calling train()).
                self.model.train()
                if self.quantize is not None:
                    keep_4bit_layers_trainable(self.model)
            else:
                self.model = AutoModelForCausalLM.from_config(
                    self.hf_config,
                    trust_remote_code=self.trust_remote_code,
                    attn_implementation=self.attn_implementation,
                )
        self._enable_gradient_checkpointing()

    def _enable_gradient_checkpointing(self) -> None:
        if self.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False

    @property
    def is_built(self) -> bool:
        """Whether the Hugging Face model exists (always, except for a :class:`DeferredHFCausalLM` before
        ``configure_model``)."""
        return "model" in self._modules

    @property
    def vocab_size(self) -> int:
        if not self.is_built:
            return int(self.hf_config.vocab_size)
        return self.model.get_input_embeddings().num_embeddings

    @property
    def max_seq_len(self) -> int:
        return context_length(self.model.config if self.is_built else self.hf_config)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.model.num_parameters(exclude_embeddings=exclude_embeddings)

    def sharding_units(self) -> list[nn.Module]:
        """The transformer blocks, sharded one by one under FSDP2 (the classes transformers lists as not splittable).

        Every transformers architecture names its block class in ``_no_split_modules`` (``GPT2Block``,
        ``LlamaDecoderLayer``, ...), so this works for any ``AutoModelForCausalLM`` without a table of names.
        """
        names = set(getattr(self.model, "_no_split_modules", None) or ())
        return [module for module in self.model.modules() if type(module).__name__ in names]

    def split_sequences(self, group: torch.distributed.ProcessGroup | None) -> None:
        """Ulysses sequence parallelism over ``group`` (None: off): forwards that take a loss (``labels`` given) keep
        ``1/N`` of the sequence on each rank, attention runs through transformers' SDPA between two all-to-alls
        (:func:`litune.models.sequence_parallel.ulysses_attention`, registered as ``"litune_ulysses"``; outside a
        split it is plain SDPA, so generation and logits-only forwards run whole on every rank)."""
        self.sequence_group = group

    def sequence_parallel_sizes(self) -> dict[str, int]:
        """The sizes Ulysses splits (see :func:`sequence_parallel_sizes_of`)."""
        return sequence_parallel_sizes_of(self.hf_config)

    def _model_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The Hugging Face model's inputs and the aligned targets (labels shifted over the whole sequence).

        Under :meth:`split_sequences`: this rank's ``T/N`` tokens at their whole-sequence positions, no 2-D mask
        (transformers would read it as this slice's), and for the attention function the split and the whole
        sequence's mask (causal, padding, packed documents: litune's own, as the decoder builds it).
        """
        targets = None if labels is None else causal_targets(labels)
        if self.sequence_group is None or labels is None:  # split only a loss's forward (not generation's, lm-eval's)
            return model_inputs(input_ids, attention_mask, position_ids), targets
        from litune.models.transformer import attention_mask as whole_sequence_mask
        from litune.models.transformer import padding_or_none

        if self.model.config._attn_implementation != ULYSSES:
            register_ulysses_attention()
            self.model.set_attn_implementation(ULYSSES)
        split = SequenceSplit.of(self.sequence_group, input_ids.size(1))
        # As model_inputs: restarting positions alone mark packed documents (transformers ignores a 2-D mask then).
        padding = attention_mask if position_ids is None else None
        ids, padding, positions = split.whole_batch(input_ids, padding, position_ids)
        mask = whole_sequence_mask(split.length, 0, padding_or_none(padding), positions, causal=True, device=ids.device)
        inputs = {
            "input_ids": split.local(ids),
            "attention_mask": None,
            "position_ids": split.local(positions.expand(ids.size(0), -1)),
            "sequence_split": split,
            "sequence_mask": mask,
        }
        return inputs, split.targets(targets)

    def tensor_parallel_plan(self) -> dict[str, Any]:
        """How tensor parallelism splits the network (``parallelize_module``'s plan, see
        :mod:`litune.models.tensor_parallel`), from the family's layout (:func:`tensor_parallel_layout`): each block's
        q/k/v and MLP up/gate projections column-parallel (``heads/N`` heads and ``intermediate/N`` hidden units per
        rank), the attention output and MLP down projections row-parallel; norms and position tables replicated.

        The output layer is vocabulary-parallel as in :meth:`DecoderLM.tensor_parallel_plan`: the head column-parallel
        over the vocabulary (logits stay a DTensor sharded on it and the loss, plain or chunked, is
        :func:`~litune.models.tensor_parallel.vocab_parallel_cross_entropy_sum`, never gathering them), the token
        embedding row-parallel over the vocabulary (a tied head shares its ``[V/N, d]`` shard). A vocabulary that
        does not divide by ``N`` is split unevenly by DTensor (no padding: the checkpoint keeps its shapes).
        """
        import fnmatch

        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        base = f"model.{self.model.base_model_prefix}."
        names = [
            name.removeprefix(base) for name, _ in self.model.named_modules(prefix="model") if name.startswith(base)
        ]
        plan = {
            base + name: _tensor_parallel_style(style)
            for pattern, style in tensor_parallel_layout(self.model.config).items()
            for name in fnmatch.filter(names, pattern)
        }
        paths = {id(module): name for name, module in self.named_modules()}
        embedding, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if isinstance(embedding, nn.Embedding) and isinstance(head, nn.Linear):
            plan[paths[id(embedding)]] = RowwiseParallel(input_layouts=Replicate())
            plan[paths[id(head)]] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        return plan

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits (see :func:`tensor_parallel_sizes_of`)."""
        return tensor_parallel_sizes_of(self.hf_config)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: ``6 N`` for the ``N`` matmul weights plus ``12 L d T`` for attention (PaLM,
        appendix B). ``N`` (:func:`~litune.models.flops.matmul_weights`) counts the output layer (tied to the token
        table or not) but no lookup table, norm or bias, at full size under ZeRO-3.
        """
        cfg = self.model.config
        n_layer = getattr(cfg, "num_hidden_layers", 0)
        d_model = getattr(cfg, "hidden_size", 0)
        return 6.0 * matmul_weights(self.model) + 12.0 * n_layer * d_model * seq_len

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Next-token logits and loss.

        Args:
            input_ids: ``[batch, seq]`` token ids.
            attention_mask: ``[batch, seq]`` 1 for real tokens, 0 for padding.
            labels: ``[batch, seq]`` unshifted labels, -100 where no loss is taken.
            position_ids: ``[batch, seq]`` positions restarting at 0 at each packed document. When given, the mask is
                derived from them (transformers builds a block-diagonal causal mask from restarting positions when
                no 2-D mask is passed), so attention never crosses documents.
        """
        if use_chunked_loss(self.loss_chunk_size, labels):
            hidden, head, targets = self.output_features(input_ids, attention_mask, labels, position_ids)
            return chunked_lm_output(hidden, head, targets, self.loss_chunk_size)
        inputs, targets = self._model_inputs(input_ids, attention_mask, labels, position_ids)
        out = self.model(**inputs, use_cache=False)
        return lm_output(out.logits, targets)

    def output_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, nn.Module, torch.Tensor | None]:
        """What the output layer sees, for losses that run it themselves (chunk by chunk): the body alone (its last
        hidden state is after the final norm) and the head. Needs a plain head (no logit soft-capping after it).

        Returns:
            ``(hidden [B, T, d_model], lm_head, targets [B, T] or None)``.
        """
        inputs, targets = self._model_inputs(input_ids, attention_mask, labels, position_ids)
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        return hidden, self.model.get_output_embeddings(), targets

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sampling: SamplingSettings | None = None,
        **fields: Any,
    ) -> torch.Tensor:
        """Decode with the Hugging Face generation loop (KV cache included).

        Args:
            input_ids: ``[B, T]`` prompts; attention_mask: ``[B, T]`` or None.
            sampling: :class:`~litune.models.generation.SamplingSettings`, or its fields as keywords.

        Returns:
            ``[batch * num_return_sequences, <= max_length]`` token ids, prompt included.
        """
        sampling = SamplingSettings.of(sampling, **fields)
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            use_cache=True,
            **sampling.hf_kwargs(),
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a folder that ``AutoModelForCausalLM.from_pretrained`` loads (``config.json``, safetensors)."""
        self.model.save_pretrained(directory)


def builds_later(network: nn.Module) -> bool:
    """Whether ``network`` creates its weights later, in ``LitLM.configure_model`` (a :class:`DeferredHFCausalLM` not
    built yet): its adapters and its preference reference are made then, not when the config is parsed."""
    return isinstance(network, HFCausalLM) and not network.is_built


class DeferredHFCausalLM(HFCausalLM):
    """An :class:`HFCausalLM` whose weights are created in ``LitLM.configure_model``, not when the config is parsed.

    ``litune fit`` builds the network when it parses the config, before the strategy exists, so a pretrained model
    would be loaded in full on every rank. This class only reads the model's ``config.json`` then; Lightning calls
    ``configure_model`` inside the strategy's sharded context (``deepspeed.zero.Init`` plus
    :func:`litune.strategies.zero3.hf_zero3_context` under ZeRO-3), where ``from_pretrained`` loads straight into each
    rank's shard. Under other strategies it simply loads later. Use it in place of :class:`HFCausalLM` (same
    arguments) for large pretrained models:

    .. code-block:: yaml

        model:
          network:
            class_path: litune.models.DeferredHFCausalLM
            init_args: {pretrained: meta-llama/Llama-3.1-8B, gradient_checkpointing: true}
    """

    weight_timing = BuildInConfigureModel()

    def configure_model(self, shard: Callable[[nn.Module], object] | None = None) -> None:
        """Build the Hugging Face model (once; Lightning may call this again, e.g. when loading a checkpoint).

        Args:
            shard: given by a sharding strategy (FSDP2's ``shard_network``): shards a network built with parameters on
                the ``meta`` device and gives this rank's shards storage. The pretrained weights are then read into
                the shards one tensor at a time (:mod:`litune.models.sharded_load`), never whole on any rank.
        """
        if self.is_built:
            return
        if shard is None or self.pretrained is None or self.quantize is not None:
            self.build()
            return
        from litune.models.sharded_load import load_safetensors_into, parameters_on_meta, safetensors_files

        files = safetensors_files(self.pretrained, self.revision)
        with parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(
                self.hf_config, trust_remote_code=self.trust_remote_code, attn_implementation=self.attn_implementation
            )
        self._enable_gradient_checkpointing()
        shard(self)
        load_safetensors_into(self.model, files, prefix=self.model.base_model_prefix)
        self.model.train()

    def __getattr__(self, name: str) -> Any:
        if name == "model" and "model" not in self._modules:
            raise RuntimeError("DeferredHFCausalLM is used before configure_model() built it")
        return super().__getattr__(name)
