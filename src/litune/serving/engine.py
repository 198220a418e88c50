"""Batched, streamed text generation for ``litune serve`` and ``litune chat``.

:func:`litune.models.generation.decode` generates a whole batch with one set of sampling settings and returns when all
rows are done. A server needs more: every row of a batch is a different request with its own ``max_tokens``,
temperature, ``top_p``, seed and stop strings, and its text must leave as it is made (streaming). :func:`stream`
therefore runs its own token loop over the same network forward (left-padded prompts and a key/value cache, as
:func:`~litune.models.generation.generate_causal` does) and reuses Hugging Face's logits warpers per row
(:func:`~litune.models.generation.warpers`). Greedy rows take the argmax of the same logits as ``litune generate``, so
their tokens are the same.
"""

from __future__ import annotations

import functools
import inspect
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from litune.errors import ConfigError
from litune.models.generation import eval_mode, warpers


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings.

    Args:
        max_tokens: most new tokens (the reply ends with ``finish_reason="length"`` there).
        temperature: 0 is greedy decoding (the argmax, as ``litune generate`` without ``--do-sample``); above 0
            samples from the logits divided by it.
        top_p: nucleus sampling mass (1 keeps every token).
        seed: seeds this request's own random generator, so the same request gives the same text; None: random.
        stop: strings that end the reply (not included in it, ``finish_reason="stop"``).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    """What one row produced in one step: new text (maybe empty), and on its last step why it ended."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Row:
    """Decoding state of one request: its tokens so far, the text already sent, its random generator."""

    sampling: Sampling
    prompt_tokens: int
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    done: bool = False


def context_length(network: torch.nn.Module) -> int | None:
    """The longest sequence the network handles (prompt and reply together); None if it does not say."""
    return getattr(network, "max_seq_len", None)


def stop_token_ids(tokenizer: object, network: torch.nn.Module | None = None) -> set[int]:
    """Token ids that end a reply: what a chat fine-tune learns to stop at (EOS and the template's end-of-turn token,
    :func:`litune.data.formats.chat_stop_token_ids`) and the model's ``generation_config.eos_token_id`` (one id or a
    list, as ``litune export`` writes it)."""
    from litune.data.formats import chat_stop_token_ids

    ids = set(chat_stop_token_ids(tokenizer))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(getattr(network, "model", None), "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    if extra is not None:
        ids.update(int(i) for i in ([extra] if isinstance(extra, int) else extra))
    return ids


def render_chat(tokenizer: object, messages: list[dict[str, str]]) -> str:
    """The prompt text of a conversation, ending where the assistant's reply starts (``add_generation_prompt``).

    Rendered with the template a chat fine-tune trains with (:func:`litune.data.formats.chat_template_of`): the
    tokenizer's own chat template, else litune's default turn template (``<|role|>\ncontent\n``), so a model
    trained with either is talked to in the format it learned.
    """
    from litune.data.formats import chat_template_of

    template = chat_template_of(tokenizer)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: object, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt, as ``litune generate`` encodes it; an empty prompt starts from BOS (or EOS).

    A rendered chat already holds the template's special tokens, so none are added to it.
    """
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids)


def _step_model(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward takes ``past_key_values``: the Hugging Face model inside an ``HFCausalLM``, else the
    network itself (litune's ``DecoderLM``)."""
    from litune.models.hf import HFCausalLM

    if isinstance(network, HFCausalLM):
        return network.model
    if getattr(network, "is_encoder_decoder", False) or type(network).__name__ == "Seq2SeqLM":
        raise ConfigError(
            "--checkpoint",
            f"{type(network).__name__} is an encoder-decoder network; serving and chat need a decoder-only model",
            "use `litune generate` for sequence-to-sequence checkpoints",
        )
    return network


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(
    model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: object
) -> tuple[torch.Tensor, object]:
    """One cached forward: ``tokens [N, t]`` not yet in ``cache``, ``mask [N, past + t]``, ``position_ids [N, t]`` ->
    (last-position logits ``[N, vocab]``, updated cache).

    transformers >= 5.25 names the cache argument and output ``cache``, earlier releases and litune's ``DecoderLM``
    ``past_key_values``.
    """
    name = _cache_argument(type(model))
    out = model(tokens, attention_mask=mask, position_ids=position_ids, use_cache=True, **{name: cache})
    return out.logits[:, -1], getattr(out, name)


def _cache_length(cache: object) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].size(2))


def _select_rows(cache: object, keep: torch.Tensor) -> object:
    """The key/value cache of the rows ``keep`` only (finished rows leave the batch)."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
        return cache
    return tuple(tuple(t[keep] for t in layer) for layer in cache)


def _pick(logits: torch.Tensor, tokens: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
    """Next token per row: ``logits [N, vocab]``, ``tokens [N, t]`` -> ``[N]``; greedy rows take the argmax, the others
    sample (temperature, top-p) with their own generator."""
    nxt = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        s = row.sampling
        if s.temperature == 0:
            continue
        scores = warpers(s.temperature, None, s.top_p)(tokens[i : i + 1], logits[i : i + 1].float())
        nxt[i] = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator)[0, 0]
    return nxt


def _new_text(tokenizer: object, row: _Row, final: bool) -> tuple[str, bool]:
    """Text of ``row`` not sent yet, and whether a stop string ended it.

    The whole reply is decoded each time (byte-level BPE tokens may split a character, so a token's text alone can be
    wrong); an unfinished character (U+FFFD at the end) and a tail that could still grow into a stop string are held
    back until more tokens come, so streamed pieces join to exactly the non-streamed text.
    """
    text = tokenizer.decode(row.ids, skip_special_tokens=True)
    stops = [text.find(s, max(0, row.sent - len(s) + 1)) for s in row.sampling.stop]
    hits = [i for i in stops if i >= 0]
    if hits:
        return text[row.sent : min(hits)], True
    end = len(text)
    if not final:
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for s in row.sampling.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
    end = max(end, row.sent)
    return text[row.sent : end], False


@torch.no_grad()
def stream(
    network: torch.nn.Module,
    tokenizer: object,
    prompts: list[list[int]],
    settings: list[Sampling],
    stop_ids: set[int] | None = None,
) -> Iterator[list[Delta | None]]:
    """Generate replies to several prompts at once, yielding one list per step: a :class:`Delta` per row (``None``
    for a row that already ended).

    Prompts are left-padded into ``[N, P]``; positions count from each row's first real token and padding is never
    attended, so a row gets the tokens it would get alone. A row ends at a stop token (EOS; the token is not part of
    the text), at a stop string, or after ``max_tokens``; finished rows leave the batch and its cache.

    Args:
        network: a decoder-only litune network (``HFCausalLM``, ``DecoderLM``), on its device.
        tokenizer: its tokenizer (decodes the replies).
        prompts: token ids of each prompt (non-empty).
        settings: one :class:`Sampling` per prompt.
        stop_ids: token ids that end a reply (default: :func:`stop_token_ids`).
    """
    stop_ids = stop_token_ids(tokenizer, network) if stop_ids is None else stop_ids
    model = _step_model(network)
    device = next(network.parameters()).device
    rows = [
        _Row(s, len(p), torch.Generator(device).manual_seed(secrets.randbits(62) if s.seed is None else s.seed))
        for p, s in zip(prompts, settings, strict=True)
    ]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    active = list(range(len(rows)))  # rows still in the batch, in batch order
    cache = None
    with eval_mode(network):
        while active:
            past = _cache_length(cache)
            position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]
            logits, cache = _forward(model, tokens[:, past:], mask, position_ids, cache)
            nxt = _pick(logits, tokens, [rows[i] for i in active]).tolist()
            deltas: list[Delta | None] = [None] * len(rows)
            for token, i in zip(nxt, active, strict=True):
                deltas[i] = _advance(tokenizer, rows[i], token, stop_ids)
            yield deltas
            keep = [b for b, i in enumerate(active) if not rows[i].done]
            if not keep:
                return
            nxt_col = torch.tensor(nxt, device=device)[:, None]
            tokens = torch.cat([tokens, nxt_col], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt_col)], dim=1)
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                tokens, mask, cache = tokens[index], mask[index], _select_rows(cache, index)
                active = [active[b] for b in keep]


def _advance(tokenizer: object, row: _Row, token: int, stop_ids: set[int]) -> Delta:
    """Add ``token`` to ``row`` and return the text it releases (and the finish reason when the row ends)."""
    finish = None
    if token in stop_ids:
        finish = "stop"
    else:
        row.ids.append(token)
    text, stopped = _new_text(tokenizer, row, final=finish is not None or len(row.ids) >= row.sampling.max_tokens)
    if stopped:
        finish = "stop"
    elif finish is None and len(row.ids) >= row.sampling.max_tokens:
        finish = "length"
    row.sent += len(text)
    row.done = finish is not None
    return Delta(text, finish, row.prompt_tokens, len(row.ids) + (token in stop_ids))


def complete(
    network: torch.nn.Module, tokenizer: object, prompt: list[int], sampling: Sampling
) -> tuple[str, str | None]:
    """The whole reply to one prompt and its finish reason (non-streaming :func:`stream`)."""
    text, finish = [], None
    for (delta,) in stream(network, tokenizer, [prompt], [sampling]):
        text.append(delta.text)
        finish = delta.finish_reason
    return "".join(text), finish


def load_model(checkpoint: str, device: str) -> tuple[torch.nn.Module, object]:
    """Network and tokenizer of a run folder, ``.ckpt``, Hugging Face folder/hub id, merged export or adapter folder,
    as ``litune generate`` loads them, on ``device`` in eval mode."""
    from litune.commands.generate import load_for_generation

    if not Path(checkpoint).exists() and (checkpoint.startswith((".", "/")) or checkpoint.endswith(".ckpt")):
        raise ConfigError("--checkpoint", f"{checkpoint} does not exist", "give a run folder, .ckpt or model folder")
    network, tokenizer = load_for_generation(checkpoint)
    _step_model(network)
    return network.to(device).eval(), tokenizer
