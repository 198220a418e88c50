"""ZeRO-3 and Hugging Face models: load pretrained weights straight into partitioned parameters.

Under ZeRO-3 each rank keeps only its shard of every parameter. A network built in ``LightningModule.configure_model``
runs inside the strategy's ``deepspeed.zero.Init``, so new parameters are partitioned as they are created; but
``from_pretrained`` would then copy the checkpoint into empty shards unless ``transformers`` knows ZeRO-3 is on. When it
does, it builds the model under its own ``zero.Init`` and loads each tensor with ``GatheredParameters`` (only rank 0
writes), so no rank ever holds the whole model.

``transformers`` learns that ZeRO-3 is on from a global weak reference to an ``HfDeepSpeedConfig``. That class needs
the ``accelerate`` package, which litune does not otherwise depend on; when it is missing we register a minimal object
with the two things ``transformers`` reads (``is_zero3()`` and ``config``) through its public
``set_hf_deepspeed_config`` hook.

``litune fit`` builds the configured network while it parses the config, before any strategy exists;
:class:`litune.models.DeferredHFCausalLM` postpones building (and loading) the weights to ``configure_model``, which
Lightning runs inside the strategy's sharded context.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

__all__ = ["hf_zero3_context"]


class _ZeRO3Marker:
    """What ``transformers.integrations.deepspeed`` reads from its registered DeepSpeed config."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return self.config.get("zero_optimization", {}).get("stage") == 3


@contextmanager
def hf_zero3_context(config: dict[str, Any] | None) -> Generator[None, None, None]:
    """Make ``transformers`` load models partitioned under ZeRO-3 while the context is open.

    Args:
        config: the DeepSpeed config dict of a ZeRO-3 run, or None (then the context does nothing).
    """
    if config is None:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    if importlib.util.find_spec("accelerate") is not None:
        marker: object = hf_deepspeed.HfDeepSpeedConfig(config)  # registers itself
    else:
        marker = _ZeRO3Marker(config)
        hf_deepspeed.set_hf_deepspeed_config(marker)
    try:
        yield
    finally:
        # Only while the model is being built: afterwards the engine owns the parameters, and leaving ZeRO-3 on would
        # make later unrelated `from_pretrained` calls (e.g. in export) partition their models too.
        del marker
        hf_deepspeed.unset_hf_deepspeed_config()
