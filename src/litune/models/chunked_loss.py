"""Cross-entropy through the output layer, chunk by chunk, so the ``[batch, seq, vocab]`` logits never exist at once.

The plain loss computes ``head(hidden)`` for every position (``[B, T, V]`` in the compute dtype), upcasts it to float32
for the softmax, and autograd keeps the float32 log-softmax for the backward pass: for GPT-2's 50,257-token vocabulary
at 8 x 1024 tokens that is 1.6 GB of float32 on top of 0.8 GB of bf16 logits. Here the positions are cut into chunks of
``chunk_size`` rows; each chunk's logits are computed, reduced to a summed loss, and dropped. Each chunk runs under
:func:`torch.utils.checkpoint.checkpoint`, so the backward pass recomputes that chunk's logits when it reaches it: the
peak is one chunk's logits (``chunk_size x V``), at the cost of one more forward matmul of the output layer (about
``2·N·d·V`` FLOPs, ~10% of a GPT-2-small step).

Why hand-written: PyTorch has no fused linear + cross-entropy (Liger-Kernel has Triton kernels for CUDA only), and the
output layer is called as a module, so DeepSpeed ZeRO-3's parameter gathering, DDP's gradient hooks, LoRA-wrapped heads
and ``torch.compile`` all see an ordinary module call. Gradients are autograd's own (the recomputation is exact), so
value and gradients equal the plain loss up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX, LMOutput, count_targets, cross_entropy_sum

DEFAULT_CHUNK_SIZE = 1024
"""Rows per chunk: at vocab 50,257 one chunk's float32 logits take ~0.2 GB."""


def check_chunk_size(chunk_size: int | None, field: str) -> None:
    """Raise a :class:`ConfigError` naming ``field`` unless ``chunk_size`` is ``None`` or a positive integer."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ConfigError(
            field,
            f"loss_chunk_size={chunk_size!r} must be a positive number of token rows, or null for the plain loss",
            f"use e.g. {DEFAULT_CHUNK_SIZE} (rows of logits computed at once), or null",
        )


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    # [n, d] -> [n, V] in the compute dtype, upcast per chunk only (as the plain loss does for the whole batch).
    # (Vocabulary-sharded logits under tensor parallelism take the vocab-parallel loss, without being gathered.)
    return cross_entropy_sum(head(hidden), targets)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets`` without materializing all logits.

    Equals ``F.cross_entropy(head(hidden).float().flatten(0, -2), targets.flatten(), ignore_index=-100,
    reduction=reduction)`` in value and gradients (up to float summation order).

    Args:
        hidden: ``[batch, seq, d_model]`` (or ``[rows, d_model]``) final hidden states, aligned with ``targets``.
        head: the output layer, ``[n, d_model] -> [n, vocab]`` (a module: called once per chunk, and again per chunk
            in the backward pass).
        targets: ``[batch, seq]`` (or ``[rows]``) target ids, ``IGNORE_INDEX`` where no loss is taken.
        chunk_size: rows of logits computed at once.
        reduction: ``sum``, or ``mean`` over non-ignored targets (0, not NaN, when there are none, as
            :func:`litune.models.output.token_cross_entropy`).

    Returns:
        Scalar float32 loss.
    """
    rows = hidden.reshape(-1, hidden.size(-1))  # [N, d]
    flat_targets = targets.reshape(-1)  # [N]
    needs_grad = torch.is_grad_enabled() and rows.requires_grad
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.size(0), chunk_size):
        h, t = rows[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, t)
    if reduction == "sum":
        return total
    return total / (flat_targets != IGNORE_INDEX).sum().clamp(min=1)


def use_chunked_loss(chunk_size: int | None, labels: torch.Tensor | None) -> bool:
    """Whether a network's forward takes the chunked path: a chunk size is set, labels are given and gradients are
    wanted. Evaluation (no gradient) keeps the full logits, which perplexity and accuracy metrics need."""
    return chunk_size is not None and labels is not None and torch.is_grad_enabled()


def chunked_lm_output(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int,
    **extra: object,
) -> LMOutput:
    """The :class:`LMOutput` of the chunked loss: ``loss_sum`` and ``num_targets`` as the training objective wants them
    (see :mod:`litune.objective`), the mean ``loss``, and no logits (``logits=None``: they never existed at once).

    Args:
        hidden: ``[batch, seq, d_model]`` final hidden states (after the last norm).
        head: the output layer.
        targets: ``[batch, seq]`` aligned with ``hidden`` (already shifted for a causal LM).
        chunk_size: rows of logits computed at once.
        **extra: further fields of :class:`LMOutput`.
    """
    loss_sum = chunked_cross_entropy(hidden, head, targets, chunk_size=chunk_size, reduction="sum")
    num_targets = count_targets(targets)
    loss = loss_sum / num_targets.clamp(min=1)
    return LMOutput(logits=None, loss=loss, targets=targets, loss_sum=loss_sum, num_targets=num_targets, **extra)
