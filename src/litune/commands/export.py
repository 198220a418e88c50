"""``litune export --checkpoint C --output DIR``: a checkpoint of any strategy -> a Hugging Face model folder.

DDP checkpoints load directly; DeepSpeed ZeRO-1/2/3 checkpoints (directories of per-rank shards) are first consolidated
from the fp32 master weights. The network writes itself with its own ``save_pretrained`` (``config.json``,
``model.safetensors``) and the tokenizer the run trained with is saved beside it, so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load the result.

A run trained with adapters (``model.adapters``) exports its adapter folder (``adapter_model.safetensors`` +
``adapter_config.json``, for ``peft.PeftModel.from_pretrained`` on top of the base); with ``--merge-adapters`` the
adapters are folded into the base weights and the result is a plain Hugging Face folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from litune.errors import ConfigError
from litune.models import adapters
from litune.strategies.checkpoint import load_system

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litune export", description=__doc__)
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
            system.tokenizer.save_pretrained(output)
        return output
    if not hasattr(network, "save_pretrained"):
        raise ConfigError(
            "--checkpoint",
            f"the network {type(network).__name__} has no Hugging Face equivalent to export to",
            "export a network that implements save_pretrained (litune.models.HFCausalLM or the custom decoder)",
        )
    network.to(DTYPES[dtype])
    output.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(output)
    if system.tokenizer is not None:
        system.tokenizer.save_pretrained(output)
    return output


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    folder = export(args.checkpoint, args.output, args.dtype, args.overwrite, args.merge_adapters)
    print(f"exported {args.checkpoint} -> {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    return 0
