"""``litune serve`` (OpenAI-compatible, on LitServe), its chat page and ``litune chat``, on a real tiny model.

One server process serves the whole module (start-up is most of the cost). Every expected reply is computed in the test
process with the network's own ``generate`` (what ``litune generate`` runs), so a server that decodes differently,
mixes up batch rows, ignores EOS or a stop string fails. Nothing is mocked; the browser test drives Debian's real
headless Chromium.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from litune.data.formats import chat_template_of
from litune.serving import engine
from litune_testing import LITUNE, litune_env

CONTEXT = 128
EOS_PROMPT = "class A"


def greedy(network: torch.nn.Module, tokenizer, ids: list[int], max_tokens: int) -> tuple[list[int], bool]:
    """``litune generate``'s greedy decoding (``network.generate``): the new tokens up to EOS, and whether EOS came."""
    out = network.generate(
        torch.tensor([ids]),
        max_length=len(ids) + max_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in out:
        return out[: out.index(tokenizer.eos_token_id)], True
    return out, False


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 whose greedy continuations depend on the context (init std 0.2, not GPT-2's 0.02, which
    repeats one token), context 128, with litune's default chat template. Its tokenizer's EOS is a token that greedy
    decoding of ``EOS_PROMPT`` produces after a few others, so the EOS test has an EOS to stop at."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("serve-model")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT, vocab_size=512, initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    network, tokenizer = engine.load_model(str(folder), "cpu")
    ids = engine.encode_prompt(tokenizer, EOS_PROMPT)
    out, _ = greedy(network, tokenizer, ids, 16)
    k = next(i for i in range(3, len(out)) if out[i] not in out[:i])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(out[k])
    tokenizer.chat_template = chat_template_of(tokenizer)  # litune's default turn template, as a chat run keeps it
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir: Path) -> tuple[torch.nn.Module, object]:
    return engine.load_model(str(model_dir), "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``litune serve`` on a free port of 127.0.0.1 (batches of up to 8); its base URL. Stopped with Ctrl-C's signal."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [LITUNE, "serve", "--checkpoint", str(model_dir), "--port", str(port), "--max-batch-size", "8"],
            env=litune_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"litune serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"litune serve not ready:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of the server may outlive the module


@pytest.fixture(scope="module")
def client(server: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    return engine.encode_prompt(tokenizer, engine.render_chat(tokenizer, messages), chat=True)


# --- the engine alone (no server) ---


def test_batched_stream_gives_each_row_its_own_greedy_tokens_and_stops_at_eos(model) -> None:
    network, tokenizer = model
    texts = [EOS_PROMPT, "def f(x):", "import os\nimport sys", "x"]
    prompts = [engine.encode_prompt(tokenizer, t) for t in texts]
    lengths = [20, 7, 12, 16]
    replies = ["" for _ in texts]
    finish: list[str | None] = [None] * len(texts)
    for step in engine.stream(network, tokenizer, prompts, [engine.Sampling(n, temperature=0) for n in lengths]):
        for i, delta in enumerate(step):
            if delta is not None:
                assert finish[i] is None, "a row yielded after it finished"
                replies[i] += delta.text
                finish[i] = delta.finish_reason
    for ids, n, reply, reason in zip(prompts, lengths, replies, finish, strict=True):
        tokens, hit_eos = greedy(network, tokenizer, ids, n)
        assert reply == text(tokenizer, tokens)
        assert reason == ("stop" if hit_eos else "length")
    assert finish[0] == "stop" and len(set(replies)) == len(replies)  # EOS_PROMPT meets EOS; rows differ


def test_stop_strings_end_the_reply_and_streamed_pieces_never_hold_part_of_one(model) -> None:
    network, tokenizer = model
    ids = engine.encode_prompt(tokenizer, "def f(x):")
    full, _ = engine.complete(network, tokenizer, ids, engine.Sampling(24, temperature=0))
    stop = full[9:12]
    pieces = [
        d.text for (d,) in engine.stream(network, tokenizer, [ids], [engine.Sampling(24, 0, stop=(stop, "\x00zz"))])
    ]
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop[:2] not in piece for piece in pieces[:-1]) or len(pieces) == 1


def test_seeded_sampling_reproduces_and_the_seed_matters(model) -> None:
    network, tokenizer = model
    ids = engine.encode_prompt(tokenizer, "x")
    a = engine.complete(network, tokenizer, ids, engine.Sampling(24, temperature=1.0, top_p=0.95, seed=3))
    assert a == engine.complete(network, tokenizer, ids, engine.Sampling(24, temperature=1.0, top_p=0.95, seed=3))
    assert a != engine.complete(network, tokenizer, ids, engine.Sampling(24, temperature=1.0, top_p=0.95, seed=4))


def test_chat_history_drops_the_oldest_turns_to_fit_the_context(model) -> None:
    from litune.commands.chat import fit_history

    _, tokenizer = model
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(12):
        messages += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": "answer " * 4}]
    kept, ids, room = fit_history(tokenizer, messages, CONTEXT, 32)
    assert kept == [messages[0], *messages[len(messages) - len(kept) + 1 :]] and len(kept) < len(messages)
    assert kept[1]["role"] == "user" and room == 32 and chat_ids(tokenizer, kept) == ids and len(ids) + 32 <= CONTEXT
    longer = [messages[0], *messages[len(messages) - len(kept) - 1 :]]  # one more question and answer
    assert len(chat_ids(tokenizer, longer)) + 32 > CONTEXT


def test_bad_serve_and_chat_options_are_config_errors(capsys) -> None:
    from litune.cli import main

    assert main(["serve", "--checkpoint", "x", "--port", "80"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--host", "example.com"]) == 2
    assert main(["chat", "--checkpoint", "x", "--max-tokens", "0"]) == 2
    assert main(["serve", "--checkpoint", "./no/such/run"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the server ---


def test_greedy_chat_completion_equals_litune_generate(client, model, model_dir, capsys) -> None:
    from litune.cli import main

    network, tokenizer = model
    messages = [{"role": "user", "content": "def area(r):"}]
    reply = client.chat.completions.create(model=model_dir.name, messages=messages, max_tokens=24, temperature=0)
    ids = chat_ids(tokenizer, messages)
    tokens, hit_eos = greedy(network, tokenizer, ids, 24)
    assert reply.choices[0].message.content == text(tokenizer, tokens)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(tokens) + hit_eos
    assert reply.choices[0].finish_reason == ("stop" if hit_eos else "length")
    # `litune generate --chat` itself prints the same reply.
    argv = ["generate", "--checkpoint", str(model_dir), "--chat", "--prompt", "def area(r):"]
    assert main([*argv, "--max-length", str(len(ids) + 24)]) == 0
    printed = capsys.readouterr().out.split("--- sequence 0 ---\n", 1)[1].rstrip("\n")
    assert printed == reply.choices[0].message.content


def test_streaming_gives_the_non_streaming_text_for_chat_and_completions(client, model_dir) -> None:
    name = model_dir.name
    for settings in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0.9, "seed": 11}):
        messages = [{"role": "user", "content": "import os"}]
        whole = client.chat.completions.create(model=name, messages=messages, max_tokens=20, **settings)
        chunks = list(
            client.chat.completions.create(model=name, messages=messages, max_tokens=20, stream=True, **settings)
        )
        assert len(chunks) > 3  # really streamed
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        text = client.completions.create(model=name, prompt="for i in", max_tokens=20, **settings)
        pieces = list(client.completions.create(model=name, prompt="for i in", max_tokens=20, stream=True, **settings))
        assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text


def test_completion_stops_at_eos(client, model, model_dir) -> None:
    network, tokenizer = model
    ids = engine.encode_prompt(tokenizer, EOS_PROMPT)
    tokens, hit_eos = greedy(network, tokenizer, ids, 30)
    assert hit_eos and 3 <= len(tokens) < 30
    reply = client.completions.create(model=model_dir.name, prompt=EOS_PROMPT, max_tokens=30, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text(tokenizer, tokens)
    assert reply.usage.completion_tokens == len(tokens) + 1  # the EOS token, not shown


def test_seed_reproduces_n_choices_differ_and_stop_strings_apply(client, model_dir) -> None:
    name = model_dir.name
    ask = {"model": name, "prompt": "x = ", "max_tokens": 16, "temperature": 1.0, "n": 3}
    first = client.completions.create(seed=5, **ask)
    again = client.completions.create(seed=5, **ask)
    other = client.completions.create(seed=6, **ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.text for c in again.choices] == texts and [c.text for c in other.choices] != texts
    full = client.completions.create(model=name, prompt="x = ", max_tokens=16, temperature=0).choices[0].text
    stopped = client.completions.create(model=name, prompt="x = ", max_tokens=16, temperature=0, stop=[full[5:8]])
    assert stopped.choices[0].text == full[: full.index(full[5:8])] and stopped.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == [name]


def test_32_concurrent_requests_each_get_their_own_greedy_reply(client, model, model_dir) -> None:
    network, tokenizer = model
    prompts = [f"def f{i}(x):\n    return x * {i}" for i in range(32)]
    expected = [text(tokenizer, greedy(network, tokenizer, engine.encode_prompt(tokenizer, p), 12)[0]) for p in prompts]
    assert len(set(expected)) > 16  # replies differ, so a mix-up shows

    def ask(i: int) -> str:
        if i % 2:  # half of them streamed
            pieces = client.completions.create(
                model=model_dir.name, prompt=prompts[i], max_tokens=12, temperature=0, stream=True
            )
            return "".join(p.choices[0].text for p in pieces)
        return (
            client.completions.create(model=model_dir.name, prompt=prompts[i], max_tokens=12, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32)))
    assert replies == expected


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving(server, client, model_dir) -> None:
    import openai

    chat = f"{server}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    bad = {
        "malformed JSON": (b'{"model": "x", "messages": [', 400),
        "unknown model": ({"model": "gpt-9", "messages": user}, 404),
        "negative max_tokens": ({"messages": user, "max_tokens": -5}, 400),
        "negative max_tokens, streamed": ({"messages": user, "max_tokens": -5, "stream": True}, 400),
        "prompt longer than the context": ({"messages": [{"role": "user", "content": "x " * 400}]}, 400),
        "prompt + max_tokens over the context": ({"messages": user, "max_tokens": CONTEXT}, 400),
        "no messages": ({"messages": []}, 400),
        "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
        "temperature out of range": ({"messages": user, "temperature": -1}, 400),
        "n = 0": ({"messages": user, "n": 0}, 400),
    }
    for what, (body, status) in bad.items():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(chat, content=data, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == status, what
        assert response.json()["error"]["message"], what
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=user)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model_dir.name, prompt="y " * 400)
    ok = client.chat.completions.create(model=model_dir.name, messages=user, max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_server_listens_on_127_0_0_1_only(server) -> None:
    import psutil

    port = int(server.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


@pytest.mark.slow
def test_chat_page_streams_a_reply_in_headless_chromium(server, model, tmp_path) -> None:
    network, tokenizer = model
    driver = start_chromium(tmp_path)
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(server + "/")
        for field, value in (("max-tokens", "12"), ("temperature", "0")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys("def area(r):\n")
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script(
                "const a = document.querySelectorAll('.assistant'); return a.length && "
                "a[a.length - 1].dataset.done === 'true'"
            )  # fmt: skip
        )
        reply = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1]
        chunks = int(reply.get_attribute("data-chunks"))
        tokens, _ = greedy(network, tokenizer, chat_ids(tokenizer, [{"role": "user", "content": "def area(r):"}]), 12)
        assert reply.get_attribute("textContent") == text(tokenizer, tokens)
        assert chunks > 1  # it arrived in pieces
    finally:
        driver.quit()


def start_chromium(tmp_path: Path):
    """Debian's headless Chromium through Selenium; a browser that cannot start fails under CI=true, else skips."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
            options.add_argument(flag)
        return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    except Exception as err:  # no chromium/chromedriver/selenium here
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"headless Chromium could not start ({type(err).__name__}: {str(err).splitlines()[0][:200]})")


@pytest.mark.slow
def test_litune_chat_in_a_pseudo_terminal_streams_keeps_history_resets_and_exits(model, model_dir) -> None:
    import pexpect

    from litune.commands.chat import fit_history

    network, tokenizer = model
    child = pexpect.spawn(
        LITUNE, ["chat", "--checkpoint", str(model_dir), "--temperature", "0", "--max-tokens", "10"],
        env=litune_env(), encoding="utf-8", timeout=240,
    )  # fmt: skip
    history: list[dict] = []

    def turn(message: str) -> tuple[str, str]:
        """Send a message; the reply shown, and the greedy reply to the history the chat should have kept."""
        nonlocal history
        child.sendline(message)
        child.expect_exact("assistant> ")
        child.expect_exact("\r\nyou> ")
        shown = child.before.replace("\r\n", "\n")  # the terminal shows "\n" as "\r\n"
        kept, ids, room = fit_history(tokenizer, [*history, {"role": "user", "content": message}], CONTEXT, 10)
        tokens, _ = greedy(network, tokenizer, ids, room)
        history = [*kept, {"role": "assistant", "content": shown}]
        return shown, text(tokenizer, tokens)

    try:
        child.expect_exact("you> ")
        shown, expected = turn("import os")
        assert shown == expected
        shown, expected = turn("def f(x):")
        assert shown == expected and len(history) == 4  # the first turn is part of the prompt
        alone = text(tokenizer, greedy(network, tokenizer, chat_ids(tokenizer, history[2:3]), 10)[0])
        assert shown != alone  # (and it matters)
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.expect_exact("you> ")
        history = []
        assert turn("def f(x):") == (alone, alone)
        for _ in range(6):  # far more than the 128-token context: the oldest turns must be dropped
            shown, expected = turn(("a long message " * 3).strip())
            assert shown == expected
        assert history[0]["content"] != "def f(x):"
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_bench_serve_quick_mode_runs_and_both_sides_decode_the_same_texts(tmp_path) -> None:
    """``bench/bench_serve.py --quick`` keeps working (it exits non-zero when the server and the loop disagree)."""
    import sys

    from litune_testing import REPO

    cmd = [sys.executable, str(REPO / "bench" / "bench_serve.py"), "--quick", "--json", str(tmp_path / "serve.json")]
    proc = subprocess.run(cmd, env=litune_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| 2 |" in proc.stdout
    assert set(json.loads((tmp_path / "serve.json").read_text())["table"]) == {"1", "2"}


def test_a_base_plus_adapter_folder_serves_the_adapted_model(tmp_path, model_dir) -> None:
    """The server's loader (``litune generate``'s: run folders, .ckpt, merged exports are tested there) takes a
    base + adapter folder, and replies as the adapted model, not as the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = engine.encode_prompt(tokenizer, "def f(x):")
    args = {"max_length": len(ids) + 8, "do_sample": False, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    with torch.no_grad():
        base_reply = base.eval().generate(torch.tensor([ids]), **args)[0, len(ids) :]
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    network, tokenizer = engine.load_model(str(tmp_path / "adapter"), "cpu")
    reply, _ = engine.complete(network, tokenizer, ids, engine.Sampling(8, temperature=0))
    with torch.no_grad():
        ref = peft.eval().generate(torch.tensor([ids]), **args)[0, len(ids) :]
    assert reply == text(tokenizer, ref.tolist()) != text(tokenizer, base_reply.tolist())
