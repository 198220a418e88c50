"""Preference losses on per-sequence log-probabilities: DPO (sigmoid, label smoothing), IPO, hinge, SimPO, ORPO, KTO.

Every function here maps per-sequence quantities (``[P]`` tensors, one entry per pair or per example) to per-pair
losses ``[P]`` and the implicit rewards logged as ``rewards/chosen`` and ``rewards/rejected``. The training objective
(:mod:`litune.preference.module`) sums them over the pairs of an optimizer step and divides by the step's pair count
(all micro-batches, all ranks), so one step's update does not depend on how its pairs are split.

The formulas follow TRL's (``DPOTrainer.dpo_loss``, ``CPOTrainer.cpo_loss`` for SimPO, ``ORPOTrainer.odds_ratio_loss``,
``KTOTrainer.kto_loss``); ``tests/preference/test_preference_losses.py`` checks value and gradients in float64
against golden values that TRL's own code computed (``tests/goldens/preference_losses.json`` records the TRL
version). They are written out here rather than imported because TRL's are methods of its Trainers (they read
``self.beta``, ``self.accelerator``), which litune does not use.

Conventions (as TRL's): DPO, IPO and hinge use log-ratios ``log pi(y|x) - log pi_ref(y|x)`` summed over the response
tokens; IPO and SimPO divide by the response length (IPO as TRL does, so ``beta`` does not depend on length); ORPO
uses length-averaged log-probs. The hinge and IPO margins and SimPO's ``gamma`` are in these units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from litune.errors import ConfigError

LossType = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto", "bradley_terry"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto", "bradley_terry")
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo", "bradley_terry"})
"""Losses that use no reference model."""

FIELD = "model.preference"


@dataclass(frozen=True)
class PreferenceLoss:
    """Which preference loss, and its settings: the loss fields of ``model.preference`` in a config (their one
    definition: :class:`litune.preference.objective.Preference` adds the reference and log-prob settings).

    Args:
        loss: ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``simpo`` (reference-free, length-normalised, margin ``gamma``),
            ``orpo`` (reference-free: NLL on chosen plus ``beta`` times the log odds-ratio term) or ``kto``
            (unpaired desirable/undesirable examples).
        beta: the inverse temperature (DPO, hinge, SimPO, KTO), IPO's regularisation ``tau``, ORPO's ``lambda``.
        label_smoothing: conservative DPO / SimPO: the probability that a pair's label is flipped, in ``[0, 0.5)``.
        gamma: SimPO's target reward margin (in units of ``beta`` times mean log-prob).
        nll_weight: weight of the mean NLL of the chosen responses added to the loss (RPO's ``alpha``); ORPO's SFT
            term is this term with weight 1, its default there.
        desirable_weight: KTO's weight of desirable examples.
        undesirable_weight: KTO's weight of undesirable examples.
        margin: Bradley-Terry's required score margin (reward models).
        center_rewards_coefficient: Bradley-Terry's weight of ``(r_chosen + r_rejected)^2``, which centres the
            rewards at 0 (Eisenstein et al. 2023).
    """

    loss: LossType = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    nll_weight: float | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    margin: float = 0.0
    center_rewards_coefficient: float | None = None

    @property
    def type(self) -> str:
        """The loss type (``loss``)."""
        return self.loss

    def __post_init__(self) -> None:
        if self.loss not in LOSS_TYPES:
            raise ConfigError(f"{FIELD}.loss", f"{self.loss!r} is not a preference loss", f"use one of {LOSS_TYPES}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(
                f"{FIELD}.beta", f"beta={self.beta!r} must be a positive number", "use e.g. beta: 0.1 (DPO)"
            )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"{FIELD}.label_smoothing",
                f"{self.label_smoothing} is not in [0, 0.5)",
                "use 0 (plain DPO) or a flip probability such as 0.1",
            )
        if self.label_smoothing and self.type not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"{FIELD}.label_smoothing",
                f"label smoothing applies to the sigmoid and simpo losses, not {self.type}",
                "set label_smoothing: 0 or use type sigmoid/simpo",
            )
        if self.nll_weight is not None and not (math.isfinite(self.nll_weight) and self.nll_weight >= 0):
            raise ConfigError(f"{FIELD}.nll_weight", f"{self.nll_weight} is not >= 0", "use e.g. 1.0, or null")
        if self.type == "bradley_terry" and self.nll_weight:
            raise ConfigError(f"{FIELD}.nll_weight", "a reward model has no log-probs for an NLL term", "remove it")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{FIELD}.{name}", f"{getattr(self, name)} is not > 0", "use a positive weight")

    @property
    def reference_free(self) -> bool:
        """Whether this loss uses no reference model (SimPO, ORPO)."""
        return self.type in REFERENCE_FREE

    @property
    def unpaired(self) -> bool:
        """Whether the data are unpaired examples with a desirable/undesirable label (KTO)."""
        return self.type == "kto"

    @property
    def nll(self) -> float:
        """Weight of the chosen responses' NLL term (ORPO's defaults to 1, every other loss's to 0)."""
        if self.nll_weight is not None:
            return float(self.nll_weight)
        return 1.0 if self.type == "orpo" else 0.0


def dpo_sigmoid(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with ``label_smoothing`` (cDPO).

    Args:
        chosen_logratios: ``[P]`` ``log pi(y_w|x) - log pi_ref(y_w|x)`` summed over the response tokens.
        rejected_logratios: ``[P]`` the same for the rejected responses.

    Returns:
        ``[P]`` per-pair losses; ``ln 2`` each when policy and reference agree.
    """
    z = beta * (chosen_logratios - rejected_logratios)
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def ipo(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2`` with length-averaged log-ratios (as TRL).

    Args:
        chosen_logratios: ``[P]`` per-token mean log-ratios of the chosen responses.
        rejected_logratios: ``[P]`` per-token mean log-ratios of the rejected responses.
    """
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def hinge(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC's hinge loss ``relu(1 - beta * (r_w - r_l))`` on summed log-ratios (``[P]`` each)."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def simpo(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``-log sigmoid(beta * (mean logp_w - mean logp_l) - gamma)``, no reference.

    Args:
        chosen_mean_logps: ``[P]`` per-token mean log-probs of the chosen responses under the policy.
        rejected_mean_logps: ``[P]`` the same for the rejected responses.
    """
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def _log1m_exp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(logp))`` for ``logp < 0``, accurate near 0 (``logp`` is clamped below 0 by the smallest float)."""
    return torch.log(-torch.expm1(logp.clamp(max=-torch.finfo(logp.dtype).tiny)))


def orpo_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7): ``-beta * log sigmoid(log odds_w - log odds_l)``.

    ``log odds(y) = log p - log(1 - p)`` with ``p`` the per-token mean probability. TRL computes ``log(1 - p)`` as
    ``log1p(-exp(mean logp))``, which is ``-inf`` once ``p`` rounds to 1 (mean logp > -6e-8 in float32); here it is
    ``log(-expm1(mean logp))`` (equal in exact arithmetic, finite down to the smallest float). The NLL term on the
    chosen responses is added by the objective (``nll_weight``).

    Args:
        chosen_mean_logps: ``[P]`` per-token mean log-probs (< 0) of the chosen responses.
        rejected_mean_logps: ``[P]`` the same for the rejected responses.
    """
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        _log1m_exp(chosen_mean_logps) - _log1m_exp(rejected_mean_logps)
    )
    return -beta * F.logsigmoid(log_odds)


def kto(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples.

    Args:
        logratios: ``[E]`` summed log-ratios of the examples' responses.
        desirable: ``[E]`` bool, whether each response is desirable.
        kl: the reference point ``z0`` (a detached estimate of KL(pi || pi_ref), clamped at 0).
        beta: inverse temperature.

    Returns:
        ``[E]`` losses: ``w_d (1 - sigmoid(beta (r - z0)))`` for desirable, ``w_u (1 - sigmoid(beta (z0 - r)))``
        for undesirable examples.
    """
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, good, bad)


def bradley_terry(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """The Bradley-Terry loss of a reward model: ``-log sigmoid(r_w - r_l - margin)`` per pair, plus
    ``c * (r_w + r_l)^2`` with the centring coefficient ``c`` (as TRL's ``RewardTrainer``).

    Args:
        chosen_scores: ``[P]`` rewards of the chosen responses.
        rejected_scores: ``[P]`` rewards of the rejected responses.
    """
    losses = -F.logsigmoid(chosen_scores - rejected_scores - margin)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's ``z0``: the detached mean log-ratio of mismatched (prompt, response) examples, clamped at 0.

    Args:
        policy_kl_logps: ``[K]`` policy log-probs of responses paired with other examples' prompts.
        ref_kl_logps: ``[K]`` the same under the reference.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


@dataclass
class PairTerms:
    """Per-pair losses and the implicit rewards logged with them (``[P]`` each)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_terms(
    loss: PreferenceLoss,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
) -> PairTerms:
    """Per-pair losses and rewards of a paired loss, from summed response log-probs.

    Args:
        loss: which loss.
        chosen_logps: ``[P]`` policy log-probs of the chosen responses, summed over their tokens.
        rejected_logps: ``[P]`` the same for the rejected responses.
        chosen_tokens: ``[P]`` response token counts of the chosen responses (>= 1).
        rejected_tokens: ``[P]`` the same for the rejected responses.
        ref_chosen_logps: ``[P]`` reference log-probs of the chosen responses (``None`` for SimPO and ORPO).
        ref_rejected_logps: ``[P]`` the same for the rejected responses.

    Returns:
        :class:`PairTerms`; rewards are ``beta`` times the log-ratio (DPO family) or times the mean log-prob (SimPO,
        ORPO), detached.
    """
    beta = loss.beta
    chosen_len = chosen_tokens.to(chosen_logps.dtype).clamp(min=1)
    rejected_len = rejected_tokens.to(rejected_logps.dtype).clamp(min=1)
    if loss.reference_free:
        chosen_mean, rejected_mean = chosen_logps / chosen_len, rejected_logps / rejected_len
        if loss.type == "simpo":
            losses = simpo(chosen_mean, rejected_mean, beta, loss.gamma, loss.label_smoothing)
        else:
            losses = orpo_odds_ratio(chosen_mean, rejected_mean, beta)
        return PairTerms(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"the {loss.type} loss needs reference log-probs")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss.type == "sigmoid":
        losses = dpo_sigmoid(chosen_ratio, rejected_ratio, beta, loss.label_smoothing)
    elif loss.type == "ipo":
        losses = ipo(chosen_ratio / chosen_len, rejected_ratio / rejected_len, beta)
    elif loss.type == "hinge":
        losses = hinge(chosen_ratio, rejected_ratio, beta)
    else:
        raise ValueError(f"{loss.type} is not a paired loss")
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
