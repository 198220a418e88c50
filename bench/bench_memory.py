"""Per-rank model-state memory of every strategy, measured on CPU ranks, beside ``litune estimate``'s prediction.

Runs ``litune fit`` for one optimizer step with each strategy fragment on N CPU processes (gloo; DeepSpeed's CPU
accelerator), each rank writing the bytes of the parameters, fp32 master weights and optimizer states it holds
(:class:`litune.callbacks.model_state.ModelStateReport`), then prints a table of measured vs. predicted bytes and each
strategy's per-rank model state as a ratio of DDP's, measured in the same run.

    python bench/bench_memory.py                       # 2 processes, bf16-mixed, all strategies
    python bench/bench_memory.py --precision 32-true --n-embd 128 --n-layer 4

Gradients are not in the measurement (DeepSpeed frees them between steps); the prediction's gradient bytes are shown
separately.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from litune.memory_model import ModelShape, RunShape, StrategyShape, estimate

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "ddp": StrategyShape(),
    "deepspeed_zero1": StrategyShape(stage=1, deepspeed=True),
    "deepspeed_zero2": StrategyShape(stage=2, deepspeed=True),
    "deepspeed_zero2_offload": StrategyShape(stage=2, deepspeed=True, offload_optimizer=True),
    "deepspeed_zero3": StrategyShape(stage=3, deepspeed=True),
    "deepspeed_zero3_offload": StrategyShape(stage=3, deepspeed=True, offload_optimizer=True, offload_params=True),
    "fsdp2": StrategyShape(fsdp=True),
    # One node here: hybrid sharding in groups of 1 process (2 replicas x 1 shard) shows it apart from full sharding.
    "fsdp2_hybrid": StrategyShape(fsdp=True, hybrid=True, shard_size=1),
    "fsdp2_offload": StrategyShape(fsdp=True, offload_optimizer=True, offload_params=True),
}
EXTRA_ARGS = {"fsdp2_hybrid": ["--trainer.strategy.init_args.shard_size=1"]}


def prepare(work: Path) -> tuple[Path, Path]:
    """A small local corpus (standard-library source) and a 512-token BPE trained on it."""
    from litune.data.stdlib import stdlib_python_files
    from litune.data.tokenizer import TrainedBPE

    corpus = work / "corpus.jsonl"
    files = stdlib_python_files(max_bytes=200_000)
    corpus.write_text("".join(json.dumps({"text": p.read_text(encoding="utf-8")}) + "\n" for p in files))
    tokenizer = work / "tokenizer"
    TrainedBPE(corpus=[str(p) for p in files], vocab_size=512, cache_dir=tokenizer).load().save_pretrained(tokenizer)
    return corpus, tokenizer


def run_strategy(strategy: str, work: Path, corpus: Path, tokenizer: Path, args: argparse.Namespace) -> list[dict]:
    network = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 64, "n_embd": args.n_embd}
    network.update(n_layer=args.n_layer, n_head=args.n_head)
    callbacks = [{"class_path": "litune.callbacks.model_state.ModelStateReport"}]
    runs = work / "runs" / strategy
    cmd = [
        str(Path(sys.executable).parent / "litune"), "fit",
        "--config", str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml"),
        f"--model.tokenizer={tokenizer}", f"--model.network.init_args.config={json.dumps(network)}",
        f"--data.init_args.path={corpus}", f"--runs_dir={runs}",
        f"--trainer.devices={args.devices}", f"--trainer.precision={args.precision}",
        f"--trainer.accelerator={args.accelerator}", "--loggers=[csv]",
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--checkpoint.save_last=false",
        "--checkpoint.save_top_k=0", f"--trainer.callbacks={json.dumps(callbacks)}", *EXTRA_ARGS.get(strategy, []),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LITUNE_RUN_DIR", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
    (run,) = runs.iterdir()
    reports = [json.loads(p.read_text()) for p in sorted((run / "model_state").glob("rank*.json"))]
    peak = _peak_gib(run / "metrics.csv")
    return [{**r, "peak_gib": peak} for r in reports]


def _peak_gib(metrics: Path) -> float | None:
    """Rank 0's ``memory/peak_gib`` (MemoryMonitor: CUDA max allocated, or process RSS on CPU) from the run's CSV."""
    import csv

    if not metrics.exists():
        return None
    with metrics.open() as f:
        values = [float(r["memory/peak_gib"]) for r in csv.DictReader(f) if r.get("memory/peak_gib")]
    return max(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--strategies", nargs="*", default=list(SHAPES))
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo ranks) or gpu (one GPU per rank).")
    parser.add_argument("--quick", action="store_true", help="DDP and ZeRO-2 only: checks the script.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    if args.quick:
        args.strategies = ["ddp", "deepspeed_zero2"]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        corpus, tokenizer = prepare(work)
        results = {s: run_strategy(s, work, corpus, tokenizer, args) for s in args.strategies}
    psi = results[args.strategies[0]][0]["num_params"]
    model = ModelShape(num_params=psi, n_layer=args.n_layer, hidden=args.n_embd, n_head=args.n_head, vocab_size=512)
    run = RunShape(seq_len=32, micro_batch=4, precision=args.precision, devices=args.devices)
    print(f"Ψ = {psi} parameters, {args.devices} CPU processes, {args.precision}; bytes per rank (rank 0 | rank 1 ...)")
    header = "| strategy | params measured | params predicted | master+optimizer measured | predicted (device+host) |"
    print(header + " grads predicted | measured model state vs DDP | peak GiB (rank 0) |")
    print("|---" * 8 + "|")
    baseline = None
    for strategy, reports in results.items():
        shape = SHAPES[strategy]
        predicted = estimate(model, run, shape)
        # Offloaded state is the same tensors, in host memory: compare the measurement with what the same strategy
        # holds without offload (device + host).
        held = estimate(model, run, replace(shape, offload_optimizer=False, offload_params=False))
        want_params, want_optimizer = held.params, held.optimizer
        state = [r["params"] + r["master"] + r["optimizer"] for r in reports]
        baseline = baseline or state[0]
        params = " / ".join(str(r["params"]) for r in reports)
        optim = " / ".join(str(r["master"] + r["optimizer"]) for r in reports)
        print(
            f"| {strategy} | {params} | {want_params:.0f} | {optim} | {want_optimizer:.0f} | {predicted.grads:.0f} "
            f"| {state[0] / baseline:.3f} | {reports[0]['peak_gib'] or float('nan'):.3f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": "memory", "command": " ".join(sys.argv), "args": vars(args), "results": results}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
