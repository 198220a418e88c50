"""``litune serve``: an OpenAI-compatible HTTP server (and a chat page at ``/``) for a checkpoint, on LitServe.

Endpoints: ``POST /v1/chat/completions`` (the tokenizer's chat template applied), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health`` and ``GET /`` (a chat page). Requests that arrive together are decoded as one batch
(``--max-batch-size``); see :mod:`litune.serving.openai_api`.
"""

from __future__ import annotations

import argparse

from litune.errors import CommandParser, ConfigError
from litune.serving import add_checkpoint_argument

HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""The addresses LitServe binds to: local only (the default), or every IPv4 / IPv6 interface."""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="litune serve", description=__doc__)
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine only), 0.0.0.0 or ::.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8, help="Most requests decoded together.")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.02, help="Seconds to wait for more requests before a batch starts."
    )
    parser.add_argument("--model-name", default=None, help="The model id clients send (default: the folder's name).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot work, before the model is loaded."""
    if args.host not in HOSTS:
        raise ConfigError(
            "--host", f"{args.host} is not an address LitServe binds to", f"use one of {', '.join(HOSTS)}"
        )
    if not 1024 <= args.port <= 65535:
        raise ConfigError("--port", f"{args.port} is outside 1024-65535", "use e.g. --port 8000")
    if args.max_batch_size < 1:
        raise ConfigError("--max-batch-size", f"{args.max_batch_size} is not positive", "use e.g. 8")
    if args.batch_timeout < 0:
        raise ConfigError("--batch-timeout", f"{args.batch_timeout} is negative", "use e.g. 0.02 (seconds)")
    if args.device is not None and args.device != "cpu" and not args.device.startswith("cuda"):
        raise ConfigError("--device", f"{args.device} is not cpu, cuda or cuda:N", "use cpu or cuda[:N]")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    import torch

    from litune.serving.openai_api import build_server

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    server = build_server(args.checkpoint, device, args.max_batch_size, args.batch_timeout, args.model_name)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"litune serve: {args.checkpoint} at http://{shown}:{args.port} (OpenAI API under /v1, chat page at /)")
    stop_on_signals(server)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
    return 0


def stop_on_signals(server: object) -> None:
    """Ctrl-C / SIGTERM shut the server down through LitServe's own shutdown event.

    LitServe's KeyboardInterrupt path can hang: the interrupt lands while the main thread waits on the event through
    its multiprocessing-manager connection, and its clean-up then waits on that broken connection forever (litserve
    0.2.19). Setting the event from another thread (its own manager connection) takes the normal shutdown path. Forked
    helpers inherit the handler and ignore the signal, so Ctrl-C (sent to the whole process group) does not kill the
    manager under the shutdown.
    """
    import os
    import signal
    import threading

    main_pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            return  # a forked helper (LitServe's multiprocessing manager) inherited this handler: the main stops it
        event = getattr(server, "_shutdown_event", None)
        if event is None:  # still starting: nothing to shut down yet
            raise SystemExit(128 + signum)
        threading.Thread(target=event.set, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
