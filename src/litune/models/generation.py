"""Token-by-token decoding shared by the decoder-only and the encoder-decoder networks.

A network supplies a *step*: given all tokens so far and its key/value cache, it returns the next-token logits and the
updated cache, running only the tokens the cache has not seen. :func:`decode` owns the loop: choosing tokens (greedy or
sampled through Hugging Face's logits warpers), EOS stopping, padding finished rows. With ``use_cache=False`` every
step re-runs the whole prefix, which is what the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from litune.errors import ConfigError

Step = Callable[[torch.Tensor, object | None], tuple[torch.Tensor, object | None]]
"""``step(tokens [N, t], cache) -> (logits [N, vocab] for position t, new cache)``."""

FIELD = "generate"


@contextmanager
def eval_mode(network: torch.nn.Module) -> Iterator[None]:
    """Switch dropout off while generating (a callback may generate mid-training), then restore the mode."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


@dataclass(frozen=True)
class SamplingSettings:
    """How a network generates: the one typed object every ``generate`` takes (validated once, here).

    Args:
        max_length: longest returned row (decoder-only: prompt included; encoder-decoder: target tokens).
        do_sample: sample from the (warped) distribution instead of taking the argmax.
        temperature, top_k, top_p: Hugging Face's sampling warpers (ignored when greedy).
        num_return_sequences: rows per prompt (rows of one prompt are adjacent).
        eos_token_id: a row stops after producing it (or any of a list: a chat model's EOS and end-of-turn token).
        pad_token_id: filler after EOS (default: the (first) ``eos_token_id``).
    """

    max_length: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ConfigError(f"{FIELD}.max_length", f"max_length={self.max_length} must be positive", "use e.g. 64")
        if self.temperature <= 0:
            raise ConfigError(
                f"{FIELD}.temperature",
                f"temperature={self.temperature} must be > 0",
                "use do_sample=false for greedy decoding",
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"{FIELD}.top_k", f"top_k={self.top_k} must be >= 1", "use e.g. 50, or null to disable")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(
                f"{FIELD}.top_p", f"top_p={self.top_p} is outside (0, 1]", "use e.g. 0.9, or null to disable"
            )
        if self.num_return_sequences < 1:
            raise ConfigError(
                f"{FIELD}.num_return_sequences",
                f"num_return_sequences={self.num_return_sequences} must be >= 1",
                "use 1",
            )

    @classmethod
    def of(cls, settings: SamplingSettings | None = None, **fields: Any) -> SamplingSettings:
        """``settings`` itself, or one built from keyword fields (``generate(ids, max_length=20, do_sample=True)``)."""
        if settings is not None and fields:
            raise TypeError(f"give SamplingSettings or its fields, not both ({sorted(fields)})")
        return settings if settings is not None else cls(**fields)

    def warpers(self) -> LogitsProcessorList:
        """The logits warpers of this setting (none when greedy)."""
        return warpers(self.temperature, self.top_k, self.top_p) if self.do_sample else LogitsProcessorList()

    def hf_kwargs(self) -> dict[str, Any]:
        """These settings as keyword arguments of Hugging Face's ``generate``."""
        sampling = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p} if self.do_sample else {}
        return {
            "max_length": self.max_length,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            **sampling,
        }


def warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """Hugging Face's temperature / top-k / top-p warpers, in the order ``transformers`` applies them."""
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        out.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def decode(
    step: Step,
    tokens: torch.Tensor,
    total_length: int,
    sampling: SamplingSettings | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
    **fields: Any,
) -> torch.Tensor:
    """Extend ``tokens`` one token at a time until ``total_length`` or until every row has produced EOS.

    Args:
        step: the network's step function (see :data:`Step`).
        tokens: ``[N, t0]`` the starting tokens (a prompt, or the decoder start token).
        total_length: the longest the returned rows may be (``t0`` included).
        sampling: how tokens are chosen and when rows stop (or its fields as keywords; ``max_length`` defaults to
            ``total_length``); ``max_length`` and ``num_return_sequences`` are the caller's business.
        use_cache: keep the step's key/value cache; False re-runs the whole prefix every step.
        generator: random generator for sampling (reproducible samples); or a list of ``K`` generators, one for
            each of ``K`` equal blocks of consecutive rows (a block's samples then do not depend on which other rows
            share the batch: GRPO seeds each prompt's group of completions on its own).

    Returns:
        ``[N, <= total_length]`` token ids.
    """
    if sampling is None:
        sampling = SamplingSettings.of(**{"max_length": total_length, **fields})
    stops = [sampling.eos_token_id] if isinstance(sampling.eos_token_id, int) else list(sampling.eos_token_id or [])
    pad = sampling.pad_token_id if sampling.pad_token_id is not None else (stops[0] if stops else None)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=tokens.device)
    warp = sampling.warpers()
    finished = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    cache = None
    while tokens.size(1) < total_length:
        logits, new_cache = step(tokens, cache)
        cache = new_cache if use_cache else None
        scores = warp(tokens, logits.float())
        if sampling.do_sample:
            nxt = _sample(torch.softmax(scores, dim=-1), generator)
        else:
            nxt = scores.argmax(dim=-1)
        if stops:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, stop_ids)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if stops and bool(finished.all()):
            break
    return tokens


def _sample(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """``[N]`` one token per row of ``probs [N, vocab]``, drawn with one generator or one per block of rows."""
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if probs.size(0) % len(generator):
        raise ValueError(f"{probs.size(0)} rows do not split into {len(generator)} blocks, one per generator")
    blocks = probs.chunk(len(generator))
    return torch.cat([torch.multinomial(b, 1, generator=g) for b, g in zip(blocks, generator, strict=True)]).squeeze(1)


def generate_causal(
    network: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sampling: SamplingSettings,
    *,
    use_cache: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Generate with a decoder-only network whose forward takes ``past_key_values`` / ``use_cache``.

    Batched prompts must be left-padded (``attention_mask`` 0 on the left), as with Hugging Face models: positions
    count from each row's first real token, and padding is never attended.

    Args:
        network: a causal LM such as :class:`~litune.models.transformer.DecoderLM`.
        input_ids: ``[B, T]`` prompts.
        attention_mask: ``[B, T]`` or None (no padding).
        sampling: the settings (``max_length`` counts the prompt).
        use_cache, generator: see :func:`decode`.

    Returns:
        ``[B * num_return_sequences, <= max_length]``, prompt included.
    """
    input_ids = input_ids.repeat_interleave(sampling.num_return_sequences, dim=0)
    prompt_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        prompt_mask = attention_mask.repeat_interleave(sampling.num_return_sequences, dim=0).long()

    def step(tokens: torch.Tensor, cache: object | None) -> tuple[torch.Tensor, object | None]:
        past = 0 if cache is None else cache[0][0].size(2)
        mask = position_ids = None
        if prompt_mask is not None:
            generated = prompt_mask.new_ones(tokens.size(0), tokens.size(1) - prompt_mask.size(1))
            mask = torch.cat([prompt_mask, generated], dim=1)
            # Like Hugging Face: each row counts positions from its first real token (left padding gets 0).
            position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]
        out = network(
            tokens[:, past:], attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1], out.past_key_values

    with torch.no_grad(), eval_mode(network):
        return decode(step, input_ids, sampling.max_length, sampling, use_cache=use_cache, generator=generator)
