"""GRPO's objective in float64 against TRL's own code, and its properties.

Goldens: ``tests/goldens/rl_losses.json``, written by ``tests/goldens/make_rl_goldens.py`` from TRL's
``GRPOTrainer._compute_loss`` (its provenance records TRL's version and a hash of the function's source).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from litune.errors import ConfigError
from litune.rl.losses import (
    GRPOLoss,
    clipped_surrogate,
    group_advantages,
    grpo_token_losses,
    kl_to_reference,
    policy_loss_terms,
)

GOLDENS = json.loads((Path(__file__).parents[1] / "goldens" / "rl_losses.json").read_text())
TRL_NORMALIZATION = {"grpo": "sequence", "dapo": "token", "dr_grpo": "constant"}


def golden_inputs() -> tuple[torch.Tensor, ...]:
    settings, inputs = GOLDENS["settings"], GOLDENS["inputs"]
    width = settings["max_completion_length"]
    mask = (torch.arange(width)[None, :] < torch.tensor(settings["lengths"])[:, None]).long()
    logps, old, ref = (torch.tensor(inputs[k], dtype=torch.float64) for k in ("logps", "old_logps", "ref_logps"))
    return torch.tensor(settings["rewards"], dtype=torch.float64), mask, logps, old, ref


def litune_loss(case: dict, micro_batches: list[slice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad wrt logps, advantages)``: numerators summed over micro-batches, divided by their summed weights."""
    rewards, mask, logps, old, ref = golden_inputs()
    settings = GOLDENS["settings"]
    loss_settings = GRPOLoss(
        epsilon_low=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"],
        beta=case["beta"],
        scale_rewards=case["scale_rewards"],
        normalization=TRL_NORMALIZATION[case["loss_type"]],
    )
    advantages = group_advantages(rewards, settings["group_size"], scale=case["scale_rewards"])
    leaf = logps.clone().requires_grad_(True)
    numerator, weight = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for rows in micro_batches:
        token_losses, _ = grpo_token_losses(leaf[rows], old[rows], advantages[rows], loss_settings, ref[rows])
        part, part_weight = policy_loss_terms(
            token_losses, mask[rows], loss_settings.normalization, settings["max_completion_length"]
        )
        numerator, weight = numerator + part, weight + part_weight
    loss = numerator / weight
    loss.backward()
    return loss.detach(), leaf.grad, advantages


@pytest.mark.parametrize("name", sorted(GOLDENS["cases"]))
def test_loss_and_gradients_equal_trls_in_float64(name: str) -> None:
    case = GOLDENS["cases"][name]
    loss, grad, advantages = litune_loss(case, [slice(None)])
    torch.testing.assert_close(advantages, torch.tensor(case["advantages"], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, torch.tensor(case["loss"], dtype=torch.float64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, torch.tensor(case["grad"], dtype=torch.float64), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("normalization", ["token", "constant", "sequence"])
def test_the_step_loss_does_not_depend_on_how_rollouts_are_split(normalization: str) -> None:
    """Uneven micro-batches (5 + 4 + 3 rows) give the one-batch loss and gradients: sums over the step, one divisor.

    Teeth: averaging per-micro-batch losses (what TRL does for ``grpo`` and ``dr_grpo``) differs on the same split.
    """
    case = {
        "beta": 0.04,
        "scale_rewards": True,
        "loss_type": {v: k for k, v in TRL_NORMALIZATION.items()}[normalization],
    }
    whole, whole_grad, _ = litune_loss(case, [slice(None)])
    split, split_grad, _ = litune_loss(case, [slice(0, 5), slice(5, 9), slice(9, 12)])
    torch.testing.assert_close(split, whole, rtol=1e-13, atol=0)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-15)
    rewards, mask, logps, old, ref = golden_inputs()
    settings = GRPOLoss(epsilon_high=0.28, beta=0.04, normalization=normalization)
    advantages = group_advantages(rewards, 3)
    mean_of_means = torch.stack(
        [
            torch.div(*policy_loss_terms(grpo_token_losses(logps[r], old[r], advantages[r], settings, ref[r])[0],
                                         mask[r], normalization, 6))
            for r in (slice(0, 5), slice(5, 9), slice(9, 12))
        ]
    ).mean()  # fmt: skip
    assert abs(mean_of_means - whole) > 1e-4


def test_group_advantages_are_reward_minus_group_mean_over_group_std() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    scaled = group_advantages(rewards, 3)
    torch.testing.assert_close(scaled[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1.0 + 1e-4))
    assert torch.equal(scaled[3:], torch.zeros(3, dtype=torch.float64))  # equal rewards: no signal, not 0 / 0
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False)[:3], torch.tensor([-1.0, 0.0, 1.0]).double())
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_with_the_sampling_policy_the_gradient_is_reinforce_with_group_baselines() -> None:
    """One iteration (old == current log-probs): ratio 1, nothing clipped, grad = -A / |o| per token (sequence norm)."""
    rewards, mask, logps, _, _ = golden_inputs()
    advantages = group_advantages(rewards, 3)
    leaf = logps.clone().requires_grad_(True)
    token_losses, clipped = clipped_surrogate(leaf, leaf.detach(), advantages, 0.2, 0.2)
    assert not clipped.any()
    numerator, weight = policy_loss_terms(token_losses, mask, "sequence", 6)
    (numerator / weight).backward()
    lengths = mask.sum(dim=1, keepdim=True).double()
    reinforce = -advantages[:, None] * mask / lengths / len(rewards)  # d/dlogp of -(1/N) sum_i A_i mean_t logp_it
    torch.testing.assert_close(leaf.grad, reinforce, rtol=1e-12, atol=1e-15)


def test_clipping_stops_the_gradient_beyond_the_trust_region() -> None:
    logps = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 0.9]], dtype=torch.float64))  # ratios 2.0 and 1.11
    token_losses, clipped = clipped_surrogate(logps, old, torch.tensor([1.0], dtype=torch.float64), 0.2, 0.2)
    assert clipped.tolist() == [[True, False]]
    token_losses.sum().backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] < 0


def test_kl_estimate_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    assert torch.equal(kl_to_reference(logps, logps), torch.zeros(3, dtype=torch.float64))
    assert (kl_to_reference(logps, logps + torch.tensor([0.3, -0.7, 2.0], dtype=torch.float64)) > 0).all()


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"epsilon_low": 0.0}, "model.rl.epsilon_low"),
        ({"epsilon_low": 1.0}, "model.rl.epsilon_low"),
        ({"epsilon_high": -0.1}, "model.rl.epsilon_high"),
        ({"beta": -0.01}, "model.rl.beta"),
        ({"normalization": "mean"}, "model.rl.normalization"),
    ],
)
def test_bad_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        GRPOLoss(**settings)
    assert error.value.field == field
