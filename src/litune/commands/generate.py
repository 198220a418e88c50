"""``litune generate``: sample text from a litune checkpoint or a Hugging Face model."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from litune.data.tokenizer import load_tokenizer
from litune.errors import CommandParser, ConfigError
from litune.models.generation import SamplingSettings


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="litune generate", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="A litune .ckpt file or run folder, or a HF model folder or hub id."
    )
    parser.add_argument("--prompt", default="", help="Text to continue (empty: start from the BOS/EOS token).")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="The prompt is a user message: render it with the tokenizer's chat template (and --system) and print the "
        "assistant's reply, stopping at the end-of-turn and EOS tokens the fine-tune taught.",
    )
    parser.add_argument("--system", default=None, help="With --chat: a system message before the user's.")
    parser.add_argument("--max-length", type=int, default=64, help="Total length in tokens, prompt included.")
    parser.add_argument("--num-return-sequences", type=int, default=1)
    parser.add_argument("--do-sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_for_generation(checkpoint: str) -> tuple[torch.nn.Module, object]:
    """Load a network and its tokenizer from a litune checkpoint or a Hugging Face model folder/hub id.

    A litune checkpoint is a ``.ckpt`` file, a DeepSpeed checkpoint directory (shards are consolidated) or a run
    folder (its ``checkpoints/last.ckpt``); a folder with ``adapter_config.json`` is a peft adapter folder (its base
    model is loaded from ``base_model_name_or_path`` and the adapters put on it); a folder with a ``config.json`` or
    anything else is a Hugging Face model.
    """
    path = Path(checkpoint)
    if (path / "adapter_config.json").is_file():
        return _load_adapter_folder(path)
    looks_like_hub_id = not path.exists() and path.suffix != ".ckpt" and checkpoint.count("/") <= 1
    if (path / "config.json").is_file() or looks_like_hub_id:
        from litune.models.hf import HFCausalLM

        return HFCausalLM(pretrained=checkpoint), load_tokenizer(checkpoint)
    from litune.resume import load_system

    system = load_system(path)
    if system.tokenizer is None:
        raise ConfigError("--checkpoint", "this checkpoint has no tokenizer", "train with model.tokenizer set")
    return system.network, system.tokenizer


def _load_adapter_folder(path: Path) -> tuple[torch.nn.Module, object]:
    import json

    from litune.models.adapters import load_adapters
    from litune.models.hf import HFCausalLM

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            "--checkpoint",
            f"the adapter folder {path} names no Hugging Face base model (adapters of a litune network)",
            "generate from the run folder or checkpoint instead, or export it with --merge-adapters",
        )
    network = HFCausalLM(pretrained=base)
    load_adapters(network, path)
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return network, load_tokenizer(str(path) if has_tokenizer else base)


def check_sampling_args(args: argparse.Namespace) -> None:
    """Reject lengths and sampling settings that cannot work, before any model is loaded."""
    if args.max_length < 1:
        raise ConfigError("--max-length", f"{args.max_length} is not positive", "use a positive length")
    if args.num_return_sequences < 1:
        raise ConfigError("--num-return-sequences", f"{args.num_return_sequences} is not positive", "use 1 or more")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(
            "--temperature",
            f"temperature={args.temperature} must be a positive finite number (logits are divided by it)",
            "use e.g. 0.7 (sharper) to 1.0 (the model's distribution); for the single most likely text, drop "
            "--do-sample instead of lowering the temperature to 0",
        )
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError("--top-p", f"top_p={args.top_p} is outside (0, 1]", "use e.g. 0.9, or leave it out")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError("--top-k", f"top_k={args.top_k} keeps no token", "use a positive number such as 50")


def check_lengths(network: torch.nn.Module, prompt_tokens: int, max_length: int) -> None:
    """The prompt must fit the model's context and leave room for ``max_length`` (decoder-only: prompt included)."""
    context = getattr(network, "max_seq_len", None)
    if context is not None and prompt_tokens > context:
        raise ConfigError(
            "--prompt",
            f"the prompt is {prompt_tokens} tokens but the model's context is {context} tokens",
            f"shorten the prompt to under {context} tokens",
        )
    if getattr(network, "is_encoder_decoder", False) or type(network).__name__ == "Seq2SeqLM":
        return  # max_length counts target tokens only; the source is the prompt
    if context is not None and max_length > context:
        raise ConfigError(
            "--max-length",
            f"max_length={max_length} (prompt included) is longer than the model's context of {context} tokens",
            f"use --max-length {context} or less",
        )
    if max_length <= prompt_tokens:
        raise ConfigError(
            "--max-length",
            f"max_length={max_length} counts the prompt too, and the prompt already has {prompt_tokens} tokens, so "
            "nothing would be generated",
            f"use --max-length greater than {prompt_tokens}" + (f" (and at most {context})" if context else ""),
        )


def generate_texts(network: torch.nn.Module, tokenizer: object, args: argparse.Namespace) -> list[str]:
    """Encode the prompt, decode ``num_return_sequences`` continuations, return texts without special tokens."""
    check_sampling_args(args)
    if args.num_return_sequences > 1 and not args.do_sample:
        raise ConfigError(
            "--num-return-sequences",
            f"{args.num_return_sequences} sequences with greedy decoding would all be the same",
            "add --do-sample (with --temperature/--top-k/--top-p) or ask for 1 sequence",
        )
    chat = getattr(args, "chat", False)
    if chat:
        ids = chat_prompt_ids(tokenizer, args.prompt, getattr(args, "system", None))
        from litune.data.formats import chat_stop_token_ids

        stops: int | list[int] | None = chat_stop_token_ids(tokenizer) or None
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
        stops = tokenizer.eos_token_id
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[start]])
    check_lengths(network, ids.shape[1], args.max_length)
    torch.manual_seed(args.seed)
    network.eval().to(args.device)
    # The command-line options carry SamplingSettings' own field names (--max-length -> max_length, ...).
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingSettings) if hasattr(args, f.name)}
    sampling = SamplingSettings(**options, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    tokens = network.generate(ids.to(args.device), sampling=sampling)
    if chat:  # the assistant's reply only
        tokens = tokens[:, ids.shape[1] :] if not getattr(network, "is_encoder_decoder", False) else tokens
    return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def chat_prompt_ids(tokenizer: object, prompt: str, system: str | None = None) -> torch.Tensor:
    """``[1, T]`` ids of a one-turn conversation rendered with the tokenizer's chat template, up to the assistant's
    turn (``add_generation_prompt``).

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "--chat",
            "the tokenizer has no chat template",
            "fine-tune with data.format=chat (the run then keeps its template), or drop --chat to continue plain text",
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_sampling_args(args)  # before the (slow) model load
    network, tokenizer = load_for_generation(args.checkpoint)
    for i, text in enumerate(generate_texts(network, tokenizer, args)):
        print(f"--- sequence {i} ---\n{text}")
    return 0
