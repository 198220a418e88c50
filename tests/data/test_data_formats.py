"""Instruction and chat formats: the loss is on the response / assistant tokens only (labels -100 on the prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from litune.data.text import TextDataModule
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune_testing import make_dm, make_tokenizer, sentences

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def trained_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("layout", ["pad", "pack"])
def test_instruction_loss_on_response_only(tmp_path: Path, layout: str) -> None:
    prompts, responses = sentences(30, seed=3), sentences(30, seed=4)
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps({"q": p, "a": r}) for p, r in zip(prompts, responses, strict=True)))
    dm = make_dm(
        tmp_path,
        str(f),
        format="instruction",
        prompt_column="q",
        response_column="a",
        layout=layout,
        block_size=256,
        val_fraction=0.0,
        document_mask=layout == "pack",
    )
    dm.setup("fit")
    tok = dm.tokenizer
    eos = tok.eos_token
    trained = "".join(trained_text(tok, r["input_ids"], r["labels"]) for r in dm.train_set)
    for r in responses:
        assert r + eos in trained
    for p in prompts:
        assert p not in trained  # prompts are seen, never trained on
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"][batch["attention_mask"].bool()] == IGNORE_INDEX).any()  # prompt tokens masked
    if layout == "pad":
        row = dm.train_set[0]
        text = tok.decode(row["input_ids"])
        assert text.startswith("### Instruction:\n") and "\n\n### Response:\n" in text


def test_instruction_custom_template(tmp_path: Path) -> None:
    f = tmp_path / "inst.jsonl"
    f.write_text(
        json.dumps({"prompt": "two plus two", "response": "four"})
        + "\n"
        + json.dumps({"prompt": "one", "response": "two"})
    )
    dm = make_dm(
        tmp_path,
        str(f),
        format="instruction",
        template="Q: {prompt}\nA: ",
        layout="pad",
        block_size=64,
        val_fraction=0.0,
        shuffle=False,
    )
    dm.setup("fit")
    tok = dm.tokenizer
    texts = sorted(tok.decode(r["input_ids"]) for r in dm.train_set)
    assert texts == ["Q: one\nA: two" + tok.eos_token, "Q: two plus two\nA: four" + tok.eos_token]


def _chat_rows() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": "the fox"},
                {"role": "assistant", "content": "jumps over a dog"},
                {"role": "user", "content": "and the cat"},
                {"role": "assistant", "content": "sits on mats"},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "birds sing"},
                {"role": "user", "content": "quick"},
                {"role": "assistant", "content": "lazy dog"},
            ]
        },
    ]


def test_chat_without_template_uses_the_turn_template(tmp_path: Path) -> None:
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in _chat_rows()))
    dm = make_dm(tmp_path, str(f), format="chat", layout="pad", block_size=128, val_fraction=0.0)
    dm.setup("fit")
    tok = dm.tokenizer
    assert not getattr(tok, "chat_template", None)
    rows = {tok.decode(r["input_ids"]): trained_text(tok, r["input_ids"], r["labels"]) for r in dm.train_set}
    full = "<|user|>\nthe fox\n<|assistant|>\njumps over a dog\n<|user|>\nand the cat\n<|assistant|>\nsits on mats\n"
    assert rows[full + tok.eos_token] == "jumps over a dog\nsits on mats\n" + tok.eos_token


def test_chat_with_the_tokenizers_chat_template(tmp_path: Path) -> None:
    folder = tmp_path / "tok-with-template"
    tok = make_tokenizer(tmp_path).load()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in _chat_rows()))
    dm = TextDataModule(
        str(folder),
        path=str(f),
        format="chat",
        layout="pad",
        block_size=128,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    tok = dm.tokenizer
    rows = {tok.decode(r["input_ids"]): trained_text(tok, r["input_ids"], r["labels"]) for r in dm.train_set}
    rendered = tok.apply_chat_template(_chat_rows()[1]["messages"], tokenize=False)
    assert rendered == "<|system|>birds sing<|end|>\n<|user|>quick<|end|>\n<|assistant|>lazy dog<|end|>\n"
    assert rows[rendered + tok.eos_token] == "lazy dog<|end|>\n" + tok.eos_token


def test_missing_instruction_column(tmp_path: Path) -> None:
    f = tmp_path / "inst.jsonl"
    f.write_text(json.dumps({"prompt": "a", "answer": "b"}))
    dm = make_dm(tmp_path, str(f), format="instruction")
    with pytest.raises(ConfigError, match="'response' is not in") as err:
        dm.prepare_data()
    assert err.value.field == "data.init_args.response_column" and "answer" in err.value.fix


def test_chat_template_that_rewrites_earlier_turns_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "tok-bad-template"
    tok = make_tokenizer(tmp_path).load()
    # numbers each turn from the end: adding a turn changes the text of every earlier one
    tok.chat_template = "{% for m in messages %}[{{ loop.revindex }}]{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(folder)
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in _chat_rows()))
    dm = TextDataModule(str(folder), path=str(f), format="chat", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="re-renders earlier turns") as err:
        dm.prepare_data()
    assert err.value.field == "data.init_args.template"


def test_template_must_fit_the_format() -> None:
    with pytest.raises(ConfigError, match="is not a template for format 'instruction'"):
        TextDataModule("gpt2", path="stdlib", format="instruction", template="Q: {question}")
    with pytest.raises(ConfigError, match="for format 'text'"):
        TextDataModule("gpt2", path="stdlib", template="{prompt}")
