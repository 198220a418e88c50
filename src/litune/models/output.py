"""What every litune network returns, and the one place where causal-LM labels are shifted.

Every network (the Hugging Face wrapper, the custom decoder, the encoder-decoder) implements
``forward(input_ids, attention_mask=None, labels=None, **kwargs) -> LMOutput``. ``LMOutput.targets`` are the labels
aligned position by position with ``logits``, so the LightningModule computes metrics without knowing whether the
network is causal or sequence-to-sequence.

The loss contract: a network reports the *sum* of its token losses (``loss_sum``) and how many target tokens it
summed over (``num_targets``). The training objective (:mod:`litune.objective`) divides the sums of a whole optimizer
step (all micro-batches, all ranks) by that step's target count, so every target token weighs the same whatever the
micro-batch size, accumulation or world size. ``loss`` (the micro-batch's own mean) is kept for evaluation and users.
A loss implementation (e.g. a chunked or fused cross-entropy) plugs in by filling ``loss_sum`` and ``num_targets``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
"""Label value that the loss and the metrics skip (padding, prompt tokens, cross-document positions)."""


@dataclass
class LMOutput:
    """A network's output.

    Attributes:
        logits: ``[batch, seq, vocab]`` next-token scores; ``None`` when a network took its training loss chunk by
            chunk (``loss_chunk_size``, :mod:`litune.models.chunked_loss`) and never held all logits at once.
        loss: scalar float32 mean cross-entropy over the non-ignored targets (``loss_sum / max(num_targets, 1)``, so
            0, never NaN, when there is no target), or ``None`` when no labels were given.
        targets: ``[batch, seq]`` labels aligned with ``logits`` (``IGNORE_INDEX`` where no loss is taken), or ``None``.
        past_key_values: the key/value cache for incremental decoding, when the network keeps one.
        loss_sum: scalar float32 sum of the token cross-entropies (what the training objective uses), or ``None``.
        num_targets: scalar int64 count of target tokens (positions whose target is not ``IGNORE_INDEX``), or ``None``.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    past_key_values: object | None = None
    loss_sum: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None


def causal_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift causal-LM labels so that position ``t`` holds the token to predict from position ``t``.

    This is the only place in litune where the causal shift happens.

    Args:
        labels: ``[batch, seq]`` token ids, ``IGNORE_INDEX`` where no loss is wanted.

    Returns:
        ``[batch, seq]``: ``labels[:, 1:]`` with ``IGNORE_INDEX`` appended at the last position.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    """Number of positions whose target is not ``IGNORE_INDEX``.

    Args:
        targets: ``[batch, seq]`` targets aligned with the logits (already shifted for a causal LM).

    Returns:
        Scalar int64 tensor on ``targets``' device.
    """
    return (targets != IGNORE_INDEX).sum()


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the positions whose target is not ``IGNORE_INDEX``, and their count.

    Args:
        logits: ``[batch, seq, vocab]``.
        targets: ``[batch, seq]`` aligned with ``logits``.

    Returns:
        ``(loss_sum, num_targets)``: a float32 scalar (logits are upcast so bf16 training keeps an accurate loss; 0
        with a zero gradient when nothing is targeted) and an int64 scalar.
    """
    return cross_entropy_sum(logits, targets), count_targets(targets)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 summed cross-entropy of ``logits [..., vocab]`` against ``targets [...]``, skipping ``IGNORE_INDEX``.

    Logits sharded on the vocabulary by tensor parallelism (a DTensor) take the vocab-parallel loss without being
    gathered (:func:`litune.models.tensor_parallel.vocab_parallel_cross_entropy_sum`).
    """
    if isinstance(logits, DTensor):
        from litune.models.tensor_parallel import vocab_parallel_cross_entropy_sum

        return vocab_parallel_cross_entropy_sum(logits, targets, IGNORE_INDEX)
    flat = logits.reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE_INDEX`` (0, not NaN, when there is none).

    Args:
        logits: ``[batch, seq, vocab]``.
        targets: ``[batch, seq]`` aligned with ``logits``.

    Returns:
        Scalar loss in float32.
    """
    loss_sum, num_targets = token_cross_entropy_sum(logits, targets)
    return loss_sum / num_targets.clamp(min=1)


def lm_output(logits: torch.Tensor, targets: torch.Tensor | None, **extra: object) -> LMOutput:
    """Build an :class:`LMOutput` from logits and already aligned targets: sum, count and mean of the token losses.

    Args:
        logits: ``[batch, seq, vocab]``.
        targets: ``[batch, seq]`` aligned with ``logits``, or ``None`` (no loss).
        **extra: further fields of :class:`LMOutput` (e.g. ``past_key_values``).
    """
    if targets is None:
        return LMOutput(logits=logits.detach().full_tensor() if isinstance(logits, DTensor) else logits, **extra)
    loss_sum, num_targets = token_cross_entropy_sum(logits, targets)
    loss = loss_sum / num_targets.clamp(min=1)
    if isinstance(logits, DTensor):  # vocabulary-parallel: metrics and callbacks read whole logits
        logits = logits.detach().full_tensor()
    return LMOutput(logits=logits, loss=loss, targets=targets, loss_sum=loss_sum, num_targets=num_targets, **extra)


def causal_lm_output(logits: torch.Tensor, labels: torch.Tensor | None, **extra: object) -> LMOutput:
    """Build the :class:`LMOutput` of a causal LM: shift the labels, take the loss.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` unshifted labels (usually ``input_ids`` with ``IGNORE_INDEX`` on padding), or None.
        **extra: further fields of :class:`LMOutput` (e.g. ``past_key_values``).
    """
    return lm_output(logits, None if labels is None else causal_targets(labels), **extra)
