"""Counting the model FLOPs of MFU: matrix multiplications only, with full parameter sizes under ZeRO-3.

MFU (PaLM, Chowdhery et al. 2022, appendix B) counts ``6 N`` training FLOPs per token for the ``N`` weights that take
part in matrix multiplications, plus the attention scores. Layer norms, biases and embedding *lookups* (the token
table of an untied model, learned position tables) cost no matmul; the output projection does, tied to the token
table or not.
"""

from __future__ import annotations

import torch
from torch import nn


def full_numel(param: torch.Tensor) -> int:
    """Elements of ``param`` as the model defines it, also when DeepSpeed ZeRO-3 partitioned it.

    A ZeRO-3 parameter is an empty placeholder outside a gather (``numel() == 0``); DeepSpeed keeps the real size in
    ``ds_numel``. (An FSDP2 ``DTensor`` reports its global size already.)
    """
    return int(getattr(param, "ds_numel", param.numel()))


def matmul_weights(module: nn.Module) -> int:
    """Elements of the weights used in matrix multiplications: ``nn.Linear`` (the output head included) and
    ``transformers``' ``Conv1D`` (GPT-2's projections), each shared tensor counted once.

    Args:
        module: a network (or any module).
    """
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D":
            weight = sub.weight
            if id(weight) not in seen:
                seen.add(id(weight))
                total += full_numel(weight)
    return total
