"""Full fine-tuning vs LoRA vs DoRA (vs QLoRA): memory, trainable parameters, checkpoint size, tokens/s, val perplexity.

Setting: a GPT-2-architecture ``HFCausalLM`` is first pretrained briefly on one half of the Python standard library's
modules (the "base", saved as a Hugging Face folder, made once per work folder), then each method fine-tunes that base
on the *other* half for the same steps, batch, data order, precision and AdamW settings (learning rates: 3e-4 for full,
3e-3 for adapters, the usual 10x), through litune's ``LitLM`` and Lightning's ``Trainer`` (the checkpoint it writes is
litune's: adapters only for adapter methods).

Every training run is a fresh subprocess, timed from outside, methods interleaved (A B C, A B C, ...) for ``--rounds``
rounds; per-step time is ``(t(N2) - t(N1)) / (N2 - N1)`` from runs of ``--n1`` and ``--n2`` steps (start-up, data
loading and the final checkpoint cancel out); the median over rounds is reported. The N2 run also reports:

- ``trainable``/``total``: parameter counts (4-bit weights at their real count).
- ``state MiB``: model-state bytes counted from the tensors: parameters + gradients of trainable parameters + AdamW
  moments (the part adapters shrink; activations are the same for every method).
- ``peak MiB``: on CPU the whole process's peak RSS (Python, torch and Lightning are the same for every method, so
  the difference to ``full`` is what the method saves: weights, gradients, optimizer state, activations); on GPU
  ``torch.cuda.max_memory_allocated`` during training.
- ``ckpt MiB``: size of the ``last.ckpt`` the Trainer wrote.
- ``val ppl``: perplexity on held-out blocks of the fine-tuning half after N2 steps (``exp`` of the mean token loss).

Usage::

    python bench/bench_peft.py                                   # CPU, full vs lora vs dora, stated default size
    python bench/bench_peft.py --device cuda --precision bf16-mixed --methods full,lora,dora,qlora \
        --n-embd 768 --n-layer 12 --n-head 12 --seq 512                   # GPU, GPT-2-small size (bench/gpu.sh)
    python bench/bench_peft.py --quick                                   # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

METHODS = ("full", "lora", "dora", "qlora")


def prepare(args: argparse.Namespace) -> None:
    """Tokenizer, token blocks of both halves, and the pretrained base, cached in ``args.workdir``."""
    work = Path(args.workdir)
    if (work / "base" / "config.json").exists():
        return
    import sysconfig

    from transformers import GPT2Config, GPT2LMHeadModel

    from litune.data.tokenizer import TrainedBPE

    work.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    halves = {"pretrain": files[::2], "finetune": files[1::2]}  # alternate modules: same style, different code
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for name, paths in halves.items():
        (corpus / f"{name}.txt").write_text("\n".join(p.read_text(encoding="utf-8") for p in paths), encoding="utf-8")
    tokenizer = TrainedBPE(corpus=[str(corpus / "pretrain.txt")], vocab_size=args.vocab, cache_dir=work).load()
    tokenizer.save_pretrained(work / "tokenizer")
    for name in halves:
        ids = tokenizer((corpus / f"{name}.txt").read_text(encoding="utf-8"))["input_ids"]
        n = len(ids) // args.seq
        blocks = torch.tensor(ids[: n * args.seq]).view(n, args.seq)
        blocks = blocks[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
        torch.save(blocks, work / f"{name}.pt")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=args.seq, vocab_size=args.vocab,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).to(args.device).train()
    blocks = torch.load(work / "pretrain.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(args.pretrain_steps):
        rows = torch.arange(step * args.batch, (step + 1) * args.batch) % len(blocks)
        x = blocks[rows].to(args.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(work / "base")


def train(args: argparse.Namespace, method: str, steps: int) -> dict[str, float]:
    """Fine-tune the base with ``method`` for ``steps`` optimizer steps; runs inside the subprocess."""
    import lightning as L
    from torch.utils.data import DataLoader

    from litune.models.adapters import Adapters, count_parameters
    from litune.models.hf import HFCausalLM
    from litune.module import LitLM

    work, device = Path(args.workdir), torch.device(args.device)
    L.seed_everything(0, verbose=False)
    network = HFCausalLM(pretrained=str(work / "base"), quantize="nf4" if method == "qlora" else None)
    adapters = (
        None
        if method == "full"
        else Adapters(method="dora" if method == "dora" else "lora", r=args.r, alpha=2 * args.r)
    )
    lr = 3e-4 if method == "full" else 3e-3
    system = LitLM(network, optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.0), adapters=adapters)
    blocks = torch.load(work / "finetune.pt")
    val, train_blocks = blocks[: args.val_blocks], blocks[args.val_blocks :]
    rows = [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in train_blocks]
    ckpt_dir = work / "runs" / f"{method}-{steps}-{os.getpid()}"
    trainer = L.Trainer(
        max_steps=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision=args.precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(ckpt_dir),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)],
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_before = torch.cuda.memory_allocated()
    trainer.fit(system, DataLoader(rows, batch_size=args.batch, shuffle=False))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - mem_before
    else:  # the whole process: Python, torch, Lightning are common to all methods, so differences are meaningful
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable, total = count_parameters(network)
    trainable_params = [p for p in network.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in network.parameters()}.values())
    state = param_bytes + sum(p.numel() * p.element_size() * 3 for p in trainable_params)  # + grad + 2 Adam moments
    network.eval().to(device)
    losses, counts = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in args.precision):
        for i in range(0, len(val), args.batch):
            x = val[i : i + args.batch].to(device)
            out = network(input_ids=x, labels=x)
            losses.append(float(out.loss) * x[:, 1:].numel())
            counts.append(x[:, 1:].numel())
    ckpt = ckpt_dir / "last.ckpt"
    return {
        "trainable": trainable, "total": total, "state": state, "peak": peak,
        "ckpt": ckpt.stat().st_size if ckpt.is_file() else float("nan"),
        "val_ppl": math.exp(sum(losses) / sum(counts)),
    }  # fmt: skip


def run_child(args: argparse.Namespace, method: str, steps: int) -> tuple[float, dict[str, float]]:
    argv = [*sys.argv[1:], "--child", method, "--child-steps", str(steps)]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{method} x {steps} failed:\n{out.stderr[-4000:]}")
    return elapsed, json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora,dora", help=f"comma-separated, from {METHODS}")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8, help="adapter rank (alpha = 2r), all linear layers")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--val-blocks", type=int, default=64)
    parser.add_argument("--n1", type=int, default=20)
    parser.add_argument("--n2", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default="/tmp/litune-bench-peft")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="a few seconds of work at a tiny size: checks the script")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n_layer, args.n_embd, args.n_head, args.vocab, args.seq = 1, 64, 2, 512, 32
        args.pretrain_steps, args.n1, args.n2, args.rounds, args.val_blocks = 5, 2, 4, 1, 8
        args.workdir = f"{args.workdir}-quick"
    if args.child:
        print(json.dumps(train(args, args.child, args.child_steps)))
        return
    methods = args.methods.split(",")
    prepare(args)
    import lightning
    import peft
    import transformers

    print(f"size: GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch} r={args.r} precision={args.precision} device={args.device} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')} torch={torch.__version__} "
          f"lightning={lightning.__version__} transformers={transformers.__version__} "
          f"peft={peft.__version__}")  # fmt: skip
    times: dict[str, dict[int, list[float]]] = {m: {args.n1: [], args.n2: []} for m in methods}
    last: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for steps in (args.n1, args.n2) if not args.quick else (args.n2,):  # --quick: checks, no timing
            for method in methods:
                elapsed, result = run_child(args, method, steps)
                times[method][steps].append(elapsed)
                if steps == args.n2:
                    last[method] = result
    mib = 2**20
    rows = []
    print("| method | trainable | total | state MiB | peak MiB | vs full | ckpt MiB | tokens/s | step s | val ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in methods:
        if args.quick:
            t1, t2, per_step = float("nan"), statistics.median(times[method][args.n2]), float("nan")
        else:
            t1, t2 = statistics.median(times[method][args.n1]), statistics.median(times[method][args.n2])
            per_step = (t2 - t1) / (args.n2 - args.n1)
        r = last[method]
        row = {"method": method, **r, "step_s": per_step, "tokens_per_s": args.batch * args.seq / per_step,
               "startup_s": t1 - args.n1 * per_step}  # fmt: skip
        rows.append(row)
        base_peak = last.get("full", r)["peak"]
        print(f"| {method} | {r['trainable']:,} | {r['total']:,} | {r['state'] / mib:.1f} | {r['peak'] / mib:.0f} | "
              f"{(r['peak'] - base_peak) / mib:+.0f} | "
              f"{r['ckpt'] / mib:.2f} | {row['tokens_per_s']:.0f} | {per_step:.3f} | {r['val_ppl']:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
