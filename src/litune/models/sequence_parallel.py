"""Ulysses sequence parallelism: each rank of a sequence group holds ``1/N`` of every sequence.

Everything outside attention (embeddings, norms, MLPs, the output layer and the loss) works token by token, so each
rank runs it on its own slice of the sequence. Attention needs the whole sequence: around it an all-to-all exchanges
the sequence for the heads (DeepSpeed-Ulysses, Jacobs et al. 2023),

    q, k, v  [B, heads, T/N, head_dim]  --all-to-all-->  [B, heads/N, T, head_dim]   (every position, 1/N of heads)
    output   [B, heads/N, T, head_dim]  --all-to-all-->  [B, heads, T/N, head_dim]   (back to this rank's slice)

so each rank attends over all ``T`` positions for ``heads/N`` heads, with the mask of the whole sequence (causal,
padding and packed-document boundaries as one process would build it). The loss of each slice is a sum over its own
target tokens: labels are shifted over the whole sequence before slicing (the last token of a slice predicts the first
of the next one), so the slices' sums add up to the one-process sum and the objective counts each target once.

The all-to-all is torch's differentiable functional collective ``all_to_all_single_autograd`` (its backward is the
reverse exchange; see :func:`litune.lightning_private.all_to_all_autograd`). What torch and transformers lack is only
the layout: which dimension is scattered and which gathered (:func:`exchange`), the slicing of a batch
(:class:`SequenceSplit`), and, for Hugging Face models, an attention function for transformers' registry
(:func:`ulysses_attention`, registered as ``"litune_ulysses"``) that wraps transformers' own SDPA attention with the
two exchanges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from litune.errors import NETWORK_ARGS, ConfigError
from litune.lightning_private import all_to_all_autograd
from litune.models.output import IGNORE_INDEX

ULYSSES = "litune_ulysses"
"""The name of :func:`ulysses_attention` in transformers' ``AttentionInterface``."""


def exchange(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all over ``group``: split ``x`` into ``N`` chunks along ``scatter_dim`` (chunk ``j`` goes to rank ``j``),
    and concatenate the chunks received from ranks ``0..N-1`` along ``gather_dim``. Differentiable.

    Args:
        x: e.g. ``[B, heads, T/N, head_dim]`` with ``scatter_dim=1, gather_dim=2`` -> ``[B, heads/N, T, head_dim]``.
        group: the sequence-parallel group (ranks ordered as the slices of the sequence).
    """
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()  # [N, ...]: chunk j for rank j
    received = all_to_all_autograd(send, group)  # [N, ...]: chunk from rank j
    return torch.cat(received.unbind(0), dim=gather_dim)


@dataclass
class SequenceSplit:
    """One forward's split of ``[B, T]`` batches over a sequence group: this rank keeps positions ``[start, stop)``.

    Args:
        group: the sequence-parallel process group.
        length: ``T`` after padding to a multiple of the group size.
        pad: positions appended to the batch to make ``length`` divisible (0 when the batch already divides).
    """

    group: dist.ProcessGroup
    length: int
    pad: int = 0

    @classmethod
    def of(cls, group: dist.ProcessGroup, length: int) -> SequenceSplit:
        """The split of sequences of ``length`` tokens (padded up to a multiple of the group size)."""
        n = dist.get_world_size(group)
        return cls(group, length + (-length) % n, (-length) % n)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def start(self) -> int:
        return dist.get_rank(self.group) * (self.length // self.size)

    @property
    def stop(self) -> int:
        return self.start + self.length // self.size

    def padded(self, x: torch.Tensor | None, value: int) -> torch.Tensor | None:
        """``x [B, T]`` padded with ``value`` to ``[B, length]`` (the whole sequence, before slicing)."""
        return x if x is None or not self.pad else F.pad(x, (0, self.pad), value=value)

    def whole_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The whole sequences every rank of the group sees, padded to ``length``: ``input_ids [B, length]``, the
        padding mask ``[B, length]`` (0 on the added positions; None when there is neither padding nor any added) and
        ``position_ids [B or 1, length]`` (``0..length-1`` when none were given: each slice gets its own offset)."""
        if self.pad and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(self.length, device=input_ids.device)[None, :]
        else:
            position_ids = self.padded(position_ids, 0)
        return self.padded(input_ids, 0), self.padded(attention_mask, 0), position_ids  # type: ignore[return-value]

    def targets(self, targets: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's slice of targets already shifted over the whole sequence (``[B, T]`` -> ``[B, length/N]``)."""
        return self.local(self.padded(targets, IGNORE_INDEX))

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's slice ``[B, length/N, ...]`` of a whole-sequence ``[B, length, ...]``."""
        return None if x is None else x[:, self.start : self.stop]

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, T/N, head_dim]`` (this rank's positions) -> ``[B, heads/N, T, head_dim]`` (its heads)."""
        return exchange(x, self.group, scatter_dim=1, gather_dim=2)

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, heads/N, T, head_dim]`` -> ``[B, heads, T/N, head_dim]``: the inverse of :meth:`to_heads`."""
        return exchange(y, self.group, scatter_dim=2, gather_dim=1)


def check_divisible(sizes: dict[str, int], n: int, what: str = NETWORK_ARGS) -> None:
    """Refuse a network whose head counts do not divide by the sequence-parallel size ``n`` (each rank attends with
    ``heads/N`` heads, key/value heads included)."""
    for name, value in sizes.items():
        if value % n:
            options = [k for k in range(1, value + 1) if value % k == 0]
            raise ConfigError(
                f"{what}.{name}",
                f"{name}={value} is not divisible by sequence_parallel_size={n}: Ulysses gives each rank {name}/{n}",
                f"use a sequence_parallel_size in {options}, or a network whose {name} divides by {n}",
            )


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sequence_split: SequenceSplit | None = None,
    sequence_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with the Ulysses exchanges around it (an ``AttentionInterface`` function).

    Without ``sequence_split`` (generation, a forward outside training) it is transformers' ``sdpa`` unchanged.

    Args:
        query: ``[B, heads, T/N, head_dim]``; key, value: ``[B, kv_heads, T/N, head_dim]``.
        attention_mask: transformers' mask of this slice: ignored under a split (it only saw the slice).
        sequence_split: the split of this forward (passed through the model's ``**kwargs``).
        sequence_mask: bool ``[B or 1, 1, T, T]`` of the whole sequence (True: may attend), or None (causal).

    Returns:
        ``([B, T/N, heads, head_dim], None)``, as transformers' attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sequence_split is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    q, k, v = (sequence_split.to_heads(t) for t in (query, key, value))
    out, _ = sdpa_attention_forward(
        module, q, k, v, sequence_mask, dropout, scaling, is_causal=sequence_mask is None, **kwargs
    )  # [B, T, heads/N, head_dim]
    return sequence_split.to_sequence(out.transpose(1, 2)).transpose(1, 2), None


def register_ulysses_attention() -> None:
    """Register :func:`ulysses_attention` (and transformers' SDPA mask builder for it) under :data:`ULYSSES`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ULYSSES, ulysses_attention)
    AttentionMaskInterface.register(ULYSSES, sdpa_mask)
