"""An encoder-decoder Transformer: ``torch.nn.Transformer``'s architecture with embeddings, positions and a head.

Why not ``torch.nn.Transformer`` itself: its ``MultiheadAttention`` has no key/value cache, so generation would re-run
the whole target prefix per token; here the decoder reuses the decoder-only network's blocks (SDPA attention with a
cache, GPT-2 names) and adds cross-attention. Layout: a shared token embedding ``wte`` (source and target share the
vocabulary) tied to ``lm_head``, learned positions ``wpe``, ``encoder.h.N`` bidirectional blocks + ``encoder.ln_f``,
``decoder.h.N`` causal blocks with cross-attention + ``decoder.ln_f``.

Training is teacher forcing: ``forward(input_ids=src, attention_mask=src_mask, labels=tgt)`` shifts ``labels`` right
inside (``decoder_start_token_id`` first), and the loss covers target tokens only (``-100`` on padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litune.errors import NETWORK_ARGS, ConfigError
from litune.models.chunked_loss import chunked_lm_output, use_chunked_loss
from litune.models.flops import matmul_weights
from litune.models.generation import SamplingSettings, decode, eval_mode
from litune.models.output import IGNORE_INDEX, LMOutput, lm_output
from litune.models.transformer import (
    Block,
    TransformerConfig,
    TransformerLM,
    attend,
    attention_mask,
    check_length,
    layer_norm,
    padding_or_none,
    recomputes,
    run_block,
    split_heads,
)

log = logging.getLogger(__name__)


@dataclass
class Seq2SeqConfig(TransformerConfig):
    """:class:`TransformerConfig` with the encoder-decoder's defaults (3 encoder + 3 decoder layers, 512 positions).

    Only the defaults differ; the fields, their types and their validation are :class:`TransformerConfig`'s.
    """

    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    max_seq_len: int = 512


DecoderCache = list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
"""Per decoder layer: ``((self_key, self_value), (cross_key, cross_value))``, each ``[B, nhead, len, head_dim]``."""


class CrossAttention(nn.Module):
    """Multi-head attention from the target (queries) to the encoder output (keys and values), GPT-2 naming."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.nhead, self.head_dim, self.dropout = config.nhead, config.head_dim, config.dropout
        self.q_attn = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.c_attn = nn.Linear(config.d_model, 2 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend ``x [B, T, d]`` to ``memory [B, S, d]`` (``memory_mask`` bool ``[B, 1, 1, S]``).

        ``kv`` are the memory's keys/values from an earlier step: the memory does not change while decoding, so they
        are computed once per generation.
        """
        if kv is None:
            kv = tuple(split_heads(t, self.head_dim) for t in self.c_attn(memory).split(x.size(-1), dim=2))
        q = split_heads(self.q_attn(x), self.head_dim)  # (B, nh, T, hs)
        y = attend(q, kv[0], kv[1], memory_mask, self.dropout if self.training else 0.0)  # (B, T, d)
        return self.resid_dropout(self.c_proj(y)), kv


class DecoderBlock(Block):
    """Causal self-attention, cross-attention to the encoder output, feed-forward; each a residual branch."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config, cross_attention=CrossAttention)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        past: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """``x [B, T, d]`` -> ``[B, T, d]`` and this layer's cache ``((k, v), (cross_k, cross_v))``."""
        self_past, cross_past = past if past is not None else (None, None)
        attn, self_kv = self.attn(self.before(x, self.ln_1), self_mask, causal=True, past=self_past)
        x = self.after(x + attn, self.ln_1)
        cross, cross_kv = self.crossattention(self.before(x, self.ln_cross_attn), memory, memory_mask, cross_past)
        x = self.after(x + cross, self.ln_cross_attn)
        x = self.after(x + self.mlp(self.before(x, self.ln_2)), self.ln_2)
        return x, (self_kv, cross_kv)


class Stack(nn.Module):
    """A stack of blocks and its final LayerNorm (``h``, ``ln_f``), as in ``nn.TransformerEncoder/Decoder``."""

    def __init__(self, blocks: list[nn.Module], config: TransformerConfig) -> None:
        super().__init__()
        self.h = nn.ModuleList(blocks)
        self.ln_f = layer_norm(config)


class Seq2SeqLM(TransformerLM):
    """Encoder-decoder Transformer trained with teacher forcing; the arguments are :class:`TransformerConfig`'s plus
    the special token ids.

    Args:
        pad_token_id: id of padding in ``input_ids`` and in the shifted decoder input.
        decoder_start_token_id: first decoder input token (BOS), before the first target token.
        **config: the fields of :class:`Seq2SeqConfig` (:class:`~litune.models.transformer.TransformerConfig`'s, flat
            as in YAML ``init_args``); post-norm ``norm_first=False`` is the original Transformer, pre-norm the
            default because it trains more stably.
    """

    @staticmethod
    def targets_from_labels(labels: torch.Tensor) -> torch.Tensor:
        """The targets aligned with the logits: the labels themselves (the decoder input is shifted, not they)."""
        return labels

    def __init__(self, pad_token_id: int = 0, decoder_start_token_id: int = 1, **config: Any) -> None:
        # The arguments are declared once, by Seq2SeqConfig (TransformerConfig with this network's defaults):
        # LightningCLI reads them through this **config, and constructing it validates them.
        cfg = Seq2SeqConfig(**config)
        if cfg.num_encoder_layers < 1:
            raise ConfigError(
                f"{NETWORK_ARGS}.num_encoder_layers",
                f"num_encoder_layers={cfg.num_encoder_layers}: an encoder-decoder needs at least one encoder layer",
                "set num_encoder_layers >= 1 or use litune.models.transformer.DecoderLM",
            )
        for name, value in (("pad_token_id", pad_token_id), ("decoder_start_token_id", decoder_start_token_id)):
            if not 0 <= value < cfg.vocab_size:
                raise ConfigError(
                    f"{NETWORK_ARGS}.{name}",
                    f"{name}={value} is outside the vocabulary [0, {cfg.vocab_size})",
                    "use the tokenizer's pad / bos token id",
                )
        super().__init__(cfg)
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.encoder = Stack([Block(cfg) for _ in range(cfg.num_encoder_layers)], cfg)
        self.decoder = Stack([DecoderBlock(cfg) for _ in range(cfg.num_decoder_layers)], cfg)
        # GPT-2's scaled init, generalised: attention and MLP per encoder block, and cross-attention per decoder block.
        self.add_head(residual_branches=2 * cfg.num_encoder_layers + 3 * cfg.num_decoder_layers)

    def sharding_units(self) -> list[nn.Module]:
        """Encoder then decoder blocks, sharded one by one under FSDP2 (embeddings and norms stay with the root)."""
        return [*self.encoder.h, *self.decoder.h]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per target token, approximating source length = target length = ``seq_len``.

        ``6 N`` for the matmul weights (encoder and decoder each see about one token per target token) plus the
        attention scores: ``12 d T`` per encoder layer, and per decoder layer for self- and cross-attention.
        """
        n = matmul_weights(self)  # the tied output head yes; lookups, norms, biases no; full size under ZeRO-3
        attn_layers = self.config.num_encoder_layers + 2 * self.config.num_decoder_layers
        return 6.0 * n + 12.0 * attn_layers * self.config.d_model * seq_len

    def _embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        check_length(offset + ids.size(1), self.max_seq_len)
        pos = torch.arange(offset, offset + ids.size(1), device=ids.device)
        return self.drop(self.wte(ids) + self.wpe(pos))  # (B, T, d)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """Encode the source.

        Args:
            input_ids: ``[B, S]`` source ids.
            attention_mask: ``[B, S]`` 1 on real tokens, 0 on padding (or None).

        Returns:
            memory ``[B, S, d_model]`` and the key-padding mask for cross-attention (bool ``[B, 1, 1, S]`` or None).
        """
        padding = padding_or_none(attention_mask)
        memory_mask = None if padding is None else padding.bool()[:, None, None, :]
        x = self._embed(input_ids)
        recompute = recomputes(self)
        for block in self.encoder.h:
            x, _ = run_block(block, recompute, x, memory_mask, causal=False)
        return self.encoder.ln_f(x), memory_mask

    def decoder_states(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        decoder_padding_mask: torch.Tensor | None = None,
        past: DecoderCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, DecoderCache]:
        """Run the decoder on ``decoder_input_ids [B, T]`` (only the uncached ones when ``past`` is given).

        Returns:
            the final hidden states ``[B, T, d_model]`` (``lm_head`` of them are the logits) and the updated cache
            (empty unless ``use_cache``: holding every layer's keys/values during training would undo gradient
            checkpointing's saving).
        """
        past_len = past[0][0][0].size(2) if past else 0
        x = self._embed(decoder_input_ids, offset=past_len)
        self_mask = attention_mask(x.size(1), past_len, decoder_padding_mask, None, causal=True, device=x.device)
        recompute = recomputes(self)
        cache: DecoderCache = []
        for i, block in enumerate(self.decoder.h):
            x, layer_cache = run_block(block, recompute, x, self_mask, memory, memory_mask, past[i] if past else None)
            if use_cache:
                cache.append(layer_cache)
        return self.decoder.ln_f(x), cache

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder input: ``[start, y_0, ..., y_{T-2}]`` with ``-100`` replaced by padding."""
        shifted = F.pad(labels[:, :-1], (1, 0), value=self.decoder_start_token_id)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> LMOutput:
        """Teacher-forced logits for the target, and the loss on target tokens.

        Args:
            input_ids: ``[B, S]`` source ids.
            attention_mask: ``[B, S]`` source padding mask (1 real, 0 padding).
            labels: ``[B, T]`` target ids, ``-100`` on padding; the decoder sees them shifted right.
            decoder_input_ids: ``[B, T]`` explicit decoder input instead of shifted ``labels``.
            **kwargs: other batch entries, ignored.

        Returns:
            :class:`LMOutput` with ``logits [B, T, vocab_size]`` and ``targets = labels``.
        """
        hidden, head, targets = self.output_features(input_ids, attention_mask, labels, decoder_input_ids)
        if use_chunked_loss(self.config.loss_chunk_size, labels):
            return chunked_lm_output(hidden, head, targets, self.config.loss_chunk_size)
        return lm_output(head(hidden), labels)

    def _decoder_inputs(
        self, labels: torch.Tensor | None, decoder_input_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher-forced decoder input and its padding mask ``[B, T]`` (None when no label is ignored)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ConfigError("batch", "a seq2seq forward needs labels or decoder_input_ids", "add 'labels'")
            decoder_input_ids = self.shift_right(labels)
        decoder_padding = None
        if labels is not None and (torch.compiler.is_compiling() or bool((labels == IGNORE_INDEX).any())):
            # Padding keys: the shifted position of every ignored label (causality already hides the trailing ones;
            # this also masks padding inside a row).
            decoder_padding = F.pad(labels[:, :-1] != IGNORE_INDEX, (1, 0), value=True)
        return decoder_input_ids, decoder_padding

    def output_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, nn.Module, torch.Tensor | None]:
        """What the output layer sees, for losses that run it themselves (chunk by chunk).

        Returns:
            ``(decoder hidden [B, T, d_model], lm_head, targets [B, T] = labels)``.
        """
        decoder_input_ids, decoder_padding = self._decoder_inputs(labels, decoder_input_ids)
        memory, memory_mask = self.encode(input_ids, attention_mask)
        hidden, _ = self.decoder_states(decoder_input_ids, memory, memory_mask, decoder_padding)
        return hidden, self.lm_head, labels

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sampling: SamplingSettings | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        **fields: Any,
    ) -> torch.Tensor:
        """Generate targets for a right-padded source batch.

        Source positions are numbered from the first column, padding included (as in training, whose collator pads on
        the right): a left-padded source would be encoded at shifted positions and decode differently.

        The source is encoded once; each step runs the decoder on the new token only (self-attention keys/values
        cached, cross-attention keys/values computed once).

        Args:
            input_ids: ``[B, S]`` sources; attention_mask: ``[B, S]`` or None.
            sampling: :class:`~litune.models.generation.SamplingSettings` (``max_length`` counts target tokens), or
                its fields as keywords.
            use_cache, generator: see :func:`litune.models.generation.decode`.

        Returns:
            ``[B * num_return_sequences, <= max_length]`` target ids (the decoder start token is not included).
        """
        sampling = SamplingSettings.of(sampling, **fields)
        check_length(sampling.max_length, self.max_seq_len, "generate max_length")
        input_ids = input_ids.repeat_interleave(sampling.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(sampling.num_return_sequences, dim=0)
        with eval_mode(self):
            memory, memory_mask = self.encode(input_ids, attention_mask)

            def step(tokens: torch.Tensor, cache: DecoderCache | None) -> tuple[torch.Tensor, DecoderCache]:
                past_len = cache[0][0][0].size(2) if cache else 0
                hidden, new_cache = self.decoder_states(
                    tokens[:, past_len:], memory, memory_mask, past=cache, use_cache=True
                )
                return self.lm_head(hidden)[:, -1], new_cache

            start = torch.full((input_ids.size(0), 1), self.decoder_start_token_id, device=input_ids.device)
            out = decode(step, start, sampling.max_length + 1, sampling, use_cache=use_cache, generator=generator)
        return out[:, 1:]
