"""The training objective: every target token of an optimizer step weighs the same, whatever the topology.

The loss of one optimizer step is

    L = (sum of the token losses over all micro-batches of the step and all ranks) / N

with ``N`` the number of target tokens of the step (all micro-batches, all ranks). So the same global batch gives the
same update on 1 process with micro-batch 8, on 1 process with micro-batch 1 and 8 accumulation steps, or on 8 ranks;
a micro-batch with 3 target tokens weighs 3 tokens, not as much as one with 300 (the "mean of means" that
``transformers`` fixed in 2024, transformers#34191, and that Lightning still has, Lightning#20350).

How it is reached with Lightning's machinery: every micro-batch backpropagates

    loss_sum_i * D / N

where ``D`` (:func:`gradient_divisor`) is what Lightning and the strategy divide the returned loss's gradient by:
Lightning divides by ``accumulate_grad_batches``, DDP (and FSDP) average over the data-parallel ranks, and DeepSpeed's
engine divides by its own ``gradient_accumulation_steps`` once more and averages over ranks. The gradient that
reaches the optimizer (and gradient clipping, inside DeepSpeed's engine too) is then exactly ``grad L``.

``N`` must be known before the first backward of the step, so the train dataloader is wrapped in a
:class:`LookAhead`: at the first micro-batch of a step, the LightningModule asks it for the target count of the
micro-batches still to come in the step (read ahead from the loader, a few tensors of token ids), and all-reduces it
over the ranks: one scalar collective per optimizer step. Lightning has no hook that shows the accumulation window
(an open pull request adds a peekable iterator, Lightning#21386), hence the wrapper, installed by
:func:`install_look_ahead` on the strategy's ``process_dataloader`` so that it works with every strategy.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from litune.errors import ConfigError
from litune.models.output import causal_targets, count_targets
from litune.strategies.batch import loss_replicas
from litune.strategies.descriptor import describe

BATCH_TAG = "_litune_position"
"""Batch key under which :class:`LookAhead` tags every training batch with ``(pass, index)`` (popped before forward)."""


def targets_counter(network: torch.nn.Module) -> Callable[[Any], int]:
    """``batch -> number of target tokens`` for ``network``, computed on the host from the batch's ``labels``.

    The network decides how labels become targets: ``network.targets_from_labels`` when it has one (an encoder-decoder
    does not shift), otherwise the causal shift of :func:`~litune.models.output.causal_targets`. The LightningModule
    checks, once per step, that the counts agree with the ``num_targets`` the network reports.
    """
    to_targets = getattr(network, "targets_from_labels", causal_targets)

    def count(batch: Any) -> int:
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if labels is None:
            return 0
        return int(count_targets(to_targets(labels)))

    return count


class LookAhead:
    """Wraps the train dataloader: yields its batches tagged with their position, and counts targets ahead of them.

    Everything else (``len``, ``sampler``, ``batch_sampler``, ``dataset``...) is the wrapped loader's, so Lightning's
    epoch handling (``set_epoch``) and the data modules' resumable samplers work unchanged.

    Args:
        loader: the training dataloader (or any iterable of batches).
        count: ``batch -> target tokens`` (see :func:`targets_counter`).
    """

    def __init__(self, loader: Iterable, count: Callable[[Any], int]) -> None:
        self.loader = loader
        self.count = count
        self._pass = 0
        self._iterator: Iterator | None = None
        self._ahead: deque = deque()
        self._counts: dict[int, int] = {}
        self._pulled = 0
        self.keep_batches = False  # also hold the batches of the current step (online RL generates for all of them)
        self._kept: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError for a stream, as for the loader itself

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        self._pass += 1
        self._iterator = iter(self.loader)
        self._ahead.clear()
        self._counts.clear()
        self._kept.clear()
        self._pulled = 0
        return self._batches(self._pass)

    def _pull(self) -> bool:
        """Read one more batch from the loader into the look-ahead buffer; False when the loader is exhausted."""
        assert self._iterator is not None
        try:
            batch = next(self._iterator)
        except StopIteration:
            return False
        self._counts[self._pulled] = self.count(batch)
        if self.keep_batches:
            self._kept[self._pulled] = batch
        self._ahead.append(batch)
        self._pulled += 1
        return True

    def _batches(self, this_pass: int) -> Iterator:
        index = 0
        while self._pass == this_pass:
            if not self._ahead and not self._pull():
                return
            batch = self._ahead.popleft()
            yield {**batch, BATCH_TAG: (this_pass, index)} if isinstance(batch, dict) else batch
            index += 1

    def targets_ahead(self, tag: tuple[int, int], length: int) -> int:
        """Target tokens of the ``length`` batches from the tagged one on (fewer if the loader ends before).

        Args:
            tag: the ``(pass, index)`` tag of a batch this wrapper yielded.
            length: how many batches, the tagged one included.
        """
        this_pass, start = tag
        if this_pass != self._pass:
            raise RuntimeError("a training batch from an earlier pass over the train dataloader reached training_step")
        while self._pulled < start + length and self._pull():
            pass
        for old in [i for i in self._counts if i < start]:  # batches already trained on
            del self._counts[old]
        return sum(self._counts.get(i, 0) for i in range(start, start + length))

    def batches_ahead(self, tag: tuple[int, int], length: int) -> list[Any]:
        """The host batches of the ``length`` micro-batches from the tagged one on (``keep_batches`` must be set
        before the pass starts): the step's prompts, for an objective that generates before the step's first
        backward. Batches before the tagged one are forgotten."""
        self.targets_ahead(tag, length)
        start = tag[1]
        for old in [i for i in self._kept if i < start]:
            del self._kept[old]
        return [self._kept[i] for i in range(start, start + length) if i in self._kept]


def check_window_has_targets(local_targets: int, batch_idx: int, length: int) -> None:
    """Refuse a rank's share of an optimizer step (its ``length`` micro-batches from ``batch_idx``) that has no target
    token at all: the step would train this rank on nothing while the loss looks normal. One micro-batch without
    targets inside a step that has some is fine (it adds zero loss and zero gradient).

    Raises:
        ConfigError: naming the likely causes (chat rows without an assistant turn, a template whose assistant text is
            not found, responses cut off by ``block_size``).
    """
    if local_targets == 0:
        raise ConfigError(
            "data",
            f"the training batches {batch_idx}..{batch_idx + length - 1} of this step have no trainable target token "
            "(every label is -100): the step would train on nothing while the loss looks normal",
            "check that the chat data has assistant turns and its template renders them (see data.template), and "
            "that data.block_size keeps the responses",
        )


def is_deepspeed(trainer: pl.Trainer) -> bool:
    """Whether DeepSpeed's engine runs the step (it divides the loss by its accumulation once more)."""
    return describe(trainer.strategy).deepspeed


def gradient_divisor(trainer: pl.Trainer) -> int:
    """What Lightning and the strategy divide the gradient of ``training_step``'s returned loss by.

    * Lightning divides the returned loss by ``accumulate_grad_batches`` (all strategies, DeepSpeed included);
    * DDP, FSDP and DeepSpeed average gradients over the data-parallel ranks (``world_size``: litune's strategies are
      all pure data parallel);
    * DeepSpeed's ``engine.backward`` divides by its ``gradient_accumulation_steps`` once more (Lightning sets it to
      ``accumulate_grad_batches``);
    * under tensor parallelism, FSDP2 averages over the data-parallel ranks only (a tensor-parallel group computes
      one gradient together), and ``N``, summed over all ranks, counts each row once per group member: the divisor
      uses the data-parallel size, and :func:`step_targets` divides the count by the group size;
    * under sequence parallelism, FSDP2 averages over every rank (each sequence rank's gradient is its slice's
      share, a term of the sum like another data-parallel rank's), so the divisor counts all ranks.
    """
    divisor = trainer.accumulate_grad_batches * (trainer.world_size // loss_replicas(trainer))
    if is_deepspeed(trainer):
        divisor *= trainer.model.gradient_accumulation_steps()  # trainer.model is the DeepSpeedEngine
    return divisor


def step_objective(loss_sum: torch.Tensor, step_targets: torch.Tensor | int, divisor: int) -> torch.Tensor:
    """The loss one micro-batch returns to Lightning so that the optimizer sees ``grad(sum of losses / N)``.

    Args:
        loss_sum: scalar, this micro-batch's summed token loss.
        step_targets: scalar, ``N``: the target tokens of the whole optimizer step over all ranks (a device tensor,
            or a host number on one process).
        divisor: :func:`gradient_divisor`.

    Returns:
        ``loss_sum * divisor / max(N, 1)`` (0 with a zero gradient for a micro-batch without targets), computed as
        ``loss_sum * (reciprocal(N) * divisor)`` in ``loss_sum``'s dtype whether ``N`` is a tensor or a host number:
        the same bits either way.
    """
    if isinstance(step_targets, int) and loss_sum.dtype == torch.float32:
        # What the tensor expression below computes, in float32 on the host (torch's `divisor / t` is
        # `t.reciprocal() * divisor`): no 0-d tensor operations on the step's path.
        scale = np.float32(divisor) * (np.float32(1.0) / np.float32(max(step_targets, 1)))
        return loss_sum * float(scale)
    step_targets = torch.as_tensor(step_targets, device=loss_sum.device)
    return loss_sum * (divisor / step_targets.clamp(min=1).to(loss_sum.dtype))


def steps_left_in_window(trainer: pl.Trainer, batch_idx: int) -> int:
    """Micro-batches from ``batch_idx`` (included) to the end of the current optimizer step.

    Lightning steps after every ``accumulate_grad_batches`` batches of the epoch and at the epoch's last batch;
    DeepSpeed steps at its own accumulation boundary (``micro_steps``), which may fall in the next epoch.
    """
    remaining = trainer.num_training_batches - batch_idx
    if is_deepspeed(trainer):
        engine = trainer.model
        gas = engine.gradient_accumulation_steps()
        length = gas - engine.micro_steps % gas
        if length > remaining:
            warnings.warn(
                f"DeepSpeed accumulates {gas} micro-batches per step across the end of the epoch (the epoch has "
                f"{trainer.num_training_batches} batches): that step's loss is weighted per epoch part, not per token. "
                "Make the epoch a multiple of the accumulation (limit_train_batches) for an exact objective.",
                stacklevel=2,
            )
    else:
        acc = trainer.accumulate_grad_batches
        length = acc - batch_idx % acc
    return int(min(length, remaining)) if math.isfinite(remaining) else length


def install_look_ahead(trainer: pl.Trainer, count: Callable[[Any], int]) -> None:
    """Make the strategy wrap every train dataloader in a :class:`LookAhead` (after Lightning added its sampler).

    Idempotent; undone by :func:`uninstall_look_ahead`. Evaluation dataloaders are left alone.
    """
    strategy = trainer.strategy
    if getattr(strategy, "_litune_look_ahead", None) is not None:
        strategy._litune_look_ahead_count = count
        return
    original = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = original(dataloader)
        if trainer.training and not trainer.sanity_checking and not isinstance(dataloader, LookAhead):
            dataloader = LookAhead(dataloader, strategy._litune_look_ahead_count)  # type: ignore[arg-type]
        return dataloader

    strategy._litune_look_ahead = original
    strategy._litune_look_ahead_count = count
    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]


def uninstall_look_ahead(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    original = getattr(strategy, "_litune_look_ahead", None)
    if original is not None:
        strategy.process_dataloader = original  # type: ignore[method-assign]
        strategy._litune_look_ahead = None


def train_look_ahead(trainer: pl.Trainer) -> LookAhead | None:
    """The :class:`LookAhead` wrapping the current train dataloader, if any."""
    loader = trainer.train_dataloader  # the processed loader (after process_dataloader), as the fit loop iterates it
    return loader if isinstance(loader, LookAhead) else None
