"""Per-token and per-sequence log-probabilities of responses, chunk by chunk through the output layer.

Preference losses (DPO and its family) and policy-gradient methods (GRPO) need ``log pi(y_t | x, y_<t)`` of the given
tokens, not a mean cross-entropy. Computed plainly that is ``log_softmax(head(hidden).float())``: a float32
``[batch, seq, vocab]`` tensor kept for the backward pass (1.6 GB for GPT-2's vocabulary at 8 x 1024 tokens).
:func:`token_logps` computes the logits ``chunk_size`` rows at a time under activation checkpointing, as
:mod:`litune.models.chunked_loss` does for the SFT loss, so only one chunk's logits exist at once; value and gradients
are autograd's own.

Every litune network works: those with ``output_features`` (``HFCausalLM``, ``DecoderLM``, ``Seq2SeqLM``) give their
final hidden states and output layer, and the chunked path runs; any other network falls back to its full logits.

Reusable functions (GRPO builds on them): :func:`token_logps`, :func:`sequence_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from litune.models.output import IGNORE_INDEX

NETWORK_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "decoder_input_ids")
"""Batch keys a network's forward takes (the rest of a preference batch is for the loss)."""


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # [n, d] -> [n, V] float32 logits -> [n] log-prob of each target (0 where the target is IGNORE_INDEX).
    return -F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def chunked_token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``log_softmax(head(hidden))`` at ``targets``, ``chunk_size`` rows of logits at a time.

    Args:
        hidden: ``[B, T, d]`` final hidden states aligned with ``targets``.
        head: the output layer ``[n, d] -> [n, V]``.
        targets: ``[B, T]`` target ids, ``IGNORE_INDEX`` where no log-prob is wanted.
        chunk_size: rows of logits computed at once.

    Returns:
        ``[B, T]`` float32 log-probs, 0 at ignored positions.
    """
    rows, flat = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    n = rows.size(0)
    chunks = _chunks_on_every_rank(head, -(-n // chunk_size), rows.device)
    if (chunks - 1) * chunk_size >= n:  # this rank has fewer rows than another: ignored zero rows fill its chunks
        pad = (chunks - 1) * chunk_size + 1 - n
        rows = torch.cat([rows, rows.new_zeros(pad, rows.size(1))])
        flat = torch.cat([flat, flat.new_full((pad,), IGNORE_INDEX)])
    needs_grad = torch.is_grad_enabled() and rows.requires_grad
    parts = []
    for start in range(0, rows.size(0), chunk_size):
        h, t = rows[start : start + chunk_size], flat[start : start + chunk_size]
        parts.append(
            checkpoint(_chunk_logps, head, h, t, use_reentrant=False) if needs_grad else _chunk_logps(head, h, t)
        )
    return torch.cat(parts)[:n].view_as(targets)


def _chunks_on_every_rank(head: nn.Module, chunks: int, device: torch.device) -> int:
    """The number of head calls, the same on every rank under DeepSpeed ZeRO-3: each call of a partitioned head
    all-gathers its weight (forward, and again in the checkpointed recomputation), so ranks whose padded preference
    batches hold different numbers of rows would issue different collectives and hang. Elsewhere: ``chunks``."""
    if not (torch.distributed.is_initialized() and any(hasattr(p, "ds_id") for p in head.parameters())):
        return chunks
    most = torch.tensor([chunks], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def token_logps(
    network: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the batch's target tokens under ``network``.

    Args:
        network: a litune network (``forward(input_ids, attention_mask=None, labels=None, ...) -> LMOutput``).
        batch: ``input_ids`` ``[B, T]``, ``labels`` ``[B, T]`` (unshifted, ``-100`` where no log-prob is wanted),
            optional ``attention_mask``/``position_ids``; other keys are ignored.
        chunk_size: rows of logits at once; ``None``: the plain path (full ``[B, T, V]`` logits).

    Returns:
        ``(logps [B, T] float32, mask [B, T] bool)``, aligned with the network's targets (shifted for a causal LM);
        ``logps`` is 0 where ``mask`` is False.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(network, FSDPModule):
        return _fsdp_method(network)(batch, chunk_size)
    return _token_logps(network, batch, chunk_size)


def _fsdp_method(network: nn.Module):
    """``network``'s :func:`token_logps` as a method FSDP2 treats like ``forward``. The chunked path runs
    ``output_features`` and then the output layer, outside the network's forward, so FSDP2's root hooks would never
    gather the root's parameters (embeddings, final norm, head) nor reduce their gradients; registered once on the
    instance with ``register_fsdp_forward_method``, the whole computation runs between the root's pre- and
    post-forward hooks."""
    method = getattr(network, "_litune_token_logps", None)
    if method is None:
        import types

        from torch.distributed.fsdp import register_fsdp_forward_method

        network._litune_token_logps = types.MethodType(_token_logps, network)
        register_fsdp_forward_method(network, "_litune_token_logps")
        method = network._litune_token_logps
    return method


def _token_logps(
    network: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k in NETWORK_INPUTS}
    features = getattr(network, "output_features", None)
    if chunk_size is not None and callable(features):
        hidden, head, targets = features(**inputs)
        logps = chunked_token_logps(hidden, head, targets, chunk_size)
    else:
        out = network(**inputs)  # the network's own forward: full logits [B, T, V] and the aligned targets
        if out.logits is None:
            raise RuntimeError("the network took its loss chunk by chunk and kept no logits: set logps_chunk_size")
        logits, targets = out.logits, out.targets
        logps = -F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
    return logps, targets != IGNORE_INDEX


@dataclass
class SequenceLogps:
    """Response log-probs per sequence.

    Attributes:
        logps: ``[B]`` float32 sums of the response tokens' log-probs.
        tokens: ``[B]`` int64 response token counts.
    """

    logps: torch.Tensor
    tokens: torch.Tensor


def sequence_logps(network: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = 1024) -> SequenceLogps:
    """Summed log-probs of each row's response (its non-ignored targets); see :func:`token_logps`."""
    logps, mask = token_logps(network, batch, chunk_size)
    return SequenceLogps(logps.sum(-1), mask.sum(-1))
