"""The reference model of preference tuning (and of KL-regularised RL such as GRPO): three ways to get its log-probs.

* ``copy``: a frozen copy of the policy as it was before training (``frozen_copy``). It is kept outside the
  LightningModule's registered children, so no optimizer, checkpoint or export ever sees it: it is never trained and
  never saved (a resumed run rebuilds it from the same initial weights, pretrained or seeded). Under DeepSpeed ZeRO-3
  and FSDP2 it is sharded like the policy (:func:`shard_reference`): each rank keeps ``1/N`` of its weights.
* ``adapters``: when the policy trains LoRA adapters, the reference is the policy with its adapters disabled
  (:func:`adapters_disabled`): no second copy of the weights exists.
* ``precomputed``: one pass of the reference over the data before training; the log-probs are cached beside the
  tokenized data (:mod:`litune.preference.data`) and reused on resume and in sweeps.

Reusable functions (GRPO builds on them): :func:`frozen_copy`, :func:`adapters_disabled`, :func:`disable_dropout`,
:func:`weights_fingerprint`, :func:`shard_reference`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from litune.models.adapters import peft_model_of
from litune.preference.logps import sequence_logps

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


class ReferenceLogps(nn.Module):
    """The frozen reference as one module whose forward gives the batch's ``[rows]`` response log-probs.

    A sharding strategy wraps *this* module, not the network: its forward is the root forward, so FSDP2's root hooks
    gather the parameters outside the transformer blocks (embeddings, final norm, output head) and DeepSpeed's
    engine forward runs ZeRO-3's fetch/release bookkeeping around the whole pass, even though the log-probs reach the
    network through ``output_features`` (chunk by chunk through the head), not through its forward.

    Args:
        network: the frozen copy.
        chunk_size: ``logps_chunk_size`` (rows of logits at once; ``None``: the plain path).
    """

    def __init__(self, network: nn.Module, chunk_size: int | None) -> None:
        super().__init__()
        self.network = network
        self.chunk_size = chunk_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch`` (a preference batch) -> ``[rows]`` float32 summed response log-probs."""
        return sequence_logps(self.network, batch, self.chunk_size).logps


def is_partitioned(network: nn.Module) -> bool:
    """Whether ``network``'s parameters are already split over ranks (ZeRO-3's ``ds_id`` placeholders, or FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in network.modules()) or any(
        hasattr(p, "ds_id") for p in network.parameters()
    )


def shard_reference(reference: ReferenceLogps, strategy: object) -> nn.Module | None:
    """Shard the frozen reference like the policy under DeepSpeed ZeRO-3 or FSDP2; any other strategy: unchanged.

    * ZeRO-3: a second DeepSpeed engine over the reference, with the run's DeepSpeed config and no optimizer (what
      TRL's ``prepare_deepspeed`` does for its reference model): ``deepspeed.initialize`` partitions the parameters
      (``DeepSpeedZeRoOffload``) and gathers each module's just before it runs. The engine is no child of the
      LightningModule, so neither Lightning's checkpoint nor the policy engine's ever holds it.
    * FSDP2: ``fully_shard`` on the copy's ``sharding_units()`` and then on the wrapper, with the policy's mesh,
      mixed-precision and offload policies (``FSDP2Strategy.fully_shard_kwargs``).

    Args:
        reference: the wrapped frozen copy (whole: made before the policy was partitioned).
        strategy: the run's Lightning strategy.

    Returns:
        the module to call with a batch (``[rows]`` reference log-probs), or ``None`` under a strategy that does not
        shard the policy (the copy stays whole).
    """
    from litune.strategies.descriptor import describe

    spec = describe(strategy)
    if spec.deepspeed and spec.stage == 3:
        import deepspeed

        # No optimizer or scheduler: an inference engine (ZeRO-3 parameter partitioning and fetching only).
        config = {k: v for k, v in strategy.config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=reference, config=config, dist_init_required=False)
        return engine.eval()
    if spec.fsdp2:
        from torch.distributed.fsdp import fully_shard

        from litune.strategies.fsdp2 import sharding_units

        kwargs = strategy.fully_shard_kwargs()
        for unit in sharding_units(reference.network):
            fully_shard(unit, **kwargs)
        fully_shard(reference, **kwargs)
        return reference.eval()
    return None
