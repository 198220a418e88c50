"""``litune fit`` against a hand-written PyTorch loop and ``transformers.Trainer``: tokens/s, start-up, per-step loss.

Every side trains the same saved GPT-2-architecture weights on the same batches (litune's ``TextDataModule``: same
tokens, same collation), with the same AdamW settings, constant learning rate, precision, no dropout and no gradient
clipping, and reads the loss on the same steps, every ``--log-every`` (Lightning's default 50: the loop calls
``loss.item()`` there, litune logs with ``log_every_n_steps``, the Trainer with ``logging_steps``). Each side is a
whole process timed from outside, at ``n1`` and ``n2`` steps, interleaved over rounds (see ``_harness.py``). The loop
and litune see the same batches in the same order, so their logged losses must agree to float noise; the Trainer
shuffles with its own sampler (and logs the mean since its last log), so only its final loss is comparable.

    python bench/bench_overhead.py                                  # tiny and small sizes, 3 rounds, CPU
    python bench/bench_overhead.py --sizes tiny --steps 50 650 --rounds 5   # framework overhead, steady state
    python bench/bench_overhead.py --quick                          # < 1 minute: tiny size, 1 round, few steps
    python bench/bench_overhead.py --sizes gpt2 --device cuda --precision bf16-mixed --compile
    python bench/bench_overhead.py --json bench-results/overhead.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import SIZES, Setup, interleaved, max_loss_difference, prepare, versions, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument(
        "--sides", nargs="+", default=["litune", "loop", "trainer"], choices=["litune", "loop", "trainer"]
    )
    parser.add_argument("--steps", nargs=2, type=int, default=[10, 40], metavar=("N1", "N2"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=50, help="Every side reads its loss every this many steps.")
    parser.add_argument("--compile", action="store_true", help="Also time every side with torch.compile.")
    parser.add_argument("--compile-sides", nargs="+", default=None, help="Sides timed with --compile (default: all).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, help="Default: 32-true on CPU, bf16-mixed on CUDA.")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of every side (the same for all).")
    parser.add_argument("--peak-flops", type=float, default=None, help="Device peak FLOP/s: adds an MFU column.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--work", type=Path, default=None, help="Keep data, models and runs here (default: a tmp dir).")
    parser.add_argument("--quick", action="store_true", help="Tiny size, 1 round, 2 and 6 steps: checks the script.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.steps, args.log_every = ["tiny"], 1, [2, 6], 1
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    return args


def sides_for(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    sides: dict[str, tuple[str, dict]] = {s: (s, {}) for s in args.sides}
    if "loop" in args.sides and args.device == "cpu" and not args.quick:
        # litune fit keeps freed host memory for the next step (litune.host_memory); the loop with the same malloc
        # settings separates that from the framework's own overhead.
        sides["loop+host_alloc"] = ("loop", {"host_allocator": True})
    if args.compile:
        for s in args.compile_sides or args.sides:
            options = {"compile": True}
            if s == "litune":
                options["litune"] = {"model": {"compile": True}}  # LitLM's one switch: model.compile
            sides[f"{s}+compile"] = (s, options)
    return sides


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    """A Markdown table: one row per size and side, ratios against the plain loop measured in the same run."""
    lines = [
        f"{args.device}, {args.precision}, OMP_NUM_THREADS={args.threads}, steps {args.steps[0]} and "
        f"{args.steps[1]}, loss read every {args.log_every} steps, {args.rounds} interleaved rounds, medians",
        "",
        "| size | side | tokens/s | vs loop | vs Trainer | MFU | ms/step | start-up s | max loss diff vs loop "
        "| final loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, timings in results.items():
        loop, trainer = timings.get("loop"), timings.get("trainer")
        for label, t in timings.items():
            vs_loop = f"{t.tokens_per_s / loop.tokens_per_s:.3f}" if loop else "-"
            vs_trainer = f"{t.tokens_per_s / trainer.tokens_per_s:.3f}" if trainer else "-"
            same_batches = loop and not label.startswith("trainer")
            diff = f"{max_loss_difference(t.losses, loop.losses):.1e}" if same_batches else "-"
            final = f"{t.losses[-1][1]:.4f}" if t.losses else "-"
            flops = SIZES[size].flops_per_token() * t.tokens_per_s
            mfu = f"{flops / args.peak_flops:.1%}" if args.peak_flops else "-"
            lines.append(
                f"| {size} | {label} | {t.tokens_per_s:,.0f} | {vs_loop} | {vs_trainer} | {mfu} "
                f"| {t.per_step_s * 1e3:.1f} | {t.startup_s:.1f} | {diff} | {final} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, tokenizer = prepare(work, max_bytes=300_000 if args.quick else 1_000_000)
        setup = Setup(work=work, corpus=corpus, tokenizer=tokenizer, precision=args.precision, device=args.device)
        setup.threads, setup.log_every = args.threads, args.log_every
        results = {}
        for name in args.sizes:
            results[name] = interleaved(setup, sides_for(args), SIZES[name], *args.steps, rounds=args.rounds)
    if args.quick:
        print("(--quick: a few steps once, to check the script; the timings below mean nothing)")
    print(table(results, args), flush=True)
    payload = {"benchmark": "overhead", "args": vars(args), "results": results, "versions": versions()}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
