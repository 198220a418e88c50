"""The preference objective: DPO and its family as the training objective of :class:`litune.module.LitLM`.

Set ``model.preference`` (``configs/dpo.yaml``) and :class:`~litune.module.LitLM` trains any litune network (HF causal
LMs, litune's decoder, the encoder-decoder) on preference batches (:mod:`litune.preference.data`) with this objective
instead of the SFT loss. One optimizer step minimises

    L = (sum of the per-pair losses of all micro-batches and ranks) / P
        + nll_weight * (sum of the chosen responses' token NLLs, all micro-batches and ranks) / C

with ``P`` the step's pairs (KTO: examples) and ``C`` its chosen response tokens (KTO: desirable ones), both counted
ahead of the step's first backward by :class:`litune.objective.LookAhead` and all-reduced, exactly as the SFT
objective counts target tokens. So the same global batch gives the same update on 1 process, with accumulation, or on
several ranks. Per-sequence log-probs come chunk by chunk through the output layer (:mod:`litune.preference.logps`).

A batch holds ``2P`` rows, the ``P`` chosen responses first, then the ``P`` rejected ones in the same order (KTO: one
row per example and a ``desirable`` flag, plus ``kl_*`` rows pairing each prompt with another example's response for
the reference point ``z0``). Metrics (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracy``,
``rewards/margin``, ``logps/chosen``, ``logps/rejected``, ``nll``, ``loss``) are sums over the step's micro-batches
and ranks divided by the step's pair count: exact, not means of means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from litune.errors import ConfigError
from litune.lightning_private import should_update_logs
from litune.models.hf import builds_later
from litune.models.output import IGNORE_INDEX, causal_targets
from litune.objective import BATCH_TAG, gradient_divisor, steps_left_in_window, train_look_ahead
from litune.preference.logps import sequence_logps
from litune.preference.losses import FIELD, REFERENCE_FREE, PreferenceLoss, bradley_terry, kto, pair_terms
from litune.preference.reference import (
    ReferenceLogps,
    adapters_disabled,
    disable_dropout,
    frozen_copy,
    is_partitioned,
    shard_reference,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from litune.module import LitLM

ReferenceMode = Literal["auto", "copy", "adapters", "precomputed", "none"]
REF_KEY = "ref_logps"
"""Batch key of precomputed reference log-probs, ``[rows]`` float32 aligned with the batch's rows."""

# Order of the per-step sums (one all-reduce per logging step).
_STATS = ("pair_loss", "nll", "chosen_reward", "rejected_reward", "correct", "margin", "chosen_logps",
          "rejected_logps", "units", "nll_tokens", "kl")  # fmt: skip


@dataclass(frozen=True)
class Preference(PreferenceLoss):
    """``model.preference``: train on preference data with this loss (``configs/dpo.yaml``, ``configs/preference/``).

    The loss fields (``loss``, ``beta``, ``label_smoothing``, ``gamma``, ``nll_weight``, ``desirable_weight``,
    ``undesirable_weight``, ``margin``, ``center_rewards_coefficient``) and their checks are
    :class:`litune.preference.losses.PreferenceLoss`'s; this class adds how the reference and the log-probs are made.

    Args:
        reference: ``auto`` (``adapters`` when the model trains adapters, else ``copy``; ``none`` for SimPO/ORPO),
            ``copy`` (a frozen copy of the initial policy), ``adapters`` (the policy with adapters disabled),
            ``precomputed`` (one pass over the data before training, cached beside the tokenized data) or ``none``.
        logps_chunk_size: rows of logits computed at once for the per-sequence log-probs (no float32
            ``[batch, seq, vocab]`` tensor); ``null`` for the plain path.
        disable_dropout: set the policy's dropout to 0 (as TRL does), so policy and reference agree at the start.
    """

    reference: ReferenceMode = "auto"
    logps_chunk_size: int | None = 1024
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()  # the loss settings
        if self.reference not in ("auto", "copy", "adapters", "precomputed", "none"):
            raise ConfigError(
                f"{FIELD}.reference", f"{self.reference!r} is not a reference", "use auto, copy, adapters, precomputed"
            )
        if self.loss in REFERENCE_FREE and self.reference not in ("auto", "none"):
            raise ConfigError(
                f"{FIELD}.reference",
                f"the {self.loss} loss is reference-free, but reference={self.reference!r} was given",
                "remove model.preference.reference (or set it to none), or use a loss with a reference, e.g. sigmoid",
            )
        if self.loss not in REFERENCE_FREE and self.reference == "none":
            raise ConfigError(
                f"{FIELD}.reference",
                f"the {self.loss} loss needs a reference model",
                "set reference: auto (or copy, adapters, precomputed), or use a reference-free loss (simpo, orpo)",
            )
        chunk = self.logps_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"{FIELD}.logps_chunk_size", f"{chunk!r} is not a positive int", "use e.g. 1024, or null")

    def reference_mode(self, has_adapters: bool) -> str:
        """The resolved reference: ``copy``, ``adapters``, ``precomputed`` or ``none``."""
        if self.loss in REFERENCE_FREE:
            return "none"
        if self.reference == "auto":
            return "adapters" if has_adapters else "copy"
        if self.reference == "adapters" and not has_adapters:
            raise ConfigError(
                f"{FIELD}.reference",
                "reference=adapters needs a model that trains adapters, but model.adapters is not set",
                "add adapters (configs/peft/lora.yaml) or use reference: copy",
            )
        return self.reference


def _targets(network: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    return getattr(network, "targets_from_labels", causal_targets)(labels)


def units_counter(network: nn.Module, unpaired: bool):
    """``batch -> tensor([units, nll targets, all targets])`` on the host: pairs (KTO: examples), chosen response
    tokens (KTO: desirable ones) and all response tokens of a preference batch."""

    def count(batch: Any) -> torch.Tensor:
        labels = batch["labels"]
        mask = _targets(network, labels) != IGNORE_INDEX
        if unpaired:
            units, nll_rows = labels.size(0), batch["desirable"].bool()
        else:
            units = labels.size(0) // 2
            nll_rows = torch.arange(labels.size(0)) < units
        return torch.tensor([units, int(mask[nll_rows].sum()), int(mask.sum())], dtype=torch.long)

    return count


class PreferenceObjective:
    """The preference training and evaluation steps of a :class:`~litune.module.LitLM` (see the module docstring).

    Args:
        config: ``model.preference``.
        network: the policy (its initial weights become the ``copy`` reference).
        has_adapters: whether the policy trains adapters.
    """

    def __init__(self, config: Preference, network: nn.Module, has_adapters: bool) -> None:
        self.config = config
        self.loss: PreferenceLoss = config
        self.mode = config.reference_mode(has_adapters)
        self.reference: nn.Module | None = None
        self.reference_fingerprint: str | None = None
        self._sharded_reference: nn.Module | None = None  # ZeRO-3 engine / FSDP2 module over the copy (shard_reference)
        self._step_counts = torch.zeros(3, dtype=torch.long)
        self._window_stats: torch.Tensor | None = None
        self._eval_stats: torch.Tensor | None = None
        if not builds_later(network):  # a DeferredHFCausalLM's reference is made in configure_model
            self.prepare_reference(network)

    def prepare_reference(self, network: nn.Module) -> None:
        """Once the network is built: disable its dropout (``disable_dropout``) and make the frozen copy (``copy``
        and ``precomputed``) of it as it is now, before any training."""
        if self.config.disable_dropout:
            disable_dropout(network)
        if self.mode in ("copy", "precomputed") and self.reference is None:
            if is_partitioned(network):
                raise ConfigError(
                    f"{FIELD}.reference",
                    f"reference={self.config.reference} ({self.mode}) copies the policy, but its weights were loaded "
                    "straight into shards (a deferred network under ZeRO-3/FSDP2): no rank holds a whole copy to take",
                    "build the network whole (litune.models.HFCausalLM, not DeferredHFCausalLM), train adapters "
                    "(reference: adapters), or use a reference-free loss (simpo, orpo)",
                )
            self.reference = frozen_copy(network)

    def shard_reference(self, strategy: object) -> None:
        """Once the strategy has partitioned the policy (``LitLM.on_fit_start``, on every rank): shard the ``copy``
        reference like it under ZeRO-3 or FSDP2 (:func:`litune.preference.reference.shard_reference`); idempotent."""
        if self.mode != "copy" or self.reference is None or self._sharded_reference is not None:
            return
        # None under a strategy that does not shard the policy: the copy stays whole (_reference_on moves it).
        self._sharded_reference = shard_reference(
            ReferenceLogps(self.reference, self.config.logps_chunk_size), strategy
        )

    # ------------------------------------------------------------------ log-probs
    def _reference_on(self, like: nn.Module) -> nn.Module:
        """The frozen copy on the policy's device and floating dtype (moved once; it is no registered child)."""
        assert self.reference is not None
        param = next(like.parameters())
        ref_param = next(self.reference.parameters())
        if ref_param.device != param.device or (param.is_floating_point() and ref_param.dtype != param.dtype):
            self.reference.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
        return self.reference

    def reference_logps(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``[rows]`` reference log-probs of the batch's responses (``None`` for a reference-free loss)."""
        if self.mode == "none":
            return None
        if REF_KEY in batch:
            return batch[REF_KEY].float()
        chunk = self.config.logps_chunk_size
        with torch.no_grad():
            if self.mode == "adapters":
                with adapters_disabled(network):
                    return sequence_logps(network, batch, chunk).logps
            if self._sharded_reference is not None:  # a collective: every rank runs it on its own rows
                return self._sharded_reference(batch).float()
            if self.reference is None:
                raise RuntimeError("reference=precomputed, but the batch has no precomputed reference log-probs")
            return sequence_logps(self._reference_on(network), batch, chunk).logps

    def precompute_fn(self, network: nn.Module, device: torch.device):
        """``batch -> [rows]`` reference log-probs on ``device``, for the data module's one pass (``precomputed``)."""
        assert self.reference is not None
        self.reference.to(device)
        chunk = self.config.logps_chunk_size

        def compute(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            moved = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                return sequence_logps(self.reference, moved, chunk).logps.float().cpu()

        return compute

    # ------------------------------------------------------------------ one micro-batch
    def terms(self, network: nn.Module, batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
        """Loss sums and detached statistics of one micro-batch.

        Returns:
            ``(pair_loss_sum, nll_sum, stats)``: scalar sums of the per-pair (per-example) losses and of the chosen
            (desirable) token NLLs, and ``[len(_STATS)]`` float64 detached sums for the metrics.
        """
        if self.loss.type == "bradley_terry":
            return self._reward_terms(network, inputs)
        ref = self.reference_logps(network, batch)
        policy = sequence_logps(network, inputs, self.config.logps_chunk_size)
        logps, tokens = policy.logps, policy.tokens
        if self.loss.unpaired:
            return self._kto_terms(network, batch, logps, tokens, ref)
        p = logps.size(0) // 2
        chosen, rejected = logps[:p], logps[p:]
        pt = pair_terms(
            self.loss, chosen, rejected, tokens[:p], tokens[p:], *((ref[:p], ref[p:]) if ref is not None else ())
        )
        nll_sum = -chosen.sum()
        margin = pt.chosen_rewards - pt.rejected_rewards
        stats = torch.stack([
            pt.losses.detach().sum(), nll_sum.detach(), pt.chosen_rewards.sum(), pt.rejected_rewards.sum(),
            (margin > 0).sum(), margin.sum(), chosen.detach().sum(), rejected.detach().sum(),
            torch.tensor(p, device=logps.device), tokens[:p].sum(), torch.zeros((), device=logps.device),
        ]).double()  # fmt: skip
        return pt.losses.sum(), nll_sum, stats

    def _reward_terms(self, network: nn.Module, inputs: dict[str, torch.Tensor]):
        """A reward model's pairs: scores at each row's last real token, the Bradley-Terry loss."""
        scores = network(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}).scores
        p = scores.size(0) // 2
        chosen, rejected = scores[:p], scores[p:]
        losses = bradley_terry(chosen, rejected, self.loss.margin, self.loss.center_rewards_coefficient)
        margin = (chosen - rejected).detach()
        zero = torch.zeros((), device=scores.device)
        stats = torch.stack([
            losses.detach().sum(), zero, chosen.detach().sum(), rejected.detach().sum(), (margin > 0).sum(),
            margin.sum(), zero, zero, torch.tensor(p, device=scores.device), zero, zero,
        ]).double()  # fmt: skip
        return losses.sum(), zero, stats

    def _kto_terms(self, network, batch, logps, tokens, ref):
        desirable = batch["desirable"].bool()
        ratios = logps - ref
        kl = self._kto_reference_point(network, batch)
        losses = kto(ratios, desirable, kl, self.loss.beta, self.loss.desirable_weight, self.loss.undesirable_weight)
        rewards = self.loss.beta * ratios.detach()
        d = desirable.to(rewards.dtype)
        nll_sum = -(logps * d).sum()
        device = logps.device
        stats = torch.stack([
            losses.detach().sum(), nll_sum.detach(), (rewards * d).sum(), (rewards * (1 - d)).sum(),
            ((rewards > kl * self.loss.beta) == desirable).sum(), torch.zeros((), device=device),
            (logps.detach() * d).sum(), (logps.detach() * (1 - d)).sum(), torch.tensor(logps.size(0), device=device),
            tokens[desirable].sum(), kl.detach() * logps.size(0),
        ]).double()  # fmt: skip
        return losses.sum(), nll_sum, stats

    def _kto_reference_point(self, network: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """KTO's ``z0``: the detached mean log-ratio of the micro-batch's mismatched rows (``kl_*`` keys), clamped at 0.

        As in TRL and the paper, the estimate comes from the micro-batch, so KTO's update depends on the micro-batch
        split through ``z0`` (every other term is exact across accumulation and ranks).
        """
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad():
            policy = sequence_logps(network, kl_batch, self.config.logps_chunk_size).logps
            ref_key = {REF_KEY: batch["kl_" + REF_KEY]} if "kl_" + REF_KEY in batch else {}
            ref = self.reference_logps(network, {**kl_batch, **ref_key})
        return (policy - ref).mean().clamp(min=0)

    # ------------------------------------------------------------------ training
    def training_step(self, module: LitLM, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One micro-batch's share of the step objective (see the module docstring)."""
        batch = dict(batch)
        tag = batch.pop(BATCH_TAG, None)
        epoch = module.trainer.current_epoch
        window = module._window
        if window is None or window[0] != epoch or not window[1] <= batch_idx < window[2]:
            self._start_window(module, batch, tag, batch_idx)
        pair_sum, nll_sum, stats = self.terms(module.network, batch, module._network_inputs(batch))
        self._window_stats = stats if self._window_stats is None else self._window_stats + stats
        module._window_loss = self._window_stats[0] + self._window_stats[1]  # read by the non-finite check
        units, nll_tokens = self._step_counts[0], self._step_counts[1]
        objective = pair_sum / units.clamp(min=1).to(pair_sum.dtype)
        if self.loss.nll:
            objective = objective + self.loss.nll * nll_sum / nll_tokens.clamp(min=1).to(nll_sum.dtype)
        if batch_idx + 1 == module._window[2]:  # type: ignore[index]
            self._end_window(module)
        return objective * gradient_divisor(module.trainer)

    def _start_window(self, module: LitLM, batch: dict, tag: tuple[int, int] | None, batch_idx: int) -> None:
        trainer = module.trainer
        length = steps_left_in_window(trainer, batch_idx)
        look_ahead = train_look_ahead(trainer)
        count = units_counter(module.network, self.loss.unpaired)
        if tag is not None and look_ahead is not None:
            local = torch.as_tensor(look_ahead.targets_ahead(tag, length), dtype=torch.long)
        else:  # training_step called by hand: exact without accumulation
            local = count({k: v.cpu() for k, v in batch.items() if isinstance(v, torch.Tensor)}) * length
        self._step_counts = trainer.strategy.reduce(local.to(module.device), reduce_op="sum")
        module._window = (trainer.current_epoch, batch_idx, batch_idx + length)
        self._window_stats = None

    def _end_window(self, module: LitLM) -> None:
        pending = module._tokens_pending
        module._tokens_pending = self._step_counts[2] if pending is None else pending + self._step_counts[2]
        should_log = should_update_logs(module.trainer)
        if module._window_checked and not should_log:
            return
        assert self._window_stats is not None
        stats = module.trainer.strategy.reduce(self._window_stats, reduce_op="sum").tolist()
        counted = self._step_counts.tolist()
        if int(stats[_STATS.index("units")]) != counted[0]:
            raise RuntimeError(
                f"the step trained on {stats[_STATS.index('units')]} pairs but {counted[0]} were counted"
            )
        module._window_checked = True
        if should_log:
            for name, value in self.metrics(stats).items():
                module.log(f"train/{name}", value, on_step=True, on_epoch=False)
            tokens_seen = torch.tensor(float(module.tokens_seen), dtype=torch.float64, device=module.device)
            module.log("train/tokens_seen", tokens_seen, on_step=True, on_epoch=False)

    def metrics(self, stats: list[float]) -> dict[str, float]:
        """The logged metrics from the summed statistics of a step or an evaluation epoch."""
        s = dict(zip(_STATS, stats, strict=True))
        units, nll_tokens = max(s["units"], 1.0), max(s["nll_tokens"], 1.0)
        out = {
            "loss": s["pair_loss"] / units + self.loss.nll * s["nll"] / nll_tokens,
            "rewards/chosen": s["chosen_reward"] / units,
            "rewards/rejected": s["rejected_reward"] / units,
            "rewards/accuracy": s["correct"] / units,
            "rewards/margin": s["margin"] / units,
            "logps/chosen": s["chosen_logps"] / units,
            "logps/rejected": s["rejected_logps"] / units,
            "nll": s["nll"] / nll_tokens,
        }
        if self.loss.unpaired:
            out["kl"] = s["kl"] / units
            del out["rewards/margin"]
        if self.loss.type == "bradley_terry":  # a reward model has scores, no log-probs
            return {k: v for k, v in out.items() if not k.startswith(("logps/", "nll"))}
        out["ppl"] = math.exp(min(out["nll"], 80.0))
        return out

    # ------------------------------------------------------------------ evaluation
    def on_eval_epoch_start(self) -> None:
        self._eval_stats = None

    def eval_step(self, module: LitLM, batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            _, _, stats = self.terms(module.network, batch, module._network_inputs(batch))
        self._eval_stats = stats if self._eval_stats is None else self._eval_stats + stats

    def on_eval_epoch_end(self, module: LitLM, stage: str) -> None:
        if module.trainer.sanity_checking:
            return
        local = self._eval_stats if self._eval_stats is not None else torch.zeros(len(_STATS), dtype=torch.float64)
        stats = module.trainer.strategy.reduce(local.to(module.device), reduce_op="sum").tolist()
        for name, value in self.metrics(stats).items():
            module.log(f"{stage}/{name}", value, prog_bar=stage == "val" and name == "rewards/accuracy")
        self._eval_stats = None

    def fingerprint(self) -> str:
        """A hash of the reference weights (names the cached precomputed log-probs)."""
        assert self.reference is not None
        if self.reference_fingerprint is None:
            self.reference_fingerprint = weights_fingerprint(self.reference)
        return self.reference_fingerprint
