"""``litune export --checkpoint C --output DIR``: a checkpoint of any strategy -> a Hugging Face model folder.

DDP checkpoints load directly; DeepSpeed ZeRO-1/2/3 checkpoints (directories of per-rank shards) are first consolidated
from the fp32 master weights. :func:`litune.models.convert.save_pretrained` writes the network (``config.json``,
``model.safetensors``: the custom decoder as GPT-2, a Hugging Face network by its own ``save_pretrained``) and the
tokenizer the run trained with (the run folder's saved files) is saved beside it, with its bos/eos/pad ids written
into ``config.json`` and ``generation_config.json``, so
``AutoModelForCausalLM.from_pretrained(DIR)``, ``AutoTokenizer.from_pretrained(DIR)`` and ``model.generate`` work on
the result as they are.

A run trained with adapters (``model.adapters``) exports its adapter folder (``adapter_model.safetensors`` +
``adapter_config.json``, for ``peft.PeftModel.from_pretrained`` on top of the base); with ``--merge-adapters`` the
adapters are folded into the base weights and the result is a plain Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from litune.errors import CommandParser, ConfigError
from litune.models import adapters, convert
from litune.resume import load_system

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="litune export", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="A .ckpt file, a DeepSpeed .ckpt directory, or a run folder (last.ckpt)."
    )
    parser.add_argument("--output", required=True, help="Folder to write the Hugging Face model into.")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="Weight dtype written (training keeps fp32 masters)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty folder.")
    parser.add_argument(
        "--merge-adapters",
        action="store_true",
        help="For a run trained with adapters: fold them into the base and write a plain Hugging Face folder "
        "(without it: the adapter folder).",
    )
    return parser


def export(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "float32",
    overwrite: bool = False,
    merge_adapters: bool = False,
) -> Path:
    """Write the Hugging Face folder (or, for an adapter run without ``merge_adapters``, the adapter folder)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError("--output", f"{output} exists and is not empty", "choose a new folder or pass --overwrite")
    system = load_system(checkpoint)
    network = system.network
    if merge_adapters:
        adapters.merge_adapters(network)  # a ConfigError if the run has no adapters
    elif adapters.peft_model_of(network) is not None:
        network.to(DTYPES[dtype])
        adapters.save_adapters(network, output)
        if system.tokenizer is not None:
            save_tokenizer(system.tokenizer, output)
        return output
    if not convert.has_hf_format(network):
        raise ConfigError(
            "--checkpoint",
            f"the network {type(network).__name__} has no Hugging Face equivalent to export to",
            "export a network that implements save_pretrained (litune.models.HFCausalLM or the custom decoder)",
        )
    network.to(DTYPES[dtype])
    output.mkdir(parents=True, exist_ok=True)
    convert.save_pretrained(network, output)
    if system.tokenizer is not None:
        save_tokenizer(system.tokenizer, output)
        write_special_token_ids(output, system.tokenizer)
    return output


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """Save the tokenizer with its chat template inside ``tokenizer_config.json`` (not only ``chat_template.jinja``),
    where every reader of Hugging Face folders looks for it (older transformers, vLLM, llama.cpp's converter)."""
    tokenizer.save_pretrained(folder, save_jinja_files=False)


def write_special_token_ids(folder: Path, tokenizer: Any) -> dict[str, Any]:
    """Put the tokenizer's bos/eos/pad ids into ``config.json`` and ``generation_config.json``.

    ``model.generate`` and pipelines read them from there (not from the tokenizer): without them a model trained with
    its own BPE would stop on GPT-2's eos id 50256, which is not even in its vocabulary. A tokenizer with a chat
    template also gets the stop tokens a chat fine-tune teaches (:func:`litune.data.formats.chat_stop_token_ids`: EOS
    and the template's end-of-turn token) as ``generation_config.json``'s ``eos_token_id`` list, so that generation
    stops at the end of the assistant's turn.

    Returns:
        The ids written to ``config.json`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``; a missing token is
        left out).
    """
    from transformers import GenerationConfig

    ids = {
        f"{name}_token_id": int(value)
        for name in ("bos", "eos", "pad")
        if (value := getattr(tokenizer, f"{name}_token_id", None)) is not None
    }
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.update(ids)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = (
        GenerationConfig.from_pretrained(folder)
        if (folder / "generation_config.json").is_file()
        else GenerationConfig()
    )
    generation.update(**ids)
    if getattr(tokenizer, "chat_template", None):
        from litune.data.formats import chat_stop_token_ids

        stops = chat_stop_token_ids(tokenizer)
        if len(stops) > 1:
            generation.update(eos_token_id=stops)
    generation.save_pretrained(folder)
    return ids


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = export(args.checkpoint, args.output, args.dtype, args.overwrite, args.merge_adapters)
    print(f"exported {args.checkpoint} -> {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    return 0
