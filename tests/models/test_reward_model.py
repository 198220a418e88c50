"""Reward models: the Bradley-Terry loss (float64, against its closed form), scoring at the last real token with left
or right padding, training through the real Trainer, and the exported Hugging Face folder's scores."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from litune.errors import ConfigError
from litune.models.reward import HFRewardModel
from litune.module import LitLM
from litune.preference.data import PreferenceCollator
from litune.preference.losses import bradley_terry
from litune.preference.objective import Preference

VOCAB, PAD = 50, 0


def reward_model() -> HFRewardModel:
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": VOCAB, "n_positions": 32,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
    return HFRewardModel(config=config, pad_token_id=PAD)


@pytest.mark.parametrize(("margin", "center"), [(0.0, None), (0.5, 0.01)])
def test_bradley_terry_matches_its_closed_form_in_float64(margin: float, center: float | None) -> None:
    chosen = torch.tensor([1.5, -2.0, 30.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.5, 1.0, -30.0, 0.0], dtype=torch.float64, requires_grad=True)
    losses = bradley_terry(chosen, rejected, margin, center)
    losses.sum().backward()
    d, s, c = (chosen - rejected - margin).detach(), (chosen + rejected).detach(), center or 0.0
    torch.testing.assert_close(losses.detach(), torch.log1p(torch.exp(-d)) + c * s**2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-d) + 2 * c * s, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rejected.grad, torch.sigmoid(-d) + 2 * c * s, rtol=1e-14, atol=1e-14)


def test_the_score_is_read_at_the_last_real_token_with_left_or_right_padding() -> None:
    model = reward_model().eval()
    rows = [[5, 6, 7, 8, 9], [11, 12]]
    right = torch.tensor([[5, 6, 7, 8, 9], [11, 12, PAD, PAD, PAD]])
    left = torch.tensor([[5, 6, 7, 8, 9], [PAD, PAD, PAD, 11, 12]])
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([r])).scores[0] for r in rows])
        got_right = model(right, (right != PAD).long()).scores
        got_left = model(left, (left != PAD).long()).scores
    torch.testing.assert_close(got_right, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_left, alone, rtol=1e-5, atol=1e-6)


def pairs(n: int) -> list[dict]:
    """Chosen responses use tokens 1-24, rejected ones 25-49: a preference a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(0)
    return [{"prompt_ids": torch.randint(1, VOCAB, (3,), generator=g).tolist(),
             "chosen_ids": torch.randint(1, 25, (2 + i % 4,), generator=g).tolist(),
             "rejected_ids": torch.randint(25, VOCAB, (1 + i % 5,), generator=g).tolist()}
            for i in range(n)]  # fmt: skip


def test_a_reward_model_trains_and_exports_a_folder_that_reloads_with_the_same_scores(tmp_path) -> None:
    module = LitLM(reward_model(), optimizer=partial(torch.optim.AdamW, lr=3e-3),
                   preference=Preference(loss="bradley_terry", center_rewards_coefficient=0.01))  # fmt: skip
    loader = DataLoader(pairs(32), batch_size=8, collate_fn=PreferenceCollator(PAD))
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    trainer.fit(module, loader)
    assert float(trainer.callback_metrics["train/rewards/accuracy"]) == 1.0
    assert module.preference.reference is None, "a reward model keeps no reference"
    module.network.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    batch = PreferenceCollator(PAD)(pairs(4))
    module.network.eval()
    with torch.no_grad():
        ours = module.network(batch["input_ids"], batch["attention_mask"]).scores
        theirs = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_a_reward_model_takes_no_reference_and_no_nll_term() -> None:
    with pytest.raises(ConfigError, match="reference-free"):
        Preference(loss="bradley_terry", reference="copy")
    with pytest.raises(ConfigError, match="NLL"):
        Preference(loss="bradley_terry", nll_weight=1.0)
