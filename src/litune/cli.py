"""The ``litune`` command: a dispatcher that imports only what the chosen subcommand needs.

``litune fit | validate | test`` are Lightning's own ``LightningCLI`` subcommands (:mod:`litune.commands.fit`);
every other subcommand is a module in :mod:`litune.commands` with ``main(argv) -> int``. Nothing heavy is imported
here: torch, transformers and Lightning together take seconds to import, and ``litune --help``, ``litune report`` or
``litune estimate --help`` need none of them.
"""

from __future__ import annotations

import importlib
import logging
import sys

from litune.errors import TrainingStopped, as_config_error
from litune.runs import is_launched_rank

SUBCOMMANDS: dict[str, tuple[str | None, str]] = {
    "fit": (None, "train from --config files (LightningCLI; `litune fit --help` lists every field)"),
    "validate": (None, "evaluate on the validation set from --config files (LightningCLI)"),
    "test": (None, "evaluate on the test set from --config files (LightningCLI)"),
    "generate": ("litune.commands.generate", "sample text from a checkpoint, run folder or Hugging Face model"),
    "prepare": ("litune.commands.prepare", "tokenize a config's data once into the cache and print statistics"),
    "eval": ("litune.commands.eval", "benchmark a checkpoint, run folder or HF model with lm-evaluation-harness"),
    "export": ("litune.commands.export", "write a checkpoint of any strategy as a Hugging Face model folder"),
    "estimate": ("litune.commands.estimate", "per-device memory of a config under each strategy, before launching"),
    "serve": ("litune.commands.serve", "an OpenAI-compatible server and chat page for a checkpoint (LitServe)"),
    "chat": ("litune.commands.chat", "talk to a checkpoint in the terminal, replies streamed"),
    "report": ("litune.commands.report", "plots and a summary table of one or several run folders"),
    "tune": ("litune.commands.tune", "`tune lr`: learning-rate range test; `tune batch-size`: largest micro batch"),
    "sweep": ("litune.commands.sweep", "grid/random/Bayesian search over config fields, with pruning, resumable"),
}
"""Every subcommand, once: name -> (module with ``main(argv: list[str]) -> int``, or None for LightningCLI's; help)."""

COMMANDS: dict[str, str] = {name: module for name, (module, _) in SUBCOMMANDS.items() if module is not None}
"""The subcommands outside LightningCLI: name -> module."""

LIGHTNING_COMMANDS = tuple(name for name, (module, _) in SUBCOMMANDS.items() if module is None)
"""Subcommands that LightningCLI runs (:mod:`litune.commands.fit`)."""


def _usage() -> str:
    """The top-level help, listing every subcommand of :data:`SUBCOMMANDS`."""
    lines = [f"usage: litune {{{','.join(SUBCOMMANDS)}}} ...", ""]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join([*lines, "", "`litune COMMAND --help` describes one command.", ""])


USAGE = _usage()


class _Stderr(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of the moment (a test may swap it), like logging's last resort."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def show_info_logs() -> None:
    """litune's modules log through :mod:`logging` (loggers under ``litune``); a command shows their INFO lines from
    its first process only, as Lightning shows its own."""
    logger = logging.getLogger("litune")
    if is_launched_rank() or any(isinstance(h, _Stderr) for h in logger.handlers):
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``litune`` console script.

    Args:
        argv: arguments after ``litune``; ``None`` reads ``sys.argv`` (LightningCLI then parses it itself) and marks
            this process as litune's own command (the console script, ``python -m litune.cli``): only such a process
            gets litune's host-allocator settings on CPU runs (:mod:`litune.host_memory`), never a program that
            imports litune and calls ``main([...])``.

    Returns:
        The exit status: 0, 2 for a bare ``litune`` and for a configuration error (printed as one paragraph), 1 when
        training stopped on purpose (:class:`~litune.errors.TrainingStopped`, printed as one paragraph).
    """
    if argv is None:
        from litune.host_memory import mark_cli_process  # imports nothing heavy

        mark_cli_process()
    args = list(sys.argv[1:] if argv is None else argv)
    show_info_logs()
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 2 if not args else 0
    try:
        if args[0] in COMMANDS:
            return int(importlib.import_module(COMMANDS[args[0]]).main(args[1:]) or 0)
        # fit/validate/test, and anything else (LightningCLI names the valid subcommands in its own error).
        return importlib.import_module("litune.commands.fit").main(argv)
    except TrainingStopped as err:
        print(f"litune: training stopped: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        # litune's one boundary: its own ConfigError anywhere in the chain, or a family of library errors that always
        # means bad input or environment (errors.translate); anything else is a bug and keeps its traceback.
        config_error = as_config_error(err)
        if config_error is None:
            raise
        print(f"litune: configuration error: {' '.join(str(config_error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
