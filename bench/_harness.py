"""Shared machinery of the speed benchmarks: data, model folders, whole-process runs, interleaved timing.

Timing follows docs/benchmarks.md: every side is a whole process, timed from
outside; each side runs ``n1`` and ``n2`` steps and the per-step time is ``(t(n2) - t(n1)) / (n2 - n1)``, which removes
imports, data loading, model loading and the final checkpoint from both sides alike (reported apart as start-up). The
sides run interleaved (A B C A B C ...) for several rounds and the tables show medians, and ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_worker.py"


@dataclass(frozen=True)
class Size:
    """A GPT-2-architecture model and the tokens of one step (``batch x block``)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    batch: int
    block: int
    vocab: int = 8192

    def flops_per_token(self) -> float:
        """Training FLOPs per token, ``6N + 12·L·d·T`` (PaLM appendix B) as litune's ``flops_per_token``; ``N`` counts
        the (tied) token embedding, not the position table."""
        d, L = self.n_embd, self.n_layer
        n = self.vocab * d + L * (12 * d * d + 13 * d) + 2 * d
        return 6.0 * n + 12.0 * L * d * self.block


SIZES = {
    "tiny": Size("tiny", n_layer=2, n_embd=64, n_head=2, batch=8, block=64),
    "small": Size("small", n_layer=4, n_embd=256, n_head=4, batch=8, block=256),
    "gpt2": Size("gpt2", n_layer=12, n_embd=768, n_head=12, batch=8, block=1024, vocab=50257),
}
"""``tiny`` shows framework overhead; ``small`` is a CPU-sized model; ``gpt2`` is GPT-2 124M (GPU)."""


@dataclass
class Setup:
    """What every side of a run shares."""

    work: Path
    corpus: Path
    tokenizer: Path
    precision: str = "32-true"
    device: str = "cpu"
    lr: float = 1e-3
    weight_decay: float = 0.1
    seed: int = 0
    threads: str = "1"
    log_every: int = 50  # Lightning's default log_every_n_steps; every side reads its loss on these steps only
    env: dict[str, str] = field(default_factory=dict)  # given to every side alike (e.g. glibc's MALLOC_* settings)
    cores: str | None = None  # `taskset -c CORES` for every side (e.g. "1"), or None
    clip: float = 0.0  # gradient clipping by norm on every side (0: none, the default of litune and the loops)
    runs: list[dict] = field(default_factory=list)


def versions() -> dict[str, str]:
    """Library versions and the machine, for the JSON and the docs."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for lib in ("torch", "lightning", "transformers", "deepspeed"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            out[lib] = "-"
    return out


def prepare(work: Path, vocab: int = 8192, max_bytes: int = 1_000_000) -> tuple[Path, Path]:
    """A local corpus (standard-library source, one JSON line per file) and a BPE of ``vocab`` tokens trained on it."""
    from litune.data.stdlib import stdlib_python_files
    from litune.data.tokenizer import TrainedBPE

    corpus, tokenizer = work / "corpus.jsonl", work / f"tokenizer-{vocab}"
    files = stdlib_python_files(max_bytes=max_bytes)
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": p.read_text(encoding="utf-8")}) + "\n" for p in files))
    if not tokenizer.exists():
        bpe = TrainedBPE(corpus=[str(p) for p in files], vocab_size=vocab, cache_dir=str(work / "cache"))
        bpe.load().save_pretrained(tokenizer)
    return corpus, tokenizer


def model_dir(setup: Setup, size: Size, vocab: int) -> Path:
    """Save a seeded GPT-2 of ``size`` once; every side loads these same weights (no dropout: nothing random)."""
    path = setup.work / f"model-{size.name}-{vocab}"
    if not path.exists():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(setup.seed)
        config = GPT2Config(
            vocab_size=vocab, n_positions=size.block, n_embd=size.n_embd, n_layer=size.n_layer, n_head=size.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _env(setup: Setup) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LITUNE_HOST_ALLOCATOR"}
    env.update(OMP_NUM_THREADS=setup.threads, LITUNE_CACHE=str(setup.work / "cache"), HF_HUB_OFFLINE="1")
    env.update(setup.env)
    env.pop("LITUNE_RUN_DIR", None)
    return env


ALLOCATORS = {
    # glibc's malloc keeps freed buffers (litune.host_memory's settings) in every side, given through the environment
    # (litune then leaves them as they are): like for like.
    "same": lambda: __import__("litune.host_memory", fromlist=["MALLOC_ENV"]).MALLOC_ENV,
    # glibc's defaults in every side: litune told not to change them.
    "glibc": lambda: {"LITUNE_HOST_ALLOCATOR": "default"},
}
"""The allocator settings every side shares in one table: name -> environment."""


def litune_config(setup: Setup, size: Size, model: Path, steps: int, extra: dict | None = None) -> dict:
    """The ``litune fit`` config of one run: defaults except what both sides must share."""
    network = {"pretrained": str(model), **((extra or {}).get("network") or {})}
    return {
        "experiment": "bench",
        "seed_everything": setup.seed,
        "model": {
            **((extra or {}).get("model") or {}),
            "tokenizer": str(setup.tokenizer),
            "network": {"class_path": "litune.models.HFCausalLM", "init_args": network},
            "optimizer": {
                "class_path": "torch.optim.AdamW",
                "init_args": {
                    "lr": setup.lr,
                    "weight_decay": setup.weight_decay,
                    **((extra or {}).get("optimizer") or {}),
                },
            },
            "lr_schedule": {"name": "constant", "warmup_steps": 0},
        },
        "data": {
            "class_path": "litune.data.text.TextDataModule",
            "init_args": {
                "path": str(setup.corpus),
                "block_size": size.block,
                "batch_size": size.batch,
                "val_fraction": 0.0,
                "seed": setup.seed,
            },
        },  # fmt: skip
        "trainer": {
            "accelerator": setup.device,
            "devices": 1,
            "precision": setup.precision,
            "max_steps": steps,
            "limit_val_batches": 0,
            # Every side reads the loss on the same steps (the loop calls loss.item() there, as a hand-written loop
            # that prints it does): no side pays a per-step logging cost the others skip.
            "log_every_n_steps": setup.log_every,
            **({"gradient_clip_val": setup.clip} if setup.clip else {}),
            **((extra or {}).get("trainer") or {}),
        },
    }


def run_side(setup: Setup, side: str, size: Size, steps: int, options: dict | None = None) -> dict:
    """Run one whole process of ``side`` (``litune``, ``loop`` or ``trainer``) for ``steps`` steps.

    Returns:
        ``{"side", "steps", "seconds" (wall time from outside), "losses" ([step, loss] on the logged steps)}``.
    """
    options = options or {}
    tag = f"{side}-{size.name}-{steps}-{len(setup.runs)}"
    out = setup.work / "runs" / tag
    shutil.rmtree(out, ignore_errors=True)  # left by an earlier invocation with the same --work
    out.mkdir(parents=True)
    model = model_dir(setup, size, options.get("vocab", size.vocab))
    if side == "litune":  # `loop`, `minimal` (the loop without a DataLoader) and `trainer` run bench/_worker.py
        config = litune_config(setup, size, model, steps, options.get("litune"))
        (out / "config.json").write_text(json.dumps(config))  # JSON is YAML
        cmd = [str(Path(sys.executable).parent / "litune"), "fit", "--config", str(out / "config.json")]
        cmd += [f"--runs_dir={out}", "--loggers=[csv]"]
    else:
        spec = {
            "model": str(model), "tokenizer": str(setup.tokenizer), "corpus": str(setup.corpus),
            "block_size": size.block, "batch_size": size.batch, "steps": steps, "lr": setup.lr,
            "weight_decay": setup.weight_decay, "seed": setup.seed, "precision": setup.precision,
            "device": setup.device, "compile": bool(options.get("compile")), "out_dir": str(out),
            "losses": str(out / "losses.json"), "log_every": setup.log_every, "clip": setup.clip,
        }  # fmt: skip
        (out / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, str(WORKER), side, str(out / "spec.json")]
    if setup.cores is not None:
        cmd = ["taskset", "-c", setup.cores, *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(setup), capture_output=True, text=True, cwd=out)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{side} ({size.name}, {steps} steps) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    losses = _litune_losses(out) if side == "litune" else json.loads((out / "losses.json").read_text())["losses"]
    record = {"side": side, "size": size.name, "steps": steps, "seconds": seconds, "losses": losses, **options}
    setup.runs.append(record)
    return record


def _litune_losses(out: Path) -> list[list[float]]:
    """``[step, loss]`` of every logged step (0-based optimizer step, as the baselines count)."""
    import csv

    found = list(out.glob("*/metrics.csv"))
    if not found:  # a run shorter than the logging interval logs nothing
        return []
    (metrics,) = found
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return sorted([int(r["step"]), float(r["train/loss"])] for r in rows)


@dataclass
class Timing:
    """Per-side result of :func:`interleaved`: medians over rounds."""

    side: str
    per_step_s: float
    startup_s: float
    tokens_per_s: float
    per_step_rounds: list[float]
    losses: list[list[float]]


def interleaved(
    setup: Setup, sides: dict[str, tuple[str, dict]], size: Size, n1: int, n2: int, rounds: int
) -> dict[str, Timing]:
    """Time every side at ``n1`` and ``n2`` steps, interleaved over ``rounds`` rounds.

    Args:
        sides: label -> (side, options) e.g. ``{"litune": ("litune", {}), "loop": ("loop", {})}``.

    Returns:
        label -> :class:`Timing` (medians; the losses of the last ``n2``-step run).
    """
    per_step: dict[str, list[float]] = {label: [] for label in sides}
    startup: dict[str, list[float]] = {label: [] for label in sides}
    last: dict[str, list[float]] = {}
    for side, options in sides.values():
        if options.get("compile"):  # every compiled side, litune's included (bench_overhead.sides_for)
            # Untimed: fills torch.compile's on-disk caches, so that the n1 and n2 runs of every round compile alike
            # (a cold first compile would be charged to the n1 run only and make the per-step time too small).
            run_side(setup, side, size, n1, options)
    for _ in range(rounds):
        for label, (side, options) in sides.items():
            short = run_side(setup, side, size, n1, options)
            long = run_side(setup, side, size, n2, options)
            step = (long["seconds"] - short["seconds"]) / (n2 - n1)
            per_step[label].append(step)
            startup[label].append(short["seconds"] - n1 * step)
            last[label] = long["losses"]
    tokens = size.batch * size.block
    return {
        label: Timing(
            side=label,
            per_step_s=statistics.median(per_step[label]),
            startup_s=statistics.median(startup[label]),
            tokens_per_s=tokens / statistics.median(per_step[label]),
            per_step_rounds=per_step[label],
            losses=last[label],
        )
        for label in sides
    }


def max_loss_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest loss difference over the steps both runs logged (``[step, loss]`` lists)."""
    other = {int(step): loss for step, loss in b}
    return max((abs(loss - other[int(step)]) for step, loss in a if int(step) in other), default=float("nan"))


def write_json(path: Path | None, payload: dict) -> None:
    """Write ``payload`` (dataclasses converted) with the versions and the command line, when a path is given."""
    if path is None:
        return
    payload = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **payload}
    payload.setdefault("versions", versions())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )
