"""Reward models: any ``AutoModelForSequenceClassification`` with one output, scored at the last real token.

Trained with the Bradley-Terry loss on preference pairs (``model.preference.loss: bradley_terry``,
``configs/preference/reward.yaml``); exported as a Hugging Face folder that ``AutoModelForSequenceClassification``
reloads with the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from litune.errors import NETWORK_ARGS
from litune.models.hf import build_hf_config, transformers_errors


@dataclass
class RewardOutput:
    """A reward model's output: ``scores`` ``[B]`` float32, one per row (at its last real token)."""

    scores: torch.Tensor
    logits: None = None


def last_token_index(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last real token (mask 1), whether padding is on the left or the right."""
    if attention_mask is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, device=input_ids.device, dtype=torch.long)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)
    return (attention_mask.long() * positions).argmax(-1)


class HFRewardModel(nn.Module):
    """A sequence-classification transformer with one output (a scalar reward), pretrained or from a config.

    Args:
        pretrained: hub id or local folder (a causal LM's weights load into the body; the score head starts fresh).
        config: a Hugging Face config's keyword arguments with ``model_type``, to build from scratch.
        pad_token_id: written into the exported config, so that ``AutoModelForSequenceClassification`` finds the last
            real token by it, as litune does by the attention mask (set it to the tokenizer's pad id; it must not
            occur inside the text).
        trust_remote_code: run model code from the hub.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        pad_token_id: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.pretrained = pretrained
        hf_config = build_hf_config(pretrained, config, None, trust_remote_code)
        hf_config.num_labels = 1
        if pad_token_id is not None:
            hf_config.pad_token_id = pad_token_id
        with transformers_errors(NETWORK_ARGS):
            if pretrained is not None:
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    pretrained, config=hf_config, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
                self.model.train()
            else:
                self.model = AutoModelForSequenceClassification.from_config(
                    hf_config, trust_remote_code=trust_remote_code
                )

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def max_seq_len(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    def head(self) -> nn.Module:
        """The score layer (``score`` in transformers' decoder classifiers, ``classifier`` in encoders)."""
        return getattr(self.model, "score", None) or self.model.classifier

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: object
    ) -> RewardOutput:
        """Scores ``[B]`` of ``input_ids`` ``[B, T]``, read at each row's last real token (``attention_mask``)."""
        # Positions count real tokens only, so a left-padded row is scored as its right-padded twin.
        positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
        ).last_hidden_state
        rows = torch.arange(input_ids.size(0), device=input_ids.device)
        pooled = hidden[rows, last_token_index(attention_mask, input_ids)]  # [B, d]
        return RewardOutput(scores=self.head()(pooled).squeeze(-1).float())

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a folder that ``AutoModelForSequenceClassification.from_pretrained`` loads."""
        self.model.save_pretrained(directory)
