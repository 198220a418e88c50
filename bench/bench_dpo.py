"""DPO step time of litune against TRL's ``DPOTrainer``, side by side, and DPO's peak memory chunked vs plain.

1. **Step time.** The same tiny GPT-2 (saved once, loaded by both), the same tokenizer (litune's stdlib BPE), the same
   pairs (:mod:`litune.preference.stdlib_pairs`), the same settings (DPO sigmoid, beta 0.1, a frozen copy of the model
   as the reference, AdamW lr 1e-4, fp32, micro-batch ``--batch`` pairs, no accumulation, dropout off, CPU) train
   ``--steps`` optimizer steps in this one process, first with litune (``LitLM`` with ``model.preference``), then
   with TRL. A callback times each optimizer step (from the micro-batch's start to the end of the optimizer step) in
   both; the median after ``--warmup`` steps is reported, and the ratio litune / TRL (< 1: litune is faster). TRL
   computes a few extra metrics per step (entropy, token accuracy) as it does by default; both log every step.
2. **Peak memory.** One DPO training step (policy log-probs with gradient, reference log-probs without, the loss,
   the backward) of a one-block GPT-2 at GPT-2's vocabulary (50,257), with log-probs chunked through the output
   layer (``logps_chunk_size``) and plain (the full float32 ``[2 x pairs, seq, vocab]`` log-softmax). Peak tensor
   memory on CPU by :class:`LiveTensorBytes` (storage bytes alive at once, counted per operation), on CUDA by
   ``max_memory_allocated``.

    python bench/bench_dpo.py                   # 20 steps of 8 pairs; memory at 4 pairs x 256 tokens
    python bench/bench_dpo.py --quick           # a few steps, small memory case: checks the script
    python bench/bench_dpo.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def tokenizer_folder(root: Path) -> Path:
    """litune's stdlib BPE (4096 tokens; cached after its first training) saved as a Hugging Face folder."""
    from litune.data.tokenizer import TrainedBPE, load_tokenizer

    folder = root / "tokenizer"
    tok = load_tokenizer(TrainedBPE(corpus="stdlib", vocab_size=4096, max_bytes=4_000_000))
    tok.save_pretrained(folder)
    return folder


def tiny_model(root: Path, vocab: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=vocab, n_positions=256, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    folder = root / "model"
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def litune_steps(args: argparse.Namespace, model: Path, tokenizer: Path, pairs: Path, root: Path) -> list[float]:
    import lightning as L
    import torch

    from litune.models.hf import HFCausalLM
    from litune.module import LitLM
    from litune.preference.data import PreferenceDataModule
    from litune.preference.objective import Preference

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            times.append(time.perf_counter() - self.start)

    L.seed_everything(0)
    module = LitLM(
        HFCausalLM(pretrained=str(model)),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        preference=Preference(loss="sigmoid", beta=0.1, reference="copy"),
    )
    data = PreferenceDataModule(str(tokenizer), str(pairs), max_prompt_length=None, max_length=args.max_length,
                                batch_size=args.batch, val_fraction=0, cache_dir=str(root / "cache"))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        limit_val_batches=0, callbacks=[Timer()])  # fmt: skip
    trainer.fit(module, data)
    return times


def trl_steps(args: argparse.Namespace, model: Path, tokenizer: Path, pairs: Path, root: Path) -> list[float]:
    import datasets
    import transformers
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            times.append(time.perf_counter() - self.start)

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rows = datasets.Dataset.from_list([json.loads(line) for line in pairs.read_text().splitlines()])
    config = DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                       learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                       loss_type=["sigmoid"], max_length=args.max_length, report_to=[], logging_steps=1,
                       save_strategy="no", use_cpu=True, disable_dropout=True, seed=0)  # fmt: skip
    trainer = DPOTrainer(model=str(model), args=config, train_dataset=rows, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times


class LiveTensorBytes:
    """Peak bytes of tensor storage alive at once on the CPU during the context: the given tensors (weights,
    gradients) plus every storage an operation creates, until it is freed.

    Why not ``torch.distributed._tools.mem_tracker.MemTracker`` (as bench_fused_loss.py): it refuses a module called
    more than once before a backward pass, which the chunked output layer and the no-grad reference both do.
    """

    def __init__(self, tensors: list) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self.seen: set[int] = set()
        self.current = self.peak = 0
        for t in tensors:
            self._add(t)
            if t.grad is not None:
                self._add(t.grad)
        self.peak = self.current
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        counter._add(t)
                return out

        self.mode = Mode()

    def _add(self, tensor) -> None:
        import weakref

        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        nbytes = storage.nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.current -= nbytes

    def __enter__(self) -> LiveTensorBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def dpo_step_peak(vocab: int, pairs: int, seq: int, chunk: int | None, device: str) -> dict[str, float]:
    """Peak memory and time of one DPO step of a one-block GPT-2 (see the module docstring)."""
    import torch

    from litune.models.hf import HFCausalLM
    from litune.preference.logps import sequence_logps
    from litune.preference.losses import PreferenceLoss, pair_terms
    from litune.preference.reference import frozen_copy

    torch.manual_seed(0)
    config = {"model_type": "gpt2", "vocab_size": vocab, "n_positions": seq, "n_embd": 128, "n_layer": 1, "n_head": 4,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0,
              "eos_token_id": 0}  # fmt: skip
    net = HFCausalLM(config=config).to(device).train()
    ref = frozen_copy(net)
    ids = torch.randint(0, vocab, (2 * pairs, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt of a quarter of the row
    batch = {"input_ids": ids, "labels": labels}
    loss = PreferenceLoss("sigmoid", beta=0.1)

    def step() -> float:
        with torch.no_grad():
            r = sequence_logps(ref, batch, chunk).logps
        p = sequence_logps(net, batch, chunk)
        terms = pair_terms(loss, p.logps[:pairs], p.logps[pairs:], p.tokens[:pairs], p.tokens[pairs:], r[:pairs],
                           r[pairs:])  # fmt: skip
        value = terms.losses.mean()
        value.backward()
        net.zero_grad(set_to_none=False)
        return float(value.detach())

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = step()
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated(), "time": time.perf_counter() - start, "loss": value}
    start = time.perf_counter()
    value = step()
    elapsed = time.perf_counter() - start  # timed apart: counting every op's outputs slows them
    with LiveTensorBytes(list(net.parameters()) + list(ref.parameters())) as counter:
        step()
    return {"peak": counter.peak, "time": elapsed, "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=400, help="pairs in the data set")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary of the memory case")
    parser.add_argument("--mem-pairs", type=int, default=4)
    parser.add_argument("--mem-seq", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="device of the memory case (the step-time case is CPU)")
    parser.add_argument("--quick", action="store_true", help="5 steps, 64 pairs, memory at 1 pair x 64 tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.pairs, args.mem_pairs, args.mem_seq, args.chunk_size = 5, 1, 64, 1, 64, 32
    import torch

    from litune.preference.stdlib_pairs import stdlib_pairs

    report: dict = {"benchmark": "dpo", "command": " ".join(sys.argv), "args": vars(args),
                    "threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        root = Path(tmp)
        tokenizer = tokenizer_folder(root)
        from transformers import AutoTokenizer

        model = tiny_model(root, len(AutoTokenizer.from_pretrained(tokenizer)))
        pairs = root / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(r) + "\n" for r in stdlib_pairs(args.pairs)))
        times = {"litune": litune_steps(args, model, tokenizer, pairs, root),
                 "trl": trl_steps(args, model, tokenizer, pairs, root)}  # fmt: skip
    median = {k: statistics.median(v[args.warmup :]) for k, v in times.items()}
    report["step_time_s"] = {"median": median, "all": times, "ratio_litune_over_trl": median["litune"] / median["trl"]}
    print(f"\nDPO step time, {args.batch} pairs/step, {args.steps} steps (median after {args.warmup}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| | litune | TRL DPOTrainer | litune / TRL |\n|---|---:|---:|---:|")
    ratio = median["litune"] / median["trl"]
    print(f"| median step (s) | {median['litune']:.3f} | {median['trl']:.3f} | {ratio:.2f} |")

    mib = 2**20
    memory = {label: dpo_step_peak(args.vocab, args.mem_pairs, args.mem_seq, chunk, args.device)
              for label, chunk in (("plain", None), ("chunked", args.chunk_size))}  # fmt: skip
    report["memory"] = memory
    logits = 2 * args.mem_pairs * args.mem_seq * args.vocab * 4
    print(f"\nDPO step peak memory, vocab {args.vocab}, {args.mem_pairs} pairs x {args.mem_seq} tokens, "
          f"{args.device}; one [2P, T, V] fp32 tensor = {logits / mib:.0f} MiB")  # fmt: skip
    print("| | plain | chunked | chunked / plain |\n|---|---:|---:|---:|")
    plain, chunked = memory["plain"], memory["chunked"]
    print(f"| peak (MiB) | {plain['peak'] / mib:.0f} | {chunked['peak'] / mib:.0f} | "
          f"{chunked['peak'] / plain['peak']:.2f} |")  # fmt: skip
    print(f"| step time (s) | {plain['time']:.2f} | {chunked['time']:.2f} | {chunked['time'] / plain['time']:.2f} |")
    print(f"| loss | {plain['loss']:.6f} | {chunked['loss']:.6f} | |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
