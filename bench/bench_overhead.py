"""``litune fit`` against a hand-written PyTorch loop and ``transformers.Trainer``: tokens/s, start-up, per-step loss.

Like for like: every side gets the same glibc malloc settings through the environment (``--allocators same``: those
``litune fit`` would set itself, :data:`litune.host_memory.MALLOC_ENV`), and a second table gives every side glibc's
defaults (``glibc``). The loop comes twice: ``loop`` with litune's ``DataLoader`` and collation, ``minimal`` without a
DataLoader (the same sequences sliced from one tensor). Every side uses fused AdamW (the Trainer's and litune's
default).
``--cores 1`` pins every side to that core with ``taskset``.

Every side trains the same saved GPT-2-architecture weights on the same batches (litune's ``TextDataModule``: same
tokens, same collation), with the same AdamW settings, constant learning rate, precision, no dropout and no gradient
clipping (``--clip NORM``: every side clips by that norm, litune with ``gradient_clip_val``, the Trainer with
``max_grad_norm``, the loops with ``clip_grad_norm_``), and reads the loss on the same steps, every ``--log-every``
(Lightning's default 50: the loop calls ``loss.item()`` there, litune logs with ``log_every_n_steps``, the Trainer
with ``logging_steps``). Each side is a
whole process timed from outside, at ``n1`` and ``n2`` steps, interleaved over rounds (see ``_harness.py``). The loop
and litune see the same batches in the same order, so their logged losses must agree to float noise; the Trainer
shuffles with its own sampler (and logs the mean since its last log), so only its final loss is comparable.

    python bench/bench_overhead.py                                  # tiny and small sizes, 3 rounds, CPU
    python bench/bench_overhead.py --sizes tiny --steps 50 650 --rounds 5   # framework overhead, steady state
    python bench/bench_overhead.py --quick                          # < 1 minute: tiny size, 1 round, few steps
    OMP_NUM_THREADS=1 python bench/bench_overhead.py --sizes tiny --cores 1 --steps 50 450   # like for like, pinned
    python bench/bench_overhead.py --sizes tiny --for-loop-litune   # also litune with the for-loop AdamW (before/after)
    python bench/bench_overhead.py --sizes gpt2 --device cuda --precision bf16-mixed --compile
    python bench/bench_overhead.py --json bench-results/overhead.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    ALLOCATORS,
    SIZES,
    Setup,
    interleaved,
    max_loss_difference,
    prepare,
    versions,
    write_json,
)

SIDES = ["litune", "loop", "minimal", "trainer"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES)
    parser.add_argument(
        "--allocators",
        nargs="+",
        default=None,
        choices=sorted(ALLOCATORS),
        help="One table per setting, each the same for every side (default on CPU: same glibc; cuda, --quick: same).",
    )
    parser.add_argument(
        "--for-loop-litune",
        action="store_true",
        help="Add a side `litune+for-loop`: litune with torch's per-parameter AdamW (litune's default before it ran "
        "the fused kernel), for a before/after in the same run.",
    )
    parser.add_argument("--cores", default=None, help="Pin every side with `taskset -c CORES` (e.g. 1, or 0,1).")
    parser.add_argument("--steps", nargs=2, type=int, default=[10, 40], metavar=("N1", "N2"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=50, help="Every side reads its loss every this many steps.")
    parser.add_argument("--compile", action="store_true", help="Also time every side with torch.compile.")
    parser.add_argument("--compile-sides", nargs="+", default=None, help="Sides timed with --compile (default: all).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, help="Default: 32-true on CPU, bf16-mixed on CUDA.")
    parser.add_argument(
        "--clip", type=float, default=0.0, help="Clip gradients by this norm on every side (default 0: no side clips)."
    )
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of every side (the same for all).")
    parser.add_argument("--peak-flops", type=float, default=None, help="Device peak FLOP/s: adds an MFU column.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--work", type=Path, default=None, help="Keep data, models and runs here (default: a tmp dir).")
    parser.add_argument("--quick", action="store_true", help="Tiny size, 1 round, 2 and 6 steps: checks the script.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.steps, args.log_every = ["tiny"], 1, [2, 6], 1
    if args.allocators is None:
        args.allocators = ["same", "glibc"] if args.device == "cpu" and not args.quick else ["same"]
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    return args


def sides_for(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    sides: dict[str, tuple[str, dict]] = {s: (s, {}) for s in args.sides}
    if args.for_loop_litune and "litune" in args.sides:
        sides["litune+for-loop"] = ("litune", {"litune": {"optimizer": {"fused": False, "foreach": False}}})
    if args.compile:
        for s in args.compile_sides or args.sides:
            options = {"compile": True}
            if s == "litune":
                options["litune"] = {"model": {"compile": True}}  # LitLM's one switch: model.compile
            sides[f"{s}+compile"] = (s, options)
    return sides


def table(results: dict[str, dict], args: argparse.Namespace, allocator: str = "same") -> str:
    """A Markdown table: one row per size and side, ratios against the loops and the Trainer of the same run."""
    pinned = f", taskset -c {args.cores}" if args.cores else ""
    lines = [
        f"{args.device}, {args.precision}, OMP_NUM_THREADS={args.threads}{pinned}, allocator: {allocator} on every "
        f"side, steps {args.steps[0]} and {args.steps[1]}, loss read every {args.log_every} steps, {args.rounds} "
        f"interleaved rounds, medians{f', gradients clipped at norm {args.clip} on every side' if args.clip else ''}",
        "",
        "| size | side | tokens/s | vs loop | vs minimal loop | vs Trainer | MFU | ms/step | per round ms/step "
        "| start-up s | max loss diff vs loop | final loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for size, timings in results.items():
        loop, minimal, trainer = timings.get("loop"), timings.get("minimal"), timings.get("trainer")
        for label, t in timings.items():
            vs_loop = f"{t.tokens_per_s / loop.tokens_per_s:.3f}" if loop else "-"
            vs_minimal = f"{t.tokens_per_s / minimal.tokens_per_s:.3f}" if minimal else "-"
            vs_trainer = f"{t.tokens_per_s / trainer.tokens_per_s:.3f}" if trainer else "-"
            same_batches = loop and not label.startswith("trainer")
            diff = f"{max_loss_difference(t.losses, loop.losses):.1e}" if same_batches else "-"
            final = f"{t.losses[-1][1]:.4f}" if t.losses else "-"
            flops = SIZES[size].flops_per_token() * t.tokens_per_s
            mfu = f"{flops / args.peak_flops:.1%}" if args.peak_flops else "-"
            rounds = " / ".join(f"{r * 1e3:.1f}" for r in t.per_step_rounds)
            lines.append(
                f"| {size} | {label} | {t.tokens_per_s:,.0f} | {vs_loop} | {vs_minimal} | {vs_trainer} | {mfu} "
                f"| {t.per_step_s * 1e3:.1f} | {rounds} | {t.startup_s:.1f} | {diff} | {final} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, tokenizer = prepare(work, max_bytes=300_000 if args.quick else 1_000_000)
        tables: dict[str, dict] = {}
        for allocator in args.allocators:
            setup = Setup(work=work, corpus=corpus, tokenizer=tokenizer, precision=args.precision, device=args.device)
            setup.threads, setup.log_every, setup.cores = args.threads, args.log_every, args.cores
            setup.clip = args.clip
            setup.env = dict(ALLOCATORS[allocator]())
            tables[allocator] = {
                name: interleaved(setup, sides_for(args), SIZES[name], *args.steps, rounds=args.rounds)
                for name in args.sizes
            }
            if args.quick:
                print("(--quick: a few steps once, to check the script; the timings below mean nothing)")
            print(table(tables[allocator], args, allocator), "", sep="\n", flush=True)
    # "results": the like-for-like table (the same allocator settings on every side); one entry per table as well.
    results = tables.get("same") or next(iter(tables.values()))
    payload = {"benchmark": "overhead", "args": vars(args), "results": results, "tables": tables, "uptime": _load()}
    payload["versions"] = versions()
    write_json(args.json, payload)
    return payload


def _load() -> str:
    """``uptime``'s load averages when the run ends: the machine is shared, say how busy it was."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "-"


if __name__ == "__main__":
    main()
