"""Tokenize raw rows into ``input_ids`` (and ``labels`` when only part of a sample carries the loss).

Each function here is a ``datasets.map(batched=True)`` function over a batch of raw rows, using the fast (Rust)
tokenizer's batch call so the whole batch is tokenized in one go.

Formats:
    ``text``: one document per row; EOS appended so documents stay separated once concatenated or packed.
    ``instruction``: a prompt and a response column; the prompt is rendered through a template, and labels are
        ``-100`` on the prompt so the loss is on the response only.
    ``chat``: a ``messages`` list (``{"role", "content"}`` dicts) rendered with the tokenizer's chat template when it
        has one (else ``template`` per turn); labels are ``-100`` on everything but the assistant turns.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX

FORMATS = ("text", "instruction", "chat")

DEFAULT_INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Used for ``instruction`` rows: the prompt part, which gets no loss; the response follows it."""

DEFAULT_CHAT_TURN_TEMPLATE = "<|{role}|>\n{content}\n"
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


def _chat_segments(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str | None
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) segments, trained = an assistant turn's own content.

    With a chat template, the conversation is rendered once per prefix (``apply_chat_template`` on the first k
    turns) and the difference between consecutive renders is the text that turn k added; that keeps the template's
    own markup (role headers, separators) exact without parsing it.
    """
    if template is None and getattr(tokenizer, "chat_template", None):
        segments: list[tuple[str, bool]] = []
        previous = ""
        for k, message in enumerate(messages, start=1):
            rendered = tokenizer.apply_chat_template(messages[:k], tokenize=False)
            if not rendered.startswith(previous):
                raise ConfigError(
                    "data.template",
                    "the tokenizer's chat template re-renders earlier turns when a turn is added, so the assistant "
                    "tokens cannot be located",
                    "set data.template to a per-turn template with {role} and {content}",
                )
            added, previous = rendered[len(previous) :], rendered
            if message["role"] != "assistant":
                segments.append((added, False))
                continue
            content = message["content"] if message["content"] in added else message["content"].strip()
            if content not in added:
                raise ConfigError(
                    "data.template",
                    "the tokenizer's chat template changes the assistant text, so its tokens cannot be located",
                    "set data.template to a per-turn template with {role} and {content}",
                )
            # The turn's closing markup (tail) is trained too: the model must learn to end its turn.
            head, _, tail = added.partition(content)
            segments += [(head, False), (content, True), (tail, True)]
        return segments
    turn = template or DEFAULT_CHAT_TURN_TEMPLATE
    segments = []
    for m in messages:
        head, _, tail = turn.partition("{content}")
        segments += [(head.format(role=m["role"]), False), (m["content"], m["role"] == "assistant")]
        segments.append((tail.format(role=m["role"]), m["role"] == "assistant"))
    return segments


def tokenize_chat(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, messages_column: str, template: str | None = None
) -> dict[str, list]:
    """Tokenize conversations with the loss on the assistant turns only (EOS appended and trained).

    Args:
        batch: raw rows; ``batch[messages_column]`` holds lists of ``{"role": ..., "content": ...}`` dicts.
        tokenizer: a fast tokenizer; its chat template is used when it has one and ``template`` is None.
        messages_column: the column with the conversations.
        template: a per-turn template with ``{role}`` and ``{content}`` used instead of the chat template.

    Returns:
        ``input_ids`` and ``labels`` (``-100`` outside assistant content).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids, labels = [], []
    for messages in batch[messages_column]:
        ids: list[int] = []
        lab: list[int] = []
        for text, trained in _chat_segments(messages, tokenizer, template):
            if not text:
                continue
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            lab += piece if trained else [IGNORE_INDEX] * len(piece)
        input_ids.append(ids + eos)
        labels.append(lab + eos)
    return {"input_ids": input_ids, "labels": labels}


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
