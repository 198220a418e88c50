"""The reference model of preference tuning (and of KL-regularised RL such as GRPO): three ways to get its log-probs.

* ``copy``: a frozen copy of the policy as it was before training (``frozen_copy``). It is kept outside the
  LightningModule's registered children, so no optimizer, checkpoint or export ever sees it: it is never trained and
  never saved (a resumed run rebuilds it from the same initial weights, pretrained or seeded).
* ``adapters``: when the policy trains LoRA adapters, the reference is the policy with its adapters disabled
  (:func:`adapters_disabled`): no second copy of the weights exists.
* ``precomputed``: one pass of the reference over the data before training; the log-probs are cached beside the
  tokenized data (:mod:`litune.preference.data`) and reused on resume and in sweeps.

Reusable functions (GRPO builds on them): :func:`frozen_copy`, :func:`adapters_disabled`, :func:`disable_dropout`,
:func:`weights_fingerprint`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from litune.models.adapters import peft_model_of

_DROPOUT_ATTRIBUTES = ("dropout", "attention_dropout", "attn_dropout", "dropout_p")
"""Float attributes through which attention layers pass a dropout probability to SDPA (litune's ``SelfAttention``
``dropout``, Llama-style ``attention_dropout``); ``nn.Dropout`` modules are handled by type."""


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (as TRL does by default), so the policy's log-probs are deterministic and
    equal the reference's when the weights are equal (DPO's loss is then exactly ``ln 2``): ``nn.Dropout`` modules and
    the float dropout attributes of attention layers."""
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
        for name in _DROPOUT_ATTRIBUTES:
            if isinstance(getattr(child, name, None), float) and not isinstance(getattr(child, name), bool):
                setattr(child, name, 0.0)


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with every parameter frozen, in eval mode (no dropout)."""
    ref = copy.deepcopy(network)
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def adapters_disabled(network: nn.Module) -> Iterator[None]:
    """Within the context, ``network`` computes with its base weights only (its LoRA adapters bypassed)."""
    peft_model = peft_model_of(network)
    if peft_model is None:
        raise RuntimeError("the network has no adapters to disable")
    with peft_model.disable_adapter():
        yield


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes and bytes): names a reference's cached log-probs."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]
