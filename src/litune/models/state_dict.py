"""Strict state-dict loading with one readable error, shared by every network that loads weights from elsewhere."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from litune.errors import NETWORK_FIELD, ConfigError


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` and raise a :class:`ConfigError` listing every missing, unexpected or
    wrongly shaped key (``nn.Module.load_state_dict`` would stop at the first shape error with a traceback).

    Args:
        module: the network to fill.
        state: the converted state dict.
        source: where the weights came from, for the message.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if shapes:
            problems.append(f"shape mismatches [{'; '.join(shapes)}]")
        raise ConfigError(
            NETWORK_FIELD,
            f"the weights from {source} do not fit {type(module).__name__}: {', '.join(problems)}",
            "build the network with the checkpoint's sizes (d_model, nhead, layers, vocab_size, max_seq_len, bias) "
            "or load a checkpoint of this architecture",
        )
    module.load_state_dict(state, strict=True)
