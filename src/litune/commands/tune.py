"""``litune tune lr|batch-size --config X [overrides]``: pick a learning rate or a micro batch before training.

  litune tune lr --config X [--apply [FILE]] [--min-lr 1e-7 --max-lr 1 --num-training 100]
      Lightning's learning-rate range test on the configured model and data: prints the suggestion, writes
      lr_find.png and lr_find.json into a new run folder, and with --apply a config fragment that sets it.

  litune tune batch-size --config X [--max-memory-gib G] [--global-batch-size N] [--start 1] [--max-batch-size M]
      The largest micro batch that fits (doubling, then binary search), each size a real `litune fit` of a few
      steps under the configured strategy: on CPU within --max-memory-gib of peak memory per process, on GPU without
      running out of memory. Prints the micro batch and accumulation that give your global batch.

Any other argument is a `litune fit` argument (--config files, dotted overrides).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psutil

from litune.errors import ConfigError


def _lr_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litune tune lr", add_help=False)
    parser.add_argument(
        "--apply",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="write a config fragment with the suggested rate (default: lr.yaml in the run folder)",
    )
    parser.add_argument("--min-lr", type=float, default=1e-7)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--num-training", type=int, default=100, help="optimizer steps of the range test")
    return parser


def _batch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litune tune batch-size", add_help=False)
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="peak memory per process allowed (CPU default: 80%% of RAM / processes per node)",
    )
    parser.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="sequences per optimizer step to split into micro batch x accumulation",
    )
    parser.add_argument("--start", type=int, default=1, help="first micro batch tried")
    parser.add_argument("--max-batch-size", type=int, default=4096, help="largest micro batch tried")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per probe")
    parser.add_argument(
        "--precision",
        type=float,
        default=0.05,
        help="stop searching when the gap between a fit and a miss is at most this fraction (1: powers of two only)",
    )
    return parser


def tune_lr(argv: list[str]) -> int:
    from litune.tuning.lr_finder import find_lr, write_lr_fragment

    args, fit_args = _lr_parser().parse_known_args(argv)
    split_configs(fit_args)  # a missing --config is named as such, not as the fields it would have given
    result = find_lr(fit_args, min_lr=args.min_lr, max_lr=args.max_lr, num_training=args.num_training)
    lines = [
        f"suggested learning rate: {result.suggestion:.3g}",
        f"range test: {len(result.lrs)} steps from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}",
        f"plot: {result.run_dir / 'lr_find.png'}",
    ]
    if args.apply is not None:
        fragment = write_lr_fragment(Path(args.apply) if args.apply else result.run_dir / "lr.yaml", result.suggestion)
        lines.append(f"config fragment: {fragment}  (add `--config {fragment}` last to train with it)")
    print("\n".join(lines), flush=True)
    return 0


def split_configs(fit_args: list[str]) -> tuple[list[str], list[str]]:
    """``--config`` files and the other ``litune fit`` arguments.

    Raises:
        ConfigError: no ``--config`` was given.
    """
    configs = [fit_args[i + 1] for i, a in enumerate(fit_args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in fit_args if a.startswith("--config=")]
    overrides = [
        a
        for i, a in enumerate(fit_args)
        if a != "--config" and not a.startswith("--config=") and (i == 0 or fit_args[i - 1] != "--config")
    ]
    if not configs:
        raise ConfigError("--config", "no config given", "pass --config X.yaml as for `litune fit`")
    return configs, overrides


def launch_shape(fit_args: list[str]) -> tuple[bool, int, int | None]:
    """(on GPU, processes per run, global batch the config asks for) from the parsed config."""
    from litune.commands.estimate import load_config
    from litune.strategies.checks import processes_per_node, resolve_accelerator

    configs, overrides = split_configs(fit_args)
    cfg = load_config(configs, overrides)
    accelerator = resolve_accelerator(cfg.trainer.accelerator)
    processes = (processes_per_node(cfg.trainer.devices, accelerator) or 1) * int(cfg.trainer.num_nodes or 1)
    global_batch = cfg.get("global_batch_size")
    if global_batch is None:
        micro = cfg.data.init_args.get("batch_size") if cfg.get("data") else None
        accumulation = cfg.trainer.get("accumulate_grad_batches") or 1
        global_batch = micro * accumulation * processes if isinstance(micro, int) else None
    return accelerator == "gpu", processes, global_batch


def tune_batch_size(argv: list[str]) -> int:
    from litune.tuning.batch_size import find_largest, run_probe, split_global_batch

    args, fit_args = _batch_parser().parse_known_args(argv)
    on_gpu, processes, config_global = launch_shape(fit_args)
    budget = args.max_memory_gib
    if budget is None and not on_gpu:
        per_node = processes  # an upper bound: every process of the run may be on this node
        budget = 0.8 * psutil.virtual_memory().total / 1024**3 / per_node
        print(
            f"memory budget: {budget:.1f} GiB per process (80% of this machine's RAM / {per_node}); "
            "set --max-memory-gib to change it",
            flush=True,
        )
    if budget is not None and budget <= 0:
        raise ConfigError("--max-memory-gib", f"must be positive, got {budget}", "give the memory per process in GiB")
    if args.start < 1 or args.max_batch_size < args.start:
        raise ConfigError("--start", f"need 1 <= start <= max batch size, got {args.start}", "fix --start")

    def probe(size: int):  # noqa: ANN202 - a closure over the parsed arguments
        result = run_probe(fit_args, size, budget, on_gpu, steps=args.steps)
        peak = "died" if result.peak_gib is None else f"{result.peak_gib:.2f} GiB"
        print(
            f"micro batch {size:>5}: {peak:>10}  {'fits' if result.fits else 'does not fit: ' + result.reason}",
            flush=True,
        )
        return result

    largest, _ = find_largest(probe, start=args.start, max_batch_size=args.max_batch_size, precision=args.precision)
    if largest == 0:
        raise ConfigError(
            "--max-memory-gib",
            f"even micro batch {args.start} does not fit" + (f" in {budget:.2f} GiB" if budget else ""),
            "raise the budget, shorten data.init_args.block_size, enable gradient checkpointing or shard (ZeRO/FSDP)",
        )
    lines = [f"largest micro batch that fits: {largest}"]
    global_batch = args.global_batch_size or config_global
    if global_batch:
        micro, accumulation = split_global_batch(global_batch, largest, processes)
        lines.append(
            f"for a global batch of {global_batch} on {processes} process(es): micro batch {micro} x accumulation "
            f"{accumulation}  (--data.init_args.batch_size={micro} --trainer.accumulate_grad_batches={accumulation})"
        )
    print("\n".join(lines), flush=True)
    return 0


SUBCOMMANDS = {"lr": tune_lr, "batch-size": tune_batch_size}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        raise ConfigError("tune", f"unknown tuner {argv[0]!r}", f"use one of: {', '.join(SUBCOMMANDS)}")
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(__doc__)
        return 0
    return SUBCOMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
