"""What every litune network returns, and the one place where causal-LM labels are shifted.

Every network (the Hugging Face wrapper, the custom decoder, the encoder-decoder) implements
``forward(input_ids, attention_mask=None, labels=None, **kwargs) -> LMOutput``. ``LMOutput.targets`` are the labels
aligned position by position with ``logits``, so the LightningModule computes metrics without knowing whether the
network is causal or sequence-to-sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label value that the loss and the metrics skip (padding, prompt tokens, cross-document positions)."""


@dataclass
class LMOutput:
    """A network's output.

    Attributes:
        logits: ``[batch, seq, vocab]`` next-token scores.
        loss: scalar mean cross-entropy over the non-ignored targets, or ``None`` when no labels were given.
        targets: ``[batch, seq]`` labels aligned with ``logits`` (``IGNORE_INDEX`` where no loss is taken), or ``None``.
        past_key_values: the key/value cache for incremental decoding, when the network keeps one.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    past_key_values: object | None = None


def causal_targets(labels: torch.Tensor) -> torch.Tensor:
    """Shift causal-LM labels so that position ``t`` holds the token to predict from position ``t``.

    This is the only place in litune where the causal shift happens.

    Args:
        labels: ``[batch, seq]`` token ids, ``IGNORE_INDEX`` where no loss is wanted.

    Returns:
        ``[batch, seq]``: ``labels[:, 1:]`` with ``IGNORE_INDEX`` appended at the last position.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE_INDEX``.

    Args:
        logits: ``[batch, seq, vocab]``.
        targets: ``[batch, seq]`` aligned with ``logits``.

    Returns:
        Scalar loss in float32 (logits are upcast so bf16 training keeps an accurate loss).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def causal_lm_output(logits: torch.Tensor, labels: torch.Tensor | None, **extra: object) -> LMOutput:
    """Build the :class:`LMOutput` of a causal LM: shift the labels, take the loss.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` unshifted labels (usually ``input_ids`` with ``IGNORE_INDEX`` on padding), or None.
        **extra: further fields of :class:`LMOutput` (e.g. ``past_key_values``).
    """
    if labels is None:
        return LMOutput(logits=logits, **extra)
    targets = causal_targets(labels)
    return LMOutput(logits=logits, loss=token_cross_entropy(logits, targets), targets=targets, **extra)
