"""Tokenize raw rows into ``input_ids`` (and ``labels`` when only part of a sample carries the loss).

Each function here is a ``datasets.map(batched=True)`` function over a batch of raw rows, using the fast (Rust)
tokenizer's batch call so the whole batch is tokenized in one go.

Formats:
    ``text``: one document per row; EOS appended so documents stay separated once concatenated or packed.
    ``instruction``: a prompt and a response column; the prompt is rendered through a template, and labels are
        ``-100`` on the prompt so the loss is on the response only.
    ``chat``: a ``messages`` list (``{"role", "content"}`` dicts) rendered with ``apply_chat_template``: the
        tokenizer's chat template, or ``template`` per turn converted to Jinja; labels are ``-100`` on everything but
        what the assistant says (:func:`chat_tokens`).
"""

from __future__ import annotations

import re
import string

from transformers import PreTrainedTokenizerBase

from litune.data.rows import chat_messages, row_error
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX

FORMATS = ("text", "instruction", "chat")

DEFAULT_INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Used for ``instruction`` rows: the prompt part, which gets no loss; the response follows it."""

DEFAULT_CHAT_TURN_TEMPLATE = "<|{role}|>\n{content}\n"

CHAT_ROW_FIX = (
    'give each row a list of messages such as [{"role": "user", "content": "..."}, {"role": "assistant", '
    '"content": "..."}]'
)
"""Used per chat turn when the tokenizer has no chat template; assistant turns carry the loss."""


def tokenize_text(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, text_column: str, append_eos: bool = True
) -> dict[str, list]:
    """Tokenize a batch of documents, dropping empty or whitespace-only ones (they would become a lone EOS).

    Args:
        batch: raw rows; ``batch[text_column]`` is a list of strings.
        tokenizer: a fast tokenizer.
        text_column: the column holding the text.
        append_eos: add the EOS id after every document (the separator once documents are concatenated).

    Returns:
        ``{"input_ids": list[list[int]]}``.
    """
    # Dropped here rather than by a separate filter pass: a filter leaves an indices mapping that slows every later
    # pass, and this map removes all input columns, so it may return fewer rows.
    texts = [t for t in batch[text_column] if t and not t.isspace()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # (it fails on an empty list)
    if append_eos and tokenizer.eos_token_id is not None:
        ids = [x + [tokenizer.eos_token_id] for x in ids]
    return {"input_ids": ids}


def tokenize_instruction(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    prompt_column: str,
    response_column: str,
    template: str = DEFAULT_INSTRUCTION_TEMPLATE,
) -> dict[str, list]:
    """Tokenize prompt/response pairs with the loss on the response (and its EOS) only.

    Prompt and response are tokenized separately and joined, so the boundary between them is exact (tokenizing the
    joined string could merge the last prompt token with the first response token).

    Returns:
        ``input_ids`` and ``labels`` (``-100`` on the prompt tokens).
    """
    prompts = tokenizer([template.format(prompt=p) for p in batch[prompt_column]], add_special_tokens=False)
    responses = tokenizer(list(batch[response_column]), add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids, labels = [], []
    for p, r in zip(prompts["input_ids"], responses["input_ids"], strict=True):
        input_ids.append(p + r + eos)
        labels.append([IGNORE_INDEX] * len(p) + r + eos)
    return {"input_ids": input_ids, "labels": labels}


GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
"""A chat template's ``{% generation %}`` block marks the assistant's own tokens (``return_assistant_tokens_mask``)."""

EMPTY_REASONING = re.compile(r"<(think|thinking|reasoning)>\s*</\1>\s*")
"""An empty reasoning block that templates insert before an answer (Qwen3 writes ``<think>\\n\\n</think>\\n\\n``): it
teaches the model nothing and is never trained on."""


def has_generation_markers(template: str | None) -> bool:
    """Whether a Jinja chat template marks the assistant's tokens with ``{% generation %}`` blocks."""
    return bool(template) and GENERATION_MARKER.search(template) is not None


def turn_template_to_jinja(turn: str = DEFAULT_CHAT_TURN_TEMPLATE) -> str:
    """A per-turn template (``{role}``, ``{content}``, Python format syntax) as the equivalent Jinja chat template.

    Each turn is ``turn`` with the message filled in; an assistant turn's content and the text after it are inside a
    ``{% generation %}`` block (so the assistant mask is the template's own), and ``add_generation_prompt`` writes the
    assistant turn's head. Literal text goes through ``{% raw %}``, so braces and Jinja syntax in it stay text.

    Raises:
        ConfigError: the template has fields other than ``role`` and ``content``, or no ``{content}``.
    """
    head: list[str] = []
    tail: list[str] = []
    part = head
    for literal, field, spec, conversion in string.Formatter().parse(turn):
        if "{% endraw %}" in literal:
            raise ConfigError("data.init_args.template", "the turn template contains '{% endraw %}'", "remove it")
        if literal:
            part.append("{% raw %}" + literal + "{% endraw %}")
        if field is None:
            continue
        if field not in ("role", "content") or spec or conversion:
            raise ConfigError(
                "data.init_args.template",
                f"{turn!r} has the field {{{field}}}",
                "use only {role} and {content} in a chat turn",
            )
        if field == "role":
            part.append("{{ m['role'] }}")
        elif part is tail:
            raise ConfigError("data.init_args.template", f"{turn!r} has {{content}} twice", "use {content} once")
        else:
            part = tail
    if part is head:
        raise ConfigError(
            "data.init_args.template", f"{turn!r} has no {{content}}", "put {content} where a message's text goes"
        )
    h, t = "".join(head), "".join(tail)
    return (
        "{% for m in messages %}" + h + "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}" + t
        + "{% endgeneration %}{% else %}{{ m['content'] }}" + t + "{% endif %}{% endfor %}"
        + "{% if add_generation_prompt %}" + h.replace("{{ m['role'] }}", "assistant") + "{% endif %}"
    )  # fmt: skip


def chat_template_of(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> str:
    """The Jinja chat template a chat run renders with: ``template`` (a per-turn template) converted, else the
    tokenizer's own, else litune's default turn template converted."""
    if template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    return turn_template_to_jinja(template or DEFAULT_CHAT_TURN_TEMPLATE)


def _prefix_spans(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, chat_template: str
) -> list[tuple[int, int]]:
    """Character spans of the assistant's text in the rendered conversation, for a template without generation
    markers: the conversation is rendered once per prefix (the first k turns) and the difference between consecutive
    renders is the text turn k added; that keeps the template's own markup exact without parsing it. An assistant
    turn's span runs from its content to the end of the text the turn added (its closing markup: the model must
    learn to end its turn)."""
    spans: list[tuple[int, int]] = []
    previous = ""
    for k, message in enumerate(messages, start=1):
        rendered = tokenizer.apply_chat_template(messages[:k], chat_template=chat_template, tokenize=False)
        if not rendered.startswith(previous):
            raise ConfigError(
                "data.init_args.template",
                "the tokenizer's chat template re-renders earlier turns when a turn is added, so the assistant "
                "tokens cannot be located",
                "set data.template to a per-turn template with {role} and {content}, or use a chat template with "
                "{% generation %} markers",
            )
        added = rendered[len(previous) :]
        if message["role"] == "assistant":
            content = message["content"] if message["content"] in added else message["content"].strip()
            if content not in added:
                raise ConfigError(
                    "data.init_args.template",
                    "the tokenizer's chat template changes the assistant text, so its tokens cannot be located",
                    "set data.template to a per-turn template with {role} and {content}, or use a chat template "
                    "with {% generation %} markers",
                )
            spans.append((len(previous) + added.rindex(content), len(rendered)))
        previous = rendered
    return spans


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span, else 0: the rule ``apply_chat_template`` applies to generation blocks."""
    return [int(any(end > s and start < e for s, e in spans)) for start, end in offsets]


def chat_tokens(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str | None = None
) -> tuple[list[int], list[int]]:
    """Render one conversation with ``apply_chat_template`` and mark the tokens the assistant says.

    The mask comes from the template's ``{% generation %}`` blocks when it has them, else from rendering the
    conversation prefix by prefix (:func:`_prefix_spans`); both mark every token overlapping the assistant's text,
    so a template and its copy without markers give the same mask. Tokens of an empty reasoning block
    (:data:`EMPTY_REASONING`) are never marked.

    Args:
        messages: ``{"role", "content"}`` dicts.
        tokenizer: a fast tokenizer (offsets are needed).
        template: a per-turn template used instead of the tokenizer's chat template (see :func:`chat_template_of`).

    Returns:
        ``(input_ids, mask)``: the rendered tokens (no EOS appended) and 1 on the assistant's tokens.
    """
    chat_template = chat_template_of(tokenizer, template)
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    if has_generation_markers(chat_template):
        out = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        if list(out["input_ids"]) != list(ids):
            raise RuntimeError("apply_chat_template tokenized the rendered conversation differently")  # a bug
        mask = list(out["assistant_masks"])
    else:
        mask = _tokens_in_spans(offsets, _prefix_spans(messages, tokenizer, chat_template))
    for match in EMPTY_REASONING.finditer(text):
        for i, (start, end) in enumerate(offsets):
            if start >= match.start() and end <= match.end():
                mask[i] = 0
    return ids, mask


def tokenize_chat(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, messages_column: str, template: str | None = None
) -> dict[str, list]:
    """Tokenize conversations with the loss on the assistant's tokens only (EOS appended and trained).

    Args:
        batch: raw rows; ``batch[messages_column]`` holds lists of ``{"role": ..., "content": ...}`` dicts.
        tokenizer: a fast tokenizer; its chat template is used when it has one and ``template`` is None.
        messages_column: the column with the conversations.
        template: a per-turn template with ``{role}`` and ``{content}`` used instead of the chat template.

    Returns:
        ``input_ids`` and ``labels`` (``-100`` outside the assistant's tokens, see :func:`chat_tokens`).
    """
    eos = tokenizer.eos_token_id
    input_ids, labels = [], []
    for messages in batch[messages_column]:
        if (problem := chat_messages(messages)) is not None:  # a stream's rows are seen only here
            raise row_error(
                "data.init_args.messages_column", "a row of the stream", messages_column, problem, CHAT_ROW_FIX
            )
        ids, mask = chat_tokens(messages, tokenizer, template)
        lab = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        if eos is not None and (not ids or ids[-1] != eos):  # the template may end the conversation with EOS itself
            ids, lab = ids + [eos], lab + [eos]
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels}


def chat_stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> list[int]:
    """The tokens a chat fine-tune learns to stop at: EOS (appended to every conversation and trained), and the
    special token that closes an assistant turn in the chat template, when there is one (``<|im_end|>``,
    ``<|eot_id|>``...: it is the first trained token after the assistant's text).

    Found by rendering a probe conversation, so it holds for any template.
    """
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        ids, mask = chat_tokens(probe, tokenizer, template)
    except (ConfigError, ValueError, TypeError):  # templates that demand a system turn, tools...: EOS only
        return stops
    text_ids = tokenizer(probe[1]["content"], add_special_tokens=False)["input_ids"]
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    closing = trained[len(text_ids) :][:1] if trained[: len(text_ids)] == text_ids else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return stops + [t for t in closing if t in special and t not in stops]


def tokenize_pairs(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    source_column: str,
    target_column: str,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list]:
    """Tokenize source/target pairs for an encoder-decoder: ``input_ids`` from the source, ``labels`` the target.

    The source is encoded as ``litune generate`` encodes a prompt (default special tokens); the target gets EOS
    appended so the network learns where to stop.

    Args:
        batch: raw rows with the two text columns.
        tokenizer: a fast tokenizer with an EOS token.
        source_column: the column holding the source text.
        target_column: the column holding the target text.
        max_source_length: longer sources are truncated to this many tokens.
        max_target_length: longer targets are truncated to this many tokens (EOS included).
    """
    eos = tokenizer.eos_token_id
    src = tokenizer(batch[source_column], truncation=True, max_length=max_source_length)
    tgt = tokenizer(batch[target_column], add_special_tokens=False)["input_ids"]
    labels = [t[: max_target_length - 1] + [eos] for t in tgt]
    return {"input_ids": src["input_ids"], "labels": labels}
