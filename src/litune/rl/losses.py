"""GRPO's objective on per-token log-probabilities: group-relative advantages, the clipped surrogate, the KL penalty.

A batch of rollouts holds ``G`` completions for each of its prompts, consecutive (``[P * G]`` rows, group ``i`` in rows
``i * G .. i * G + G - 1``). Every function maps them to per-token or per-completion quantities; the training objective
sums a :func:`policy_loss_terms` numerator over the micro-batches and ranks of an optimizer step and divides it by the
step's total weight, so the update does not depend on how the rollouts are split (as the SFT objective,
:mod:`litune.objective`).

The formulas follow TRL's ``GRPOTrainer`` (``_generate_and_score_completions`` for the advantages, ``_compute_loss``
for the loss); ``tests/rl/test_rl_losses.py`` checks value and gradients in float64 against golden values that TRL's own
code computed (``tests/goldens/rl_losses.json`` records the TRL version). They are written out here because TRL's are
Trainer methods reading the Trainer's state (``self.beta``, ``self.accelerator``, accumulation counters).

Normalisations (``normalization`` in :class:`GRPOLoss`), each a sum over the step divided by a count over the step:

- ``sequence`` (GRPO, TRL ``loss_type="grpo"``): every completion weighs the same; a completion's loss is the mean of
  its token losses. Numerator ``sum_i mean_t l_it``, weight: the number of completions.
- ``token`` (DAPO / TRL ``"dapo"``): every completion token weighs the same. Numerator ``sum_it l_it``, weight: the
  number of completion tokens.
- ``constant`` (Dr. GRPO, TRL ``"dr_grpo"``): no length bias at all. Numerator ``sum_it l_it``, weight: the number of
  completions times ``max_completion_length``.

TRL normalises per micro-batch and then averages micro-batches (``grpo``, ``dr_grpo``), which equals the above only
when micro-batches hold equal numbers of completions; litune's version is exact for any split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from litune.errors import ConfigError

Normalization = Literal["sequence", "token", "constant"]
NORMALIZATIONS: tuple[str, ...] = ("sequence", "token", "constant")
FIELD = "model.rl"


@dataclass(frozen=True)
class GRPOLoss:
    """GRPO's loss settings (the loss fields of ``model.rl``, :class:`litune.rl.objective.RL`).

    Args:
        epsilon_low: lower clip range of the importance ratio, ``1 - epsilon_low``.
        epsilon_high: upper clip range, ``1 + epsilon_high`` (DAPO's "clip higher" sets it above ``epsilon_low``).
        beta: weight of the KL penalty against the reference model; 0 (the default, as TRL and DAPO) needs no
            reference model at all.
        scale_rewards: divide advantages by the group's reward standard deviation (GRPO); ``False`` keeps the raw
            difference to the group mean (Dr. GRPO).
        normalization: ``sequence`` (GRPO), ``token`` (DAPO) or ``constant`` (Dr. GRPO); see the module docstring.
    """

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    scale_rewards: bool = True
    normalization: Normalization = "sequence"

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon_low < 1.0:
            raise ConfigError(f"{FIELD}.epsilon_low", f"epsilon_low={self.epsilon_low} must be in (0, 1)", "use 0.2")
        if not self.epsilon_high > 0.0:
            raise ConfigError(f"{FIELD}.epsilon_high", f"epsilon_high={self.epsilon_high} must be > 0", "use 0.2")
        if self.beta < 0:
            raise ConfigError(f"{FIELD}.beta", f"beta={self.beta} must be >= 0", "use 0 (no KL penalty) or e.g. 0.04")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"{FIELD}.normalization",
                f"unknown normalization {self.normalization!r}",
                f"use one of {', '.join(NORMALIZATIONS)}",
            )


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Each completion's reward minus its group's mean, optionally divided by the group's standard deviation.

    Args:
        rewards: ``[P * G]`` total reward of each completion, groups consecutive.
        group_size: ``G``, completions per prompt (>= 2: a group of one has no baseline).
        scale: divide by the group's (unbiased) standard deviation plus ``eps``, as GRPO and TRL do.
        eps: keeps a group whose rewards are all equal at advantage 0 instead of 0 / 0.

    Returns:
        ``[P * G]`` advantages; a group with equal rewards has all zeros (it carries no learning signal).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def clipped_surrogate(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, with the importance ratio against the policy that sampled the completion.

    Args:
        logps: ``[N, T]`` log-probabilities of the completion tokens under the policy being trained.
        old_logps: ``[N, T]`` the same under the sampling policy (detached; equal to ``logps`` on the first of
            ``num_iterations`` optimizer steps, where the ratio is 1 and the gradient is REINFORCE's).
        advantages: ``[N]`` one advantage per completion, shared by its tokens.
        epsilon_low: the ratio is clipped below at ``1 - epsilon_low``.
        epsilon_high: and above at ``1 + epsilon_high``.

    Returns:
        ``([N, T] token losses -min(r A, clip(r) A), [N, T] bool: the clipped term was the one taken)``.
    """
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    advantage = advantages.unsqueeze(1)
    unclipped, clipped = ratio * advantage, clipped_ratio * advantage
    return -torch.min(unclipped, clipped), clipped < unclipped


def kl_to_reference(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` per-token KL estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3: unbiased, >= 0)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss_terms(
    token_losses: torch.Tensor, mask: torch.Tensor, normalization: Normalization, max_completion_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerator of one micro-batch's loss, and its weight toward the step's divisor.

    Args:
        token_losses: ``[N, T]`` per-token losses (surrogate plus ``beta`` times KL).
        mask: ``[N, T]`` 1 for completion tokens (up to and including EOS), 0 for padding after it.
        normalization: see the module docstring.
        max_completion_length: the cap on completion tokens (``constant`` normalisation's per-completion weight).

    Returns:
        ``(numerator, weight)``: scalar tensors; the step's loss is ``sum(numerators) / sum(weights)`` over its
        micro-batches and ranks.
    """
    mask = mask.to(token_losses.dtype)
    per_token = token_losses * mask
    if normalization == "sequence":
        numerator = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
        weight = torch.tensor(float(token_losses.shape[0]), dtype=token_losses.dtype, device=token_losses.device)
    elif normalization == "token":
        numerator, weight = per_token.sum(), mask.sum()
    else:
        numerator = per_token.sum()
        weight = torch.tensor(
            float(token_losses.shape[0] * max_completion_length), dtype=token_losses.dtype, device=token_losses.device
        )
    return numerator, weight


def grpo_token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    loss: GRPOLoss,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, T] token losses, [N, T] clipped)``: the clipped surrogate plus ``beta`` times the KL to the reference."""
    token_losses, clipped = clipped_surrogate(logps, old_logps, advantages, loss.epsilon_low, loss.epsilon_high)
    if loss.beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference model's log-probabilities")
        token_losses = token_losses + loss.beta * kl_to_reference(logps, ref_logps)
    return token_losses, clipped
