"""Serving a checkpoint: ``litune serve`` (HTTP, :mod:`.openai_api`) and ``litune chat`` (terminal), on one engine
(:mod:`.engine`). This module imports nothing heavy, so the commands' parsers can use it before torch loads."""

from __future__ import annotations

import argparse


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--checkpoint`` both serving commands take: anything :func:`.engine.load_model` opens."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="A run folder, .ckpt, Hugging Face model folder or hub id, merged export, or adapter folder.",
    )
