"""``litune export --checkpoint C --output DIR``: a checkpoint of any strategy -> a Hugging Face model folder.

DDP checkpoints load directly; DeepSpeed ZeRO-1/2/3 checkpoints (directories of per-rank shards) are first consolidated
from the fp32 master weights. The network writes itself with its own ``save_pretrained`` (``config.json``,
``model.safetensors``) and the tokenizer the run trained with is saved beside it, so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from litune.errors import ConfigError
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
    return parser


def export(checkpoint: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the Hugging Face folder for ``checkpoint`` into ``output`` and return it."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError("--output", f"{output} exists and is not empty", "choose a new folder or pass --overwrite")
    system = load_system(checkpoint)
    network = system.network
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
    folder = export(args.checkpoint, args.output, args.dtype, args.overwrite)
    print(f"exported {args.checkpoint} -> {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    return 0
