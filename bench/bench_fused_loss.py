"""Peak memory and time of the training loss with and without ``loss_chunk_size``, at GPT-2's vocabulary (50,257).

For each network family (litune's decoder, the encoder-decoder, a Hugging Face GPT-2) one training step (forward of a
one-block network + loss + backward) is measured per setting, after a warm-up step:

- ``peak``: the most tensor memory alive at once during the step, weights and gradients included: on CUDA
  ``torch.cuda.max_memory_allocated`` (after a warm-up step); on CPU, tensor storage bytes counted by PyTorch's
  ``torch.distributed._tools.mem_tracker.MemTracker`` (exact, unlike the process RSS, which the allocator blurs).
- ``logits``: the bytes of one ``[batch, seq, vocab]`` float32 tensor, the size of what the plain loss adds.
- ``time``: the step's wall time (the chunked loss recomputes each chunk's logits in the backward pass).

The loss values of both settings are printed side by side (they agree to float noise).

    python bench/bench_fused_loss.py                          # CPU, 4 x 512 tokens, fp32
    python bench/bench_fused_loss.py --device cuda --batch 8 --seq 1024 --precision bf16-mixed
    python bench/bench_fused_loss.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

FAMILIES = ("decoder", "seq2seq", "hf")


def build(family: str, args: argparse.Namespace, chunk: int | None):
    import torch

    torch.manual_seed(0)
    sizes = dict(d_model=args.d_model, nhead=args.nhead, vocab_size=args.vocab, max_seq_len=args.seq)
    if family == "decoder":
        from litune.models.transformer import DecoderLM

        return DecoderLM(num_decoder_layers=1, loss_chunk_size=chunk, **sizes)
    if family == "seq2seq":
        from litune.models.seq2seq import Seq2SeqLM

        return Seq2SeqLM(num_encoder_layers=1, num_decoder_layers=1, loss_chunk_size=chunk, **sizes)
    from litune.models.hf import HFCausalLM

    config = {"model_type": "gpt2", "vocab_size": args.vocab, "n_positions": args.seq, "n_embd": args.d_model,
              "n_layer": 1, "n_head": args.nhead, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
    return HFCausalLM(config=config, loss_chunk_size=chunk)


def measure(args: argparse.Namespace, family: str, chunk: int | None) -> dict[str, float]:
    """One training step of ``family`` with the loss chunked by ``chunk`` rows (``None``: the plain loss)."""
    import torch

    device = torch.device(args.device)
    net = build(family, args, chunk).to(device).train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    bf16 = args.precision == "bf16-mixed"

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
        out.loss_sum.backward()
        net.zero_grad(set_to_none=False)  # gradients kept allocated, as between optimizer steps
        return float(out.loss.detach())

    step()  # warm-up (kernels, workspaces, gradient buffers)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "time": time.perf_counter() - start, "loss": loss}
    from torch.distributed._tools.mem_tracker import MemTracker

    start = time.perf_counter()
    loss = step()
    elapsed = time.perf_counter() - start  # timed apart: the tracker's bookkeeping slows every op
    tracker = MemTracker()
    tracker.track_external(net)
    with tracker:
        step()
    return {"peak": tracker.get_tracker_snapshot("peak")[device]["Total"], "time": elapsed, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--nhead", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (CUDA default).")
    parser.add_argument("--quick", action="store_true", help="1 x 128 tokens: checks the script in seconds.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.quick:
        args.batch, args.seq, args.chunk_size = 1, 128, 64
    mib = 2**20
    logits = args.batch * args.seq * args.vocab * 4
    print(f"vocab={args.vocab} d_model={args.d_model} tokens={args.batch}x{args.seq} chunk={args.chunk_size} "
          f"device={args.device} {args.precision}; one [B,T,V] fp32 tensor = {logits / mib:.0f} MiB")  # fmt: skip
    print("\n| family | peak plain MiB | peak chunked MiB | saved MiB | chunked/plain | time plain s | time chunked s "
          "| loss plain | loss chunked |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    report = {"benchmark": "fused_loss", "command": " ".join(sys.argv), "args": vars(args), "results": {}}
    for family in args.families:
        results = {
            label: measure(args, family, chunk) for label, chunk in (("plain", None), ("chunked", args.chunk_size))
        }
        report["results"][family] = results
        plain, chunked = results["plain"], results["chunked"]
        print(f"| {family} | {plain['peak'] / mib:.0f} | {chunked['peak'] / mib:.0f} "
              f"| {(plain['peak'] - chunked['peak']) / mib:.0f} | {chunked['peak'] / max(plain['peak'], 1):.2f} "
              f"| {plain['time']:.2f} | {chunked['time']:.2f} | {plain['loss']:.5f} | {chunked['loss']:.5f} |",
              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
