"""``litune serve`` against plain ``transformers`` ``generate`` in a loop: requests/s and time to first token (TTFT) for
1, 4 and 16 concurrent clients, on a tiny model on CPU, both measured in this run.

    OMP_NUM_THREADS=1 python bench/bench_serve.py [--clients 1 4 16] [--requests 32] [--max-tokens 32] [--rounds 3]
                                                  [--json PATH] [--quick]

Each client is a thread that sends its share of ``--requests`` greedy completions one after another (closed loop: the
next when the previous reply is complete), so ``c`` clients keep ``c`` requests in flight.

- **serve**: one ``litune serve --max-batch-size 16`` process (started once, start-up reported apart); the clients
  stream from ``/v1/completions`` over HTTP with ``httpx``; TTFT is from sending the request to the first text chunk.
- **loop**: what a user writes without a server: one ``AutoModelForCausalLM`` in the benchmark process, and a lock so
  requests are served one at a time, each by ``model.generate`` (greedy, same ``max_new_tokens``, KV cache); TTFT is
  from the request's arrival (before waiting for the lock) to the first new token (a ``transformers`` streamer's
  callback). No HTTP on this side.

Both sides use one thread for torch (``OMP_NUM_THREADS=1``), decode the same prompts greedily, and their texts are
checked equal (same work). Sides alternate per concurrency level, ``--rounds`` times; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]


def make_model(work: Path, vocab: int, corpus_bytes: int = 300_000) -> Path:
    """A random GPT-2 (2 layers, 64 wide, context 256) with a BPE tokenizer trained on the Python standard library."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from litune.data.stdlib import stdlib_python_files
    from litune.data.tokenizer import TrainedBPE

    folder = work / "tiny-model"
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for path in stdlib_python_files(max_bytes=corpus_bytes):
        (corpus / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    tokenizer = TrainedBPE(corpus=sorted(str(p) for p in corpus.glob("*.txt")), vocab_size=vocab, cache_dir=work).load()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=vocab, initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts(n: int) -> list[str]:
    return [f"def function_{i}(x, y):\n    return x * {i} + y" for i in range(n)]


def start_server(model: Path, max_batch_size: int) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    litune = str(Path(sys.executable).parent / "litune")
    args = [litune, "serve", "--checkpoint", str(model), "--port", str(port), "--max-batch-size", str(max_batch_size)]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"litune serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_clients(clients: int, texts: list[str], ask) -> tuple[float, list[float], list[str]]:
    """``clients`` threads share ``texts`` (closed loop); returns wall seconds, TTFTs and replies (in text order)."""
    replies: list[str] = [""] * len(texts)
    ttfts: list[float] = [0.0] * len(texts)
    shares = [list(range(c, len(texts), clients)) for c in range(clients)]

    def client(indices: list[int]) -> None:
        for i in indices:
            ttfts[i], replies[i] = ask(texts[i])

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, ttfts, replies


def server_side(url: str, model_id: str, max_tokens: int):
    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64))

    def ask(prompt: str) -> tuple[float, str]:
        body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        start, first, parts = time.perf_counter(), None, []
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                piece = json.loads(line[6:])["choices"][0]["text"]
                if piece and first is None:
                    first = time.perf_counter() - start
                parts.append(piece)
        return first if first is not None else time.perf_counter() - start, "".join(parts)

    return ask


def loop_side(model_dir: Path, max_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lock = threading.Lock()

    class FirstToken(BaseStreamer):
        def __init__(self, start: float) -> None:
            self.start, self.calls, self.first = start, 0, None

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1  # the first call is the prompt, the second the first new token
            if self.calls == 2:
                self.first = time.perf_counter() - self.start

        def end(self) -> None:
            pass

    def ask(prompt: str) -> tuple[float, str]:
        start = time.perf_counter()
        ids = tokenizer(prompt, return_tensors="pt")
        streamer = FirstToken(start)
        with lock, torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_tokens, do_sample=False, streamer=streamer,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        return streamer.first or (time.perf_counter() - start), tokenizer.decode(new, skip_special_tokens=True)

    return ask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="Requests per measurement (shared by the clients).")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="A few seconds of work: checks the script runs.")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.rounds, args.vocab = [1, 2], 4, 4, 1, 512
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = make_model(work, args.vocab, 50_000 if args.quick else 300_000)
    texts = prompts(args.requests)
    proc, url, startup = start_server(model, args.max_batch_size)
    results: dict[str, dict[int, list[dict]]] = {"serve": {}, "loop": {}}
    try:
        sides = {"serve": server_side(url, model.name, args.max_tokens), "loop": loop_side(model, args.max_tokens)}
        for side in sides.values():  # warm-up (first-call costs), not timed
            run_clients(2, texts[:2], side)
        for _ in range(args.rounds):
            for clients in args.clients:
                replies = {}
                for name, ask in sides.items():
                    wall, ttfts, replies[name] = run_clients(clients, texts, ask)
                    results[name].setdefault(clients, []).append(
                        {"requests_per_s": len(texts) / wall, "ttft_median_s": statistics.median(ttfts)}
                    )
                if replies["serve"] != replies["loop"]:
                    raise SystemExit("the server and the loop decoded different texts: not the same work")
    finally:
        stop_server(proc)
    load = os.getloadavg()
    print(f"tiny GPT-2 (2 x 64, vocab {args.vocab}), {args.requests} requests x {args.max_tokens} new tokens, greedy, "
          f"OMP_NUM_THREADS=1, medians of {args.rounds} rounds; server start-up {startup:.1f} s; "
          f"load average {load[0]:.1f}")  # fmt: skip
    print("| clients | serve req/s | loop req/s | ratio | serve TTFT median | loop TTFT median |")
    print("|---|---|---|---|---|---|")
    table = {}
    for clients in args.clients:
        row = {
            name: {key: statistics.median(r[key] for r in results[name][clients]) for key in results[name][clients][0]}
            for name in results
        }
        table[clients] = row
        s, lo = row["serve"], row["loop"]
        print(f"| {clients} | {s['requests_per_s']:.2f} | {lo['requests_per_s']:.2f} | "
              f"{s['requests_per_s'] / lo['requests_per_s']:.2f}x | {s['ttft_median_s'] * 1000:.0f} ms | "
              f"{lo['ttft_median_s'] * 1000:.0f} ms |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "startup_s": startup, "load": load}
        args.json.write_text(json.dumps({**payload, "table": table, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
