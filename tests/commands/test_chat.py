"""Chat templates: masks from generation markers or prefix rendering agree, empty reasoning blocks are not trained,
an all-masked batch is refused, and an exported chat fine-tune stops at the end of its turn."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from litune.data.formats import (
    chat_stop_token_ids,
    chat_tokens,
    has_generation_markers,
    tokenize_chat,
    turn_template_to_jinja,
)
from litune.errors import ConfigError
from litune.models.output import IGNORE_INDEX
from litune_testing import LITUNE, NETWORK, TINY, check_ok, litune_env, make_tokenizer
from test_objective import python_fit, tiny_system

# ChatML (Qwen's scheme), once with {% generation %} markers around what the assistant says and once without.
CHATML_BODY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_PLAIN = CHATML_BODY.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# The wrong mask: markers around the content only, so the end-of-turn token is not learned.
CHATML_CONTENT_ONLY = CHATML_PLAIN.replace("{{ m['content'] }}<|im_end|>{% else", "{% generation %}{{ m['content'] }}"
                                           "{% endgeneration %}<|im_end|>{% else")  # fmt: skip
# Qwen3-style: an empty reasoning block before every answer, inside what the assistant says.
ASSISTANT = "{% if m['role'] == 'assistant' %}"
THINKING = CHATML_PLAIN.replace(ASSISTANT, ASSISTANT + "<think>\n\n</think>\n\n")

CONVERSATIONS = [
    [
        {"role": "system", "content": "the quick fox"},
        {"role": "user", "content": "jumps over"},
        {"role": "assistant", "content": "the lazy dog"},
        {"role": "user", "content": "and the cat"},
        {"role": "assistant", "content": "sits on mats quick"},
    ],
    [{"role": "user", "content": "fox"}, {"role": "assistant", "content": " dog, lazy "}],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    tok = make_tokenizer(tmp_path_factory.mktemp("chat-tok")).load()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _masks(tok, template: str) -> list[tuple[list[int], list[int]]]:
    tok.chat_template = template
    return [chat_tokens(c, tok) for c in CONVERSATIONS]


def test_prefix_rendering_gives_the_masks_of_generation_markers(chat_tokenizer) -> None:
    assert has_generation_markers(CHATML_BODY) and not has_generation_markers(CHATML_PLAIN)
    marked, plain = _masks(chat_tokenizer, CHATML_BODY), _masks(chat_tokenizer, CHATML_PLAIN)
    assert marked == plain
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, mask = marked[0]
    said = chat_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert said == "the lazy dog<|im_end|>sits on mats quick<|im_end|>"
    assert sum(m for t, m in zip(ids, mask, strict=True) if t == im_end) == 2  # assistant turns' ends, not the user's
    # Teeth: a mask that leaves out the end-of-turn token is a different mask.
    assert _masks(chat_tokenizer, CHATML_CONTENT_ONLY) != marked


def test_turn_template_renders_through_apply_chat_template(chat_tokenizer) -> None:
    jinja = turn_template_to_jinja("[{role}] {content} {{x}}\n")
    rendered = chat_tokenizer.apply_chat_template(CONVERSATIONS[1], chat_template=jinja, tokenize=False)
    assert rendered == "[user] fox {x}\n[assistant]  dog, lazy  {x}\n"
    prompt = chat_tokenizer.apply_chat_template(
        CONVERSATIONS[1][:1], chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    assert prompt == "[user] fox {x}\n[assistant] "
    with pytest.raises(ConfigError, match="field {name}"):
        turn_template_to_jinja("{name}: {content}")


def test_empty_reasoning_blocks_are_not_trained(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = THINKING
    ids, mask = chat_tokens(CONVERSATIONS[0], chat_tokenizer)
    said = chat_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "<think>" in chat_tokenizer.decode(ids)
    assert said == "the lazy dog<|im_end|>sits on mats quick<|im_end|>"


def test_stop_tokens_are_eos_and_the_end_of_turn(chat_tokenizer) -> None:
    chat_tokenizer.chat_template = CHATML_BODY
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_stop_token_ids(chat_tokenizer) == [chat_tokenizer.eos_token_id, im_end]
    chat_tokenizer.chat_template = turn_template_to_jinja()  # ends a turn with "\n": EOS only
    assert chat_stop_token_ids(chat_tokenizer) == [chat_tokenizer.eos_token_id]


def test_a_step_without_a_target_token_is_refused(chat_tokenizer) -> None:
    """Through the real Trainer: the second optimizer step's batches carry only masked labels (a chat row without an
    assistant turn, EOS unmasked by hand): the run stops before training on it, naming the cause."""
    chat_tokenizer.chat_template = CHATML_PLAIN
    rows = tokenize_chat({"m": [[{"role": "user", "content": "fox"}]]}, chat_tokenizer, "m")
    ids = torch.tensor(rows["input_ids"][0]) % 64  # within tiny_system's vocabulary
    assert all(label == IGNORE_INDEX for label in rows["labels"][0][:-1])  # only the appended EOS is a target
    good = [{"input_ids": ids, "labels": ids.clone()}] * 2
    masked = [{"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}] * 2
    system = tiny_system()
    with pytest.raises(ConfigError, match="batches 1..1 of this step have no trainable target token") as err:
        python_fit(system, good[:1] + masked, batch_size=1, accumulate=1, steps=3)
    assert err.value.field == "data" and system.trainer.global_step == 1
    python_fit(tiny_system(), good + masked, batch_size=2, accumulate=2, steps=1)  # a masked micro-batch is fine


def _chat_file(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]}] * n
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.slow
def test_exported_chat_fine_tune_stops_at_its_end_of_turn(tmp_path: Path, tokenizer_dir: Path) -> None:
    """Trains a tiny chat model on one conversation, exports it, and checks both `litune generate --chat` and plain
    transformers stop after the reply (the run's tokenizer carries the chat template and the stop tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_PLAIN
    tok.save_pretrained(tok_dir)
    fit = [
        LITUNE, "fit", "--config", str(TINY), f"--model.tokenizer={tok_dir}",
        f"--model.network.init_args.config={json.dumps({**NETWORK, 'vocab_size': len(tok)})}",
        f"--data.init_args.path={_chat_file(tmp_path / 'chat.jsonl', 64)}", "--data.init_args.format=chat",
        "--data.init_args.layout=pad", "--data.init_args.val_fraction=0", "--trainer.limit_val_batches=0",
        "--trainer.max_steps=40", "--model.optimizer.init_args.lr=1e-2", f"--runs_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    check_ok(subprocess.run(fit, env=litune_env(), capture_output=True, text=True, timeout=600), "litune fit")
    (run,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "hf"
    export = [LITUNE, "export", "--checkpoint", str(run), "--output", str(out)]
    check_ok(subprocess.run(export, env=litune_env(), capture_output=True, text=True, timeout=300), "litune export")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_PLAIN
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id, im_end]

    gen = [LITUNE, "generate", "--checkpoint", str(out), "--chat", "--prompt", "say hi", "--max-length", "60"]
    proc = subprocess.run(gen, env=litune_env(), capture_output=True, text=True, timeout=300)
    check_ok(proc, "litune generate --chat")
    assert proc.stdout.split("--- sequence 0 ---\n", 1)[1].strip() == "hi there"

    model, hf_tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": "say hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    tokens = model.generate(**prompt, max_length=60, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert hf_tok.decode(tokens) == "hi there<|im_end|>"  # stopped at the end of its turn, long before max_length
