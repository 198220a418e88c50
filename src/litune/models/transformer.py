"""litune's own decoder-only Transformer: GPT-2's architecture and parameter names, readable top to bottom.

Parameter names follow Hugging Face GPT-2 (``wte``, ``wpe``, ``h.N.ln_1``, ``h.N.attn.c_attn``, ``h.N.attn.c_proj``,
``h.N.ln_2``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``, ``ln_f``), so :mod:`litune.models.convert` (the layer above this
module) maps weights one to one in both directions (only GPT-2's ``Conv1D`` ``[in, out]`` weights are transposed to
``nn.Linear``'s ``[out, in]``).

The blocks defined here (:class:`SelfAttention`, :class:`MLP`, :class:`Block`) are reused by the encoder-decoder in
:mod:`litune.models.seq2seq`, and :class:`TransformerConfig` configures both networks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from litune.errors import NETWORK_ARGS, ConfigError
from litune.models.chunked_loss import check_chunk_size, chunked_lm_output, use_chunked_loss
from litune.models.flops import matmul_weights
from litune.models.generation import SamplingSettings, generate_causal
from litune.models.output import LMOutput, causal_targets, lm_output
from litune.models.sequence_parallel import SequenceSplit
from litune.models.tensor_parallel import heads_of_this_rank

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle

log = logging.getLogger(__name__)

Activation = Literal["gelu_tanh", "gelu", "relu"]
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # GPT-2 uses the tanh approximation of GELU (Hugging Face calls it "gelu_new"): exact parity needs the same one.
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}
"""Activation name -> module factory (a fresh module per layer: a shared instance would be shared mode state)."""

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
"""One ``(key, value)`` pair per layer, each ``[batch, nhead, cached_len, head_dim]``."""


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class TransformerConfig:
    """Shape and behaviour of a litune Transformer (decoder-only or encoder-decoder), validated at construction.

    Args:
        d_model: width of the residual stream.
        nhead: attention heads per layer; must divide ``d_model``.
        num_encoder_layers: encoder blocks (0 for a decoder-only network).
        num_decoder_layers: decoder blocks.
        dim_feedforward: hidden width of the feed-forward layer (``None``: ``4 * d_model`` as in GPT-2).
        dropout: dropout on embeddings, attention weights and residual branches.
        activation: feed-forward nonlinearity; ``gelu_tanh`` is GPT-2's ("gelu_new" in Hugging Face).
        vocab_size: number of token ids; must equal the tokenizer's length.
        max_seq_len: longest sequence (number of learned positions).
        norm_first: pre-norm blocks (GPT-2) if True, post-norm (the original Transformer) if False.
        bias: biases in linear layers and layer norms.
        tie_embeddings: share the token embedding with the output head.
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: standard deviation of the normal initialisation (GPT-2: 0.02).
        gradient_checkpointing: recompute each block's activations in the backward pass instead of storing them.
        loss_chunk_size: take the training loss this many token rows at a time through the output layer, so the
            ``[batch, seq, vocab]`` logits (and their float32 copy) never exist at once
            (:mod:`litune.models.chunked_loss`); ``None``: the plain loss. Same value and gradients; costs one more
            output-layer forward.
    """

    d_model: int = 256
    nhead: int = 4
    num_encoder_layers: int = 0
    num_decoder_layers: int = 4
    dim_feedforward: int | None = None
    dropout: float = 0.0
    activation: Activation = "gelu_tanh"
    vocab_size: int = 50257
    max_seq_len: int = 1024
    norm_first: bool = True
    bias: bool = True
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_chunk_size(self.loss_chunk_size, f"{NETWORK_ARGS}.loss_chunk_size")
        for name in ("d_model", "nhead", "num_decoder_layers", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{NETWORK_ARGS}.{name}", f"{name}={value!r} must be a positive integer", f"set {name} >= 1"
                )
        if self.num_encoder_layers < 0:
            raise ConfigError(
                f"{NETWORK_ARGS}.num_encoder_layers",
                f"num_encoder_layers={self.num_encoder_layers} is negative",
                "use >= 0",
            )
        if self.d_model % self.nhead:
            raise ConfigError(
                f"{NETWORK_ARGS}.nhead",
                f"d_model={self.d_model} is not divisible by nhead={self.nhead}: "
                f"per-head dim would be {self.d_model / self.nhead:g}",
                f"choose nhead in {{{', '.join(map(str, _divisors(self.d_model)))}}} or change d_model",
            )
        if self.dim_feedforward is None:
            self.dim_feedforward = 4 * self.d_model
        if self.dim_feedforward < 1:
            raise ConfigError(
                f"{NETWORK_ARGS}.dim_feedforward",
                f"dim_feedforward={self.dim_feedforward} must be positive",
                "e.g. 4*d_model",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"{NETWORK_ARGS}.dropout", f"dropout={self.dropout} is outside [0, 1)", "use e.g. 0.0 or 0.1"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"{NETWORK_ARGS}.activation",
                f"unknown activation {self.activation!r}",
                f"use one of {sorted(ACTIVATIONS)}",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits, by config field: each must be divisible by the tensor-parallel size."""
        return {"nhead": self.nhead, "dim_feedforward": int(self.dim_feedforward or 0), "vocab_size": self.vocab_size}


def attention_mask(
    q_len: int,
    past_len: int,
    padding_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    causal: bool,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask for :func:`F.scaled_dot_product_attention` (True: may attend), or None when none is needed.

    Args:
        q_len: number of query positions (the new tokens).
        past_len: number of cached positions before them.
        padding_mask: ``[batch, past_len + q_len]``, 1 on real tokens, 0 on padding (keys that nobody may attend).
        position_ids: ``[batch, q_len]``; where they restart at 0 a new document begins (packed batches) and no token
            attends across documents. Only used without a cache (documents span the whole sequence).
        causal: forbid attending to later positions.
        device: where to build the mask when neither tensor is given.

    Returns:
        ``[batch or 1, 1, q_len, past_len + q_len]`` bool, or None when plain ``is_causal`` (or nothing) suffices.
    """
    k_len = past_len + q_len
    # Whether documents restart inside a row is read from the data, except under torch.compile, where reading it would
    # break the graph (and make the host wait for the device): there the document mask is built, right for any batch.
    packed = (
        position_ids is not None
        and past_len == 0
        and (torch.compiler.is_compiling() or bool((position_ids[:, 1:] == 0).any()))
    )
    if padding_mask is None and not packed and (not causal or past_len == 0 or q_len == 1):
        return None  # SDPA's is_causal suffices (no cache), or one new query attends to the whole cache
    if padding_mask is not None:
        device = padding_mask.device
    elif position_ids is not None:
        device = position_ids.device
    mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(past_len, k_len, device=device)[:, None]
        mask = mask & (torch.arange(k_len, device=device)[None, :] <= q_pos)
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
    if packed:
        doc = torch.cumsum(position_ids == 0, dim=1)  # [B, T]: document index of each token
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    # A query with nothing to attend (a padding token) would make SDPA return NaN; let it attend everywhere instead:
    # its output is never used, and no real token attends to it.
    return mask | ~mask.any(dim=-1, keepdim=True)


def attention_mask_for_batch(
    q_len: int,
    past_len: int,
    padding_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Causal mask for a decoder call: drop an all-ones padding mask so SDPA can take its fast ``is_causal`` path.

    Under torch.compile the padding mask is kept as it is (reading it would break the graph); :class:`LitLM` looks
    for padding on the host and passes no mask when there is none, so an unpadded batch gets ``is_causal`` there too.
    Packed rows whose ``position_ids`` restart get the document mask instead (:func:`attention_mask`).
    """
    return attention_mask(q_len, past_len, padding_or_none(padding_mask), position_ids, causal=True, device=device)


def padding_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` (``[batch, keys]``, 1 on real tokens), or None when it has no padding, so attention can skip it.

    Reading the mask is data-dependent: under torch.compile it would break the graph, so there the mask is kept as it
    is (right for any batch, just not SDPA's fastest path).
    """
    if mask is None or torch.compiler.is_compiling() or not bool(mask.all()):
        return mask
    return None


def layer_norm(config: TransformerConfig) -> nn.LayerNorm:
    """A LayerNorm over the residual stream, as every block and stack of both networks has."""
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, heads * head_dim]`` -> ``[B, heads, T, head_dim]`` (``heads``: ``nhead``, or this rank's ``nhead / N``
    under tensor parallelism)."""
    return x.view(x.size(0), x.size(1), -1, head_dim).transpose(1, 2)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, head_dim]`` -> ``[B, T, heads * head_dim]``."""
    return y.transpose(1, 2).flatten(2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool = False,
    sequence: SequenceSplit | None = None,
) -> torch.Tensor:
    """Attention of every head through :func:`F.scaled_dot_product_attention`, heads merged.

    Args:
        q: ``[B, heads, T, head_dim]``; k, v: ``[B, heads, S, head_dim]``.
        mask: bool, broadcast to ``[B, heads, T, S]`` (True: may attend), or None.
        dropout_p: dropout on the attention weights (0 outside training).
        is_causal: SDPA's own causal mask (only with ``mask=None``).
        sequence: Ulysses sequence parallelism: q, k, v hold this rank's ``T/N`` positions of every head; they are
            exchanged for all ``T`` positions of ``heads/N`` heads around SDPA (``mask`` is the whole sequence's).

    Returns:
        ``[B, T, heads * head_dim]`` (``T/N`` positions under a sequence split).
    """
    if sequence is not None:
        q, k, v = (sequence.to_heads(t) for t in (q, k, v))  # each (B, nh/N, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
    return merge_heads(y if sequence is None else sequence.to_sequence(y))


def recomputes(network: nn.Module) -> bool:
    """Whether this forward checkpoints its blocks: gradient checkpointing on, training, and a backward to come."""
    return bool(network.gradient_checkpointing) and network.training and torch.is_grad_enabled()


def run_block(block: nn.Module, recompute: bool, *args: Any, **kwargs: Any) -> Any:
    """``block(*args, **kwargs)``, its activations recomputed in the backward pass when ``recompute``.

    Non-reentrant checkpointing accepts keyword and None arguments and restores the dropout RNG state on recompute.
    """
    return checkpoint(block, *args, use_reentrant=False, **kwargs) if recompute else block(*args, **kwargs)


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`F.scaled_dot_product_attention`, with an optional key/value cache.

    Args:
        config: the network's configuration.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.nhead, self.head_dim, self.dropout = config.nhead, config.head_dim, config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend ``x`` to itself (and to the cached keys/values).

        Args:
            x: ``[B, T, d_model]`` (``T/N`` positions under a sequence split).
            mask: bool ``[B or 1, 1, T, past + T]`` from :func:`attention_mask` (the whole sequence's), or None.
            causal: with ``mask=None`` and no cache, apply SDPA's built-in causal mask.
            past: cached ``(key, value)``, each ``[B, nhead, past, head_dim]``.
            sequence: the Ulysses split of this forward (no cache), see :func:`attend`.

        Returns:
            ``[B, T, d_model]`` and the new ``(key, value)`` including ``x``'s.
        """
        qkv = self.c_attn(x)  # (B, T, 3 * d_model)
        if isinstance(qkv, DTensor):  # tensor parallelism: this rank's heads of q, k and v, (B, T, 3 * d_model / N)
            qkv = heads_of_this_rank(qkv, 3)
        q, k, v = (split_heads(t, self.head_dim) for t in qkv.chunk(3, dim=2))  # each (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        whole = x.size(1) if sequence is None else sequence.length  # positions attention sees
        is_causal = causal and mask is None and past is None and whole > 1
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, is_causal, sequence)  # (B, T, d_model)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    """The position-wise feed-forward layer ``c_proj(act(c_fc(x)))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.dim_feedforward, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(config.dim_feedforward, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, d_model]`` -> ``[B, T, d_model]``."""
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Sublayers(nn.Module):
    """Where a block's LayerNorms sit: before each sublayer (pre-norm, GPT-2: ``x = x + f(ln(x))``) or after the
    residual sum (post-norm, the original Transformer: ``x = ln(x + f(x))``). A block's ``forward`` reads
    ``x = self.after(x + f(self.before(x, ln)), ln)`` for each sublayer ``f``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = config.norm_first

    def before(self, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """The sublayer's input: ``ln(x)`` pre-norm, ``x`` post-norm."""
        return ln(x) if self.norm_first else x

    def after(self, x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        """The residual sum passed on: as is pre-norm, ``ln`` of it post-norm."""
        return x if self.norm_first else ln(x)


class Block(Sublayers):
    """A Transformer block: self-attention then feed-forward, each a residual branch with a LayerNorm.

    Used causally by the decoder and bidirectionally by the encoder of the encoder-decoder.
    """

    def __init__(
        self, config: TransformerConfig, cross_attention: Callable[[TransformerConfig], nn.Module] | None = None
    ) -> None:
        """
        Args:
            config: the network's configuration.
            cross_attention: builds a third sublayer between the two, ``ln_cross_attn`` + ``crossattention`` (the
                encoder-decoder's decoder blocks, :class:`litune.models.seq2seq.DecoderBlock`), or None.
        """
        super().__init__(config)
        self.ln_1 = layer_norm(config)
        self.attn = SelfAttention(config)
        if cross_attention is not None:
            self.ln_cross_attn = layer_norm(config)
            self.crossattention = cross_attention(config)
        self.ln_2 = layer_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        sequence: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``[B, T, d_model]`` -> ``[B, T, d_model]`` and this layer's ``(key, value)``; see :class:`SelfAttention`."""
        attn, kv = self.attn(self.before(x, self.ln_1), mask, causal=causal, past=past, sequence=sequence)
        x = self.after(x + attn, self.ln_1)
        x = self.after(x + self.mlp(self.before(x, self.ln_2)), self.ln_2)
        return x, kv


def init_gpt2_(module: nn.Module, std: float, residual_std: float) -> None:
    """GPT-2's initialisation: N(0, std) weights, zero biases, unit LayerNorms, and the residual output projections
    (``*.c_proj.weight``) at ``residual_std`` so the residual stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, 0.0, residual_std)
        elif p.dim() >= 2:
            nn.init.normal_(p, 0.0, std)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_length(total: int, max_seq_len: int, what: str = "sequence") -> None:
    """Raise a :class:`ConfigError` naming both numbers when a sequence does not fit the learned positions."""
    if total > max_seq_len:
        raise ConfigError(
            f"{NETWORK_ARGS}.max_seq_len",
            f"the {what} has {total} tokens but the network has max_seq_len={max_seq_len} positions",
            f"shorten the input to <= {max_seq_len} tokens (data block_size / generate max_length) "
            f"or build the network with max_seq_len >= {total}",
        )


class TransformerLM(nn.Module):
    """What litune's two Transformers share beyond their blocks: the embeddings ``wte``, ``wpe`` (made first), the
    output head ``lm_head`` and GPT-2's initialisation (:meth:`add_head`, once the blocks exist), and counting.

    Args:
        cfg: the validated configuration.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_size, self.max_seq_len = cfg.vocab_size, cfg.max_seq_len
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def add_head(self, residual_branches: int) -> None:
        """Add ``lm_head`` after the blocks, initialise every weight as GPT-2 does (the residual projections scaled by
        ``1/sqrt(residual_branches)``, so the stream's variance does not grow with depth) and tie the head."""
        cfg = self.config
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_gpt2_(self, cfg.init_std, cfg.init_std / math.sqrt(residual_branches))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        log.info(
            f"{type(self).__name__}: n_params={self.num_parameters():,} "
            f"(without embeddings: {self.num_parameters(exclude_embeddings=True):,})"
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (tied weights counted once).

        Args:
            exclude_embeddings: leave out the token and position embeddings (and an untied output head).
        """
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for p in (self.wte.weight, self.wpe.weight, self.lm_head.weight):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())


class DecoderLM(TransformerLM):
    """A GPT-2-style decoder-only causal language model.

    Pre-norm blocks (configurable), learned positions, tied embeddings, GPT-2 initialisation, causal attention through
    SDPA, per-block gradient checkpointing, a key/value cache for generation. The arguments are those of
    :class:`TransformerConfig` (without encoder layers), given flat, so LightningCLI configures it from YAML.
    """

    def __init__(self, **config: Any) -> None:
        """
        Args:
            **config: the fields of :class:`TransformerConfig` (``d_model``, ``nhead``, ``num_decoder_layers``, ...),
                flat, as in YAML ``init_args``; ``num_encoder_layers`` must stay 0.
        """
        # The only declaration of the arguments is TransformerConfig: jsonargparse/LightningCLI reads its fields (types,
        # defaults, docs) through this **config, and constructing it validates them once.
        cfg = TransformerConfig(**config)
        if cfg.num_encoder_layers:
            raise ConfigError(
                f"{NETWORK_ARGS}.num_encoder_layers",
                f"a decoder-only network has no encoder, got num_encoder_layers={cfg.num_encoder_layers}",
                "set it to 0 or use litune.models.seq2seq.Seq2SeqLM",
            )
        super().__init__(cfg)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_decoder_layers))
        self.ln_f = layer_norm(cfg)
        self.add_head(residual_branches=2 * cfg.num_decoder_layers)  # attention and MLP per block
        self.sequence_group: dist.ProcessGroup | None = None

    def split_sequences(self, group: dist.ProcessGroup | None) -> None:
        """Ulysses sequence parallelism over ``group`` (None: off): every forward that takes a loss (``labels`` given,
        no key/value cache) keeps ``1/N`` of the sequence on each rank of the group (see
        :mod:`litune.models.sequence_parallel`); other forwards (generation, logits for evaluation harnesses) run the
        whole sequence on every rank."""
        self.sequence_group = group

    def sequence_parallel_sizes(self) -> dict[str, int]:
        """The sizes Ulysses splits by config field (each must divide by the sequence-parallel size)."""
        return {"nhead": self.config.nhead}

    def _split(
        self, length: int, labels: torch.Tensor | None, past_key_values: KVCache | None = None, use_cache: bool = False
    ) -> SequenceSplit | None:
        """This forward's sequence split: under :meth:`split_sequences`, for a loss (labels, no key/value cache)."""
        if self.sequence_group is None or labels is None or past_key_values or use_cache:
            return None
        return SequenceSplit.of(self.sequence_group, length)

    def sharding_units(self) -> list[nn.Module]:
        """The blocks, sharded one by one under FSDP2 (embeddings, final norm and the tied head stay with the root)."""
        return list(self.h)

    def tensor_parallel_plan(self) -> dict[str, ParallelStyle]:
        """How tensor parallelism splits the network (``parallelize_module``'s plan; see
        :mod:`litune.models.tensor_parallel`).

        Per block: q/k/v (the fused ``c_attn``) and the MLP's ``c_fc`` column-parallel (each rank computes ``nhead/N``
        heads and ``dim_feedforward/N`` hidden units), both ``c_proj`` row-parallel (partial sums all-reduced). The
        token embedding is row-parallel over the vocabulary and the output layer column-parallel over it (the tied
        weight is ``[V/N, d]`` rows on each rank, one shard for both); its logits stay sharded on the vocabulary and
        the loss (plain or chunked) is the vocab-parallel one. Position embeddings and norms are replicated.
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan: dict[str, ParallelStyle] = {
            "wte": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        }
        for i in range(len(self.h)):
            # Sharded output kept as a DTensor: SelfAttention takes each rank's heads of q, k and v from it.
            plan[f"h.{i}.attn.c_attn"] = ColwiseParallel(use_local_output=False)
            plan[f"h.{i}.attn.c_proj"] = RowwiseParallel()
            plan[f"h.{i}.mlp.c_fc"] = ColwiseParallel()
            plan[f"h.{i}.mlp.c_proj"] = RowwiseParallel()
        return plan

    def tensor_parallel_sizes(self) -> dict[str, int]:
        """The sizes tensor parallelism splits (see :meth:`TransformerConfig.tensor_parallel_sizes`)."""
        return self.config.tensor_parallel_sizes()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at context ``seq_len``: ``6 N + 12 L d T`` (PaLM appendix B).

        ``N`` counts every weight used in a matmul (:func:`~litune.models.flops.matmul_weights`: the tied output
        head yes; position and token lookups, norms and biases no), at full size under ZeRO-3.
        """
        return 6.0 * matmul_weights(self) + 12.0 * len(self.h) * self.config.d_model * seq_len

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        **kwargs: object,
    ) -> LMOutput:
        """Next-token logits, and the loss when ``labels`` are given.

        Args:
            input_ids: ``[B, T]`` token ids (only the new ones when ``past_key_values`` is given).
            attention_mask: ``[B, past + T]``, 1 on real tokens, 0 on padding.
            labels: ``[B, T]`` unshifted labels, ``-100`` where no loss is taken; shifted by ``causal_lm_output``.
            position_ids: ``[B, T]`` positions; restarting at 0 marks a new packed document (no attention across).
            past_key_values: the cache returned by a previous call with ``use_cache=True``.
            use_cache: return the key/value cache in ``LMOutput.past_key_values``.
            **kwargs: other batch entries, ignored.

        Returns:
            :class:`LMOutput` with ``logits [B, T, vocab_size]`` (this rank's ``T/N`` positions and their targets
            under sequence parallelism).
        """
        split = self._split(input_ids.size(1), labels, past_key_values, use_cache)
        x, past = self._hidden(input_ids, attention_mask, position_ids, past_key_values, use_cache, split)
        targets = None if labels is None else causal_targets(labels)  # shifted over the whole sequence
        if split is not None:
            targets = split.targets(targets)
        if use_chunked_loss(self.config.loss_chunk_size, labels):
            return chunked_lm_output(x, self.lm_head, targets, self.config.loss_chunk_size, past_key_values=past)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        return lm_output(logits, targets, past_key_values=past)

    def _hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        split: SequenceSplit | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """The body: final hidden states ``[B, T, d_model]`` (after ``ln_f``, before ``lm_head``) and the cache.

        Under a sequence ``split`` the mask is the whole sequence's (causal, padding, documents) and the positions
        are each token's place in the whole sequence; the blocks run on this rank's ``T/N`` tokens.
        """
        if split is not None:
            input_ids, attention_mask, position_ids = split.whole_batch(input_ids, attention_mask, position_ids)
        _, T = input_ids.shape
        past_len = past_key_values[0][0].size(2) if past_key_values else 0
        check_length(past_len + T, self.max_seq_len)
        # Only positions given with the batch can mark packed documents; generated ones are one document.
        mask = attention_mask_for_batch(T, past_len, attention_mask, position_ids, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None, :]
        elif not torch.compiler.is_compiling() and int(position_ids.max()) >= self.max_seq_len:
            check_length(int(position_ids.max()) + 1, self.max_seq_len, "position_ids")
        if split is not None:  # this rank's tokens, at their whole-sequence positions
            input_ids, position_ids = split.local(input_ids), split.local(position_ids)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, d_model)
        cache: KVCache = []
        recompute = recomputes(self)
        for i, block in enumerate(self.h):
            past = past_key_values[i] if past_key_values else None
            x, kv = run_block(block, recompute, x, mask, causal=True, past=past, sequence=split)
            if use_cache:  # only then: holding every layer's keys/values would undo checkpointing's saving
                cache.append(kv)
        return self.ln_f(x), (cache if use_cache else None)

    def output_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, nn.Module, torch.Tensor | None]:
        """What the output layer sees, for losses that run it themselves (per-sequence log-probs chunk by chunk).

        Returns:
            ``(hidden [B, T, d_model], lm_head, targets [B, T] or None)``: ``lm_head(hidden)`` are the logits of
            :meth:`forward`, ``targets`` its shifted labels (this rank's ``T/N`` positions under sequence parallelism).
        """
        split = self._split(input_ids.size(1), labels)
        hidden, _ = self._hidden(input_ids, attention_mask, position_ids, split=split)
        targets = None if labels is None else causal_targets(labels)
        return hidden, self.lm_head, targets if split is None else split.targets(targets)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sampling: SamplingSettings | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        **fields: Any,
    ) -> torch.Tensor:
        """Continue left-padded prompts; see :func:`litune.models.generation.generate_causal`.

        Args:
            input_ids: ``[B, T]`` prompts.
            attention_mask: ``[B, T]``, 0 on left padding, or None.
            sampling: :class:`~litune.models.generation.SamplingSettings`, or its fields as keywords.
            use_cache: keep the key/value cache (False re-runs the prefix each step).
            generator: random generator for sampling, or one per prompt (see :func:`litune.models.generation.decode`).

        Returns:
            ``[B * num_return_sequences, <= max_length]`` token ids, prompt included.
        """
        sampling = SamplingSettings.of(sampling, **fields)
        check_length(sampling.max_length, self.max_seq_len, "generate max_length")
        return generate_causal(self, input_ids, attention_mask, sampling, use_cache=use_cache, generator=generator)
