"""Activation memory saved by per-block gradient checkpointing, measured against no checkpointing in the same run.

For each architecture (the custom decoder and the encoder-decoder) and each setting (checkpointing off / on) one
training step (forward + backward) is measured in a fresh subprocess, so allocator state does not leak between them:

- ``saved``: bytes that autograd keeps for the backward pass, summed by ``torch.autograd.graph.saved_tensors_hooks``
  over distinct storages, parameters excluded. This is the activation memory, exactly, on any device.
- ``peak``: on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus before it; on CPU, the growth of the
  process's peak RSS (``ru_maxrss``) during the step (noisier: it includes gradients, temporaries and the allocator).
- ``time``: the wall time of the step (recomputation costs about one extra forward per block).

Usage (the sizes default to a GPT-2-small-like block at modest batch)::

    python bench/bench_checkpointing.py                                     # CPU, both architectures
    python bench/bench_checkpointing.py --d-model 768 --nhead 12 --layers 12 --seq 1024 --batch 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace, checkpointing: bool) -> torch.nn.Module:
    sizes = dict(d_model=args.d_model, nhead=args.nhead, vocab_size=args.vocab, max_seq_len=args.seq)
    if args.arch == "decoder":
        from litune.models.transformer import DecoderLM

        return DecoderLM(num_decoder_layers=args.layers, gradient_checkpointing=checkpointing, **sizes)
    from litune.models.seq2seq import Seq2SeqLM

    return Seq2SeqLM(
        num_encoder_layers=args.layers, num_decoder_layers=args.layers, gradient_checkpointing=checkpointing, **sizes
    )


def measure(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    """One forward + backward; runs inside the subprocess."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = build(args, checkpointing).to(device).train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    kwargs = {"labels": x} if args.arch == "decoder" else {"attention_mask": torch.ones_like(x), "labels": x}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        # Warm-up step on CUDA (kernels, cuBLAS workspaces); the peak counter is reset after it. On CPU there is no
        # such reset for the peak RSS, so the measured step is the first one there.
        net(x, **kwargs).loss.backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x, **kwargs).loss
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"saved": sum(seen.values()), "peak": peak, "time": time.perf_counter() - start}


def _child_argv(argv: list[str]) -> list[str]:
    """The parent's arguments without ``--arch`` and ``--json`` (and their values): the child prints, never writes."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--arch", "--json"):
            skip = True
        elif not arg.startswith(("--arch=", "--json=")):
            out.append(arg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["decoder", "seq2seq", "both"], default="both")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--nhead", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (and encoder layers for seq2seq)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="A tiny model: checks the script in seconds.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.nhead, args.layers, args.seq, args.batch, args.vocab = 64, 2, 2, 64, 2, 512
    if args.child:
        print(json.dumps(measure(args, args.child == "on")))
        return
    mib = 2**20
    print(f"size: d_model={args.d_model} nhead={args.nhead} layers={args.layers} seq={args.seq} batch={args.batch} "
          f"vocab={args.vocab} device={args.device} torch={torch.__version__}")  # fmt: skip
    report = {"benchmark": "checkpointing", "command": " ".join(sys.argv), "args": vars(args), "results": {}}
    for arch in ["decoder", "seq2seq"] if args.arch == "both" else [args.arch]:
        results = {}
        for setting in ("off", "on"):
            argv = _child_argv(sys.argv[1:]) + ["--arch", arch]
            out = subprocess.run(
                [sys.executable, __file__, *argv, "--child", setting], capture_output=True, text=True, check=True
            )
            results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        report["results"][arch] = results
        off, on = results["off"], results["on"]
        print(f"{arch:8s} saved activations: {off['saved'] / mib:8.1f} MiB -> {on['saved'] / mib:7.1f} MiB "
              f"({on['saved'] / off['saved']:.3f}x, {1 - on['saved'] / off['saved']:.1%} saved) | "
              f"peak growth: {off['peak'] / mib:8.1f} MiB -> {on['peak'] / mib:7.1f} MiB "
              f"({on['peak'] / max(off['peak'], 1):.3f}x) | step time {off['time']:.2f}s -> {on['time']:.2f}s "
              f"({on['time'] / off['time']:.2f}x)")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
