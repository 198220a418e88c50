"""``litune chat``: talk to a checkpoint in the terminal; replies are streamed as they are generated.

The conversation is rendered with the tokenizer's chat template (:func:`litune.serving.engine.render_chat`) and kept
within the model's context: when it no longer fits beside ``--max-tokens``, the oldest turns are dropped. ``/reset``
starts a new conversation, ``/exit`` (or end of input, or Ctrl-C at the prompt) quits; Ctrl-C during a reply stops
that reply.
"""

from __future__ import annotations

import argparse
import math
import sys

from litune.errors import CommandParser, ConfigError
from litune.serving import add_checkpoint_argument

HELP = "litune chat: type a message and press Enter; /reset starts over, /exit quits."


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="litune chat", description=__doc__)
    add_checkpoint_argument(parser)
    parser.add_argument("--max-tokens", type=int, default=256, help="Most tokens per reply.")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy (always the likeliest token).")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="Reproducible replies (turn k uses seed + k).")
    parser.add_argument("--system", default=None, help="A system message that starts every conversation.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens", f"{args.max_tokens} is not positive", "use e.g. 256")
    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 2):
        raise ConfigError("--temperature", f"{args.temperature} is outside [0, 2]", "use 0 (greedy) to 1")
    if not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"{args.top_p} is outside (0, 1]", "use e.g. 0.9, or 1 to keep every token")


def fit_history(
    tokenizer: object, messages: list[dict[str, str]], context: int | None, max_tokens: int
) -> tuple[list[dict[str, str]], list[int], int]:
    """Drop the oldest turns (a system message stays) until the prompt leaves room for a reply; the kept turns start
    with a user message (chat templates may require user/assistant alternation).

    Returns:
        The messages kept, their prompt token ids, and the reply's token budget (``max_tokens``, or less when even
        the newest message alone leaves less room; 0 when it does not fit at all).
    """
    from litune.serving.engine import encode_prompt, render_chat

    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    while True:
        ids = encode_prompt(tokenizer, render_chat(tokenizer, system + turns), chat=True)
        room = max_tokens if context is None else min(max_tokens, context - len(ids))
        if room >= max_tokens or len(turns) <= 1:
            return system + turns, ids, max(room, 0)
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    from litune.serving import engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    network, tokenizer = engine.load_model(args.checkpoint, device)
    context = engine.context_length(network)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(HELP, flush=True)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(start)
            print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        messages, ids, room = fit_history(
            tokenizer, [*messages, {"role": "user", "content": text}], context, args.max_tokens
        )
        if room < 1:
            print(f"(the message does not fit the model's context of {context} tokens; shorten it)", flush=True)
            messages.pop()
            continue
        seed = None if args.seed is None else args.seed + turn
        sampling = engine.Sampling(room, args.temperature, args.top_p, seed)
        sys.stdout.write("assistant> ")
        reply = []
        try:
            for (delta,) in engine.stream(network, tokenizer, [ids], [sampling]):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it (the part shown stays in the conversation)
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
