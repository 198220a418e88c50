"""``litune eval --checkpoint RUN|CKPT|HF_DIR --tasks T1,T2``: benchmark a model with lm-evaluation-harness.

The model is loaded as ``litune generate`` loads it (a run folder, a checkpoint of any strategy, an adapter folder or
a Hugging Face folder) and handed to the harness in memory, adapters on. litune's offline tasks live in
``configs/eval/`` (``litune_heldout_python``: held-out perplexity; ``litune_python_mc``: multiple choice); harness
registry tasks (``hellaswag``, ``arc_easy``...) need the hub for their datasets.

Results go to ``RUN/eval/`` for a run folder or a checkpoint inside one, else to ``./eval`` (or ``--output``):
``eval_results.json`` and ``eval_results.md``. For a run folder or a checkpoint inside one, the metrics are also
logged once, at the checkpoint's step, to the loggers the run trained with (its ``config.yaml``: CSV ``metrics.csv``,
so ``litune report`` shows them; TensorBoard; the same MLflow run; wandb, offline unless keyed); a bare checkpoint
or a Hugging Face folder outside a run folder has no loggers: its results are only the two files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from litune.errors import CommandParser, ConfigError
from litune.runs import CONFIG_FILE


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="litune eval", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="A run folder, a .ckpt (any strategy), an adapter or Hugging Face folder."
    )
    parser.add_argument("--tasks", required=True, help="Comma-separated task names (litune_python_mc,arc_easy).")
    parser.add_argument("--limit", type=float, default=None, help="At most N documents per task (0 < N < 1: a share).")
    parser.add_argument("--num-fewshot", type=int, default=None, help="Few-shot examples per prompt.")
    parser.add_argument("--batch-size", type=int, default=8, help="Documents per forward pass.")
    parser.add_argument("--include", action="append", default=[], help="A folder of extra task YAML (repeatable).")
    parser.add_argument(
        "--output",
        default=None,
        help="Results folder (default: RUN/eval, else ./eval). A run folder's loggers get the metrics too; a bare "
        "checkpoint or Hugging Face folder outside a run folder: the files only.",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available).")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """The task list; bad numbers refused before the model loads."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks", f"{args.tasks!r} names no task", "e.g. --tasks litune_python_mc")
    if args.limit is not None and not args.limit > 0:
        raise ConfigError("--limit", f"{args.limit} is not positive", "give a document count or a share in (0, 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError("--num-fewshot", f"{args.num_fewshot} is negative", "use 0 or more")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"{args.batch_size} is not positive", "use 1 or more")
    return tasks


def results_folder(checkpoint: str, output: str | None) -> tuple[Path, Path | None]:
    """(where results are written, the run folder or None)."""
    from litune.runs import run_dir_of

    path = Path(checkpoint)
    run = path if (path / "checkpoints").is_dir() else run_dir_of(path)
    if output is not None:
        return Path(output), run
    return (run / "eval" if run is not None else Path("eval")), run


def checkpoint_step(checkpoint: str) -> int | None:
    """The optimizer step a litune checkpoint was saved at (None for a Hugging Face folder)."""
    from litune.runs import resolve_checkpoint

    path = Path(checkpoint)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    try:
        ckpt = resolve_checkpoint(path)
    except ConfigError:
        return None
    from litune.strategies.safe_load import checkpoint_meta

    step = checkpoint_meta(ckpt, "--checkpoint").get("global_step")  # a .ckpt file, a DeepSpeed or FSDP2 folder
    return int(step) if step is not None else None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    tasks = check_args(args)
    import torch

    from litune.commands.generate import load_for_generation
    from litune.evaluation import evaluate, markdown_table, metrics, task_manager, write_results

    task_manager(tasks, args.include)  # unknown tasks refused before the model loads
    folder, run = results_folder(args.checkpoint, args.output)
    step = checkpoint_step(args.checkpoint)
    loggers = None
    if run is not None and step is not None and (run / CONFIG_FILE).is_file():
        loggers = run_loggers_of(run, args.checkpoint)  # built, nothing written: bad saved entries refused first
    network, tokenizer = load_for_generation(args.checkpoint)
    network.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate(
        network,
        tokenizer,
        tasks,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        include=args.include,
    )
    path = write_results(folder, results, step)
    print(markdown_table(results))
    print(f"results written to {path} and {path.with_suffix('.md')}")
    if loggers is not None and step is not None:
        log_once(loggers, metrics(results), step)
        names = ", ".join(type(logger).__name__ for logger in loggers) or "none configured"
        print(f"logged at step {max(step - 1, 0)} to the run's loggers: {names}")
    return 0


def run_loggers_of(run: Path, checkpoint: str) -> list[Any]:
    """The loggers ``run`` trained with (its ``config.yaml``: CSV, TensorBoard, MLflow, wandb), built as ``litune
    fit`` builds them, continuing from ``checkpoint`` (the wandb run id it keeps)."""
    from litune.commands.fit import run_loggers
    from litune.runs import resolve_checkpoint

    return run_loggers(run, resolve_checkpoint(Path(checkpoint)))


def log_once(loggers: list[Any], values: dict[str, float], step: int) -> None:
    """Log ``values`` once to each logger at the step of a checkpoint saved after ``step`` optimizer steps.

    Lightning logs the metrics of optimizer step ``k`` at step ``k - 1`` (the batch index), so the results sit on the
    last point of the training curves up to that checkpoint.
    """
    for logger in loggers:
        logger.log_metrics(values, step=max(step - 1, 0))
        logger.save()
        logger.finalize("success")  # MLflow: the run's eval results uploaded, the run marked finished again
