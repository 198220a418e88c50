"""Preference losses against float64 goldens computed by TRL's own loss code, and their properties.

``tests/goldens/preference_losses.json`` was written by ``tests/goldens/make_preference_goldens.py``, which runs TRL's
``dpo_loss``/``cpo_loss``/``odds_ratio_loss``/``kto_loss`` source (the TRL version and a hash of each function are in
its ``provenance``). Values and gradients must agree to float64 rounding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from litune.errors import ConfigError
from litune.preference.losses import PreferenceLoss, kto, kto_reference_point, pair_terms

GOLDENS = json.loads((Path(__file__).parents[1] / "goldens" / "preference_losses.json").read_text())
SETTINGS = GOLDENS["settings"]
TOKENS = GOLDENS["tokens"]
PAIRED = {
    "sigmoid": PreferenceLoss("sigmoid", beta=SETTINGS["beta"]),
    "sigmoid_smoothed": PreferenceLoss("sigmoid", beta=SETTINGS["beta"], label_smoothing=SETTINGS["label_smoothing"]),
    "hinge": PreferenceLoss("hinge", beta=SETTINGS["beta"]),
    "ipo": PreferenceLoss("ipo", beta=SETTINGS["beta"]),
    "simpo": PreferenceLoss("simpo", beta=SETTINGS["beta"], gamma=SETTINGS["gamma"]),
    "simpo_smoothed": PreferenceLoss(
        "simpo", beta=SETTINGS["beta"], gamma=SETTINGS["gamma"], label_smoothing=SETTINGS["label_smoothing"]
    ),
    "orpo": PreferenceLoss("orpo", beta=SETTINGS["beta"]),
}


def _leaves(inputs: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}


def _check(losses: torch.Tensor, leaves: dict[str, torch.Tensor], golden: dict) -> None:
    losses.mean().backward()
    torch.testing.assert_close(losses, torch.tensor(golden["losses"], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    for name, leaf in leaves.items():
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        torch.testing.assert_close(
            grad, torch.tensor(golden["grads"][name], dtype=torch.float64), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_paired_losses_match_trl_goldens(name: str) -> None:
    golden = GOLDENS["cases"][name]
    leaves = _leaves(golden["inputs"])
    chosen_tokens, rejected_tokens = torch.tensor(TOKENS["chosen"]), torch.tensor(TOKENS["rejected"])
    terms = pair_terms(PAIRED[name], chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, **leaves)
    _check(terms.losses, leaves, golden)


def test_kto_matches_trl_golden() -> None:
    golden = GOLDENS["cases"]["kto"]
    leaves = _leaves(golden["inputs"])
    z0 = kto_reference_point(leaves["policy_kl_logps"], leaves["ref_kl_logps"])
    desirable_weight, undesirable_weight = golden["weights"]
    losses = kto(
        leaves["logps"] - leaves["ref_logps"], torch.tensor(golden["desirable"]), z0, SETTINGS["beta"],
        desirable_weight, undesirable_weight,
    )  # fmt: skip
    _check(losses, leaves, golden)


def test_goldens_record_their_provenance() -> None:
    assert GOLDENS["provenance"]["trl"] == "0.19.1" and GOLDENS["provenance"]["dtype"] == "float64"


def _dpo(chosen: float, rejected: float = -5.0, ref_chosen: float = -5.0, ref_rejected: float = -5.0) -> torch.Tensor:
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    one = torch.ones(1, dtype=torch.long)
    return pair_terms(
        PreferenceLoss("sigmoid"), t(chosen), t(rejected), one, one, t(ref_chosen), t(ref_rejected)
    ).losses


def test_dpo_is_ln2_when_policy_is_reference_and_falls_as_chosen_gains() -> None:
    assert _dpo(-5.0).item() == pytest.approx(math.log(2), abs=1e-15)
    values = [_dpo(c).item() for c in (-9.0, -5.0, -2.0, -0.5)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
def test_losses_and_gradients_are_finite_at_extreme_logps(loss_type: str) -> None:
    logps = torch.tensor([-1e6, -1e-12, -3e4, -1e-30], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([-1e-12, -1e6, -1e-30, -3e4], dtype=torch.float32)
    tokens = torch.tensor([1, 1, 2048, 1])
    loss = PreferenceLoss(loss_type)
    terms = pair_terms(loss, logps[:2], logps[2:], tokens[:2], tokens[2:], ref[:2], ref[2:])
    terms.losses.sum().backward()
    assert torch.isfinite(terms.losses).all() and torch.isfinite(logps.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 0.0}, "model.preference.beta"),
        ({"beta": -0.1}, "model.preference.beta"),
        ({"loss": "dpo2"}, "model.preference.loss"),
        ({"label_smoothing": 0.5}, "model.preference.label_smoothing"),
        ({"loss": "hinge", "label_smoothing": 0.1}, "model.preference.label_smoothing"),
        ({"nll_weight": -1.0}, "model.preference.nll_weight"),
    ],
)
def test_bad_loss_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        PreferenceLoss(**kwargs)
    assert err.value.field == field and "Fix:" in str(err.value)
