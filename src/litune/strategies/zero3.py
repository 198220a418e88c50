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
:class:`DeferredHFCausalLM` postpones building (and loading) the weights to ``configure_model``, which Lightning runs
inside the strategy's sharded context.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch import nn

from litune.models.hf import build_hf_config, context_length


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


def is_partitioned(parameter: Any) -> bool:
    """Whether a parameter is a ZeRO-3 shard (DeepSpeed attaches ``ds_id``/``ds_numel`` to partitioned parameters)."""
    return hasattr(parameter, "ds_id")


class DeferredHFCausalLM(nn.Module):
    """A :class:`~litune.models.hf.HFCausalLM` whose weights are created in ``LitLM.configure_model``, not at parse.

    ``litune fit`` builds the network when it parses the config, before the strategy exists, so a pretrained model
    would be loaded in full on every rank. This wrapper only reads the model's ``config.json`` then; Lightning calls
    ``configure_model`` inside the strategy's sharded context (``deepspeed.zero.Init`` plus :func:`hf_zero3_context`
    under ZeRO-3), where ``from_pretrained`` loads straight into each rank's shard. Under other strategies it simply
    loads later. Use it in place of ``litune.models.HFCausalLM`` (same arguments) for large pretrained models:

    .. code-block:: yaml

        model:
          network:
            class_path: litune.strategies.zero3.DeferredHFCausalLM
            init_args: {pretrained: meta-llama/Llama-3.1-8B, gradient_checkpointing: true}

    Args:
        pretrained: hub id or local folder (as for ``HFCausalLM``).
        config: Hugging Face config kwargs with ``model_type`` for training from scratch.
        revision: hub revision.
        trust_remote_code: run model code from the hub.
        gradient_checkpointing: recompute activations in the backward pass.
        attn_implementation: attention kernel.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.init_args = {
            "pretrained": pretrained,
            "config": config,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "gradient_checkpointing": gradient_checkpointing,
            "attn_implementation": attn_implementation,
        }
        self.hf_config = build_hf_config(pretrained, config, revision, trust_remote_code)
        self.inner: nn.Module | None = None
        self.built_partitioned: bool | None = None  # whether the weights were born as ZeRO-3 shards

    def configure_model(self) -> None:
        """Build the wrapped network (once; Lightning may call this again, e.g. when loading a checkpoint)."""
        if self.inner is not None:
            return
        from litune.models.hf import HFCausalLM

        self.inner = HFCausalLM(**self.init_args)
        self.built_partitioned = all(is_partitioned(p) for p in self.inner.parameters())

    def _built(self) -> nn.Module:
        if self.inner is None:
            raise RuntimeError("DeferredHFCausalLM is used before configure_model() built it")
        return self.inner

    @property
    def model(self) -> nn.Module:
        """The Hugging Face model (after ``configure_model``)."""
        return self._built().model

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def max_seq_len(self) -> int:
        return context_length(self.hf_config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._built()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._built().generate(*args, **kwargs)

    def flops_per_token(self, seq_len: int) -> float:
        return self._built().flops_per_token(seq_len)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self._built().num_parameters(exclude_embeddings=exclude_embeddings)

    def save_pretrained(self, directory: Any) -> None:
        self._built().save_pretrained(directory)
