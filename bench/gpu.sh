#!/usr/bin/env bash
# Every GPU benchmark and GPU-only test in one command, on one CUDA device (H100/H200: under 8 minutes).
#
#   bash bench/gpu.sh                 # on a GPU machine; results under $OUT (default bench-results/gpu-<date>)
#   bash bench/gpu.sh --dry-run       # the same steps on CPU at tiny sizes: checks the script (tests/test_bench.py)
#
# Each step writes a JSON and a text table into $OUT; the tables also go to stdout. A failing step is reported and the
# next one still runs (GPU minutes are scarce: one failure must not waste the rest); the exit status is 1 if any failed.
# Copy the numbers into docs/benchmarks.md with the device name (in $OUT/machine.txt) and this command.
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
OUT="${OUT:-$REPO/bench-results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
FAILED=()

step() {  # step NAME COMMAND...: run one benchmark, keep its output, never stop the script
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  if "$@" > >(tee "$OUT/$name.txt") 2> "$OUT/$name.err"; then
    echo "=== $name: ok in $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  else
    echo "=== $name: FAILED after $((SECONDS - start)) s (see $OUT/$name.err)" | tee -a "$OUT/log.txt"
    tail -n 20 "$OUT/$name.err"
    FAILED+=("$name")
  fi
}

if (( DRY_RUN )); then
  DEVICE=cpu; PRECISION=32-true; SIZE=tiny; QUICK=(--quick); PEAK=()
  echo "dry run on CPU: tiny sizes, quick modes" > "$OUT/machine.txt"
else
  DEVICE=cuda; PRECISION=bf16-mixed; SIZE=gpt2; QUICK=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1 || true
  # Dense bf16 peak of the device, for MFU (H100 SXM 989 TFLOP/s; H200 the same chip): override with PEAK_FLOPS.
  PEAK=(--peak-flops "${PEAK_FLOPS:-989e12}")
fi
"$PYTHON" -c "import sys; sys.path.insert(0, '$HERE'); import json, _harness; print(json.dumps(_harness.versions()))" \
  >> "$OUT/machine.txt"
cat "$OUT/machine.txt"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# 1. GPU-only tests (skipped without CUDA, so the dry run only collects them).
if (( DRY_RUN )); then
  step gpu-tests "$PYTHON" -m pytest "$REPO/tests" -m gpu -q --collect-only
else
  # A GPU image may lack a package that only CPU-side test modules import (wandb, say): those modules' collection
  # errors must not keep the GPU tests from running.
  step gpu-tests "$PYTHON" -m pytest "$REPO/tests" -m gpu -q -rA -p no:cacheprovider --continue-on-collection-errors
fi

# 2. GPT-2 124M, bf16-mixed, flash SDPA: litune vs the hand-written loop vs transformers.Trainer, with and without
#    torch.compile (litune's model.compile; an untimed warm-up run fills the compile caches first); tokens/s and MFU.
#    One round (GPU steps are steady; compile time is start-up, excluded). 10 and 60 steps: on an H200 the 20/120-step
#    version took 306 s of the script's 8 minutes (2026-12-04).
step overhead "$PYTHON" "$HERE/bench_overhead.py" --sizes "$SIZE" --device "$DEVICE" --precision "$PRECISION" \
  --compile --compile-sides litune --rounds 1 --steps 10 60 --threads "$OMP_NUM_THREADS" "${PEAK[@]}" "${QUICK[@]}" \
  --json "$OUT/overhead.json"

# 3. The chunked loss's memory saving at vocab 50,257 (GPT-2's), for every network family: 8 x 1024 tokens in bf16.
if (( DRY_RUN )); then
  step fused-loss "$PYTHON" "$HERE/bench_fused_loss.py" --device cpu --quick --json "$OUT/fused_loss.json"
else
  step fused-loss "$PYTHON" "$HERE/bench_fused_loss.py" --device cuda --batch 8 --seq 1024 --d-model 768 --nhead 12 \
    --json "$OUT/fused_loss.json"
fi

# 4. Model-state bytes and peak memory per strategy (one device; DDP, ZeRO-2, ZeRO-3), beside litune estimate.
if (( DRY_RUN )); then
  step memory "$PYTHON" "$HERE/bench_memory.py" --quick --devices 1 --precision 32-true --json "$OUT/memory.json"
else
  step memory "$PYTHON" "$HERE/bench_memory.py" --accelerator gpu --devices 1 --n-embd 768 --n-layer 12 --n-head 12 \
    --strategies ddp deepspeed_zero2 deepspeed_zero3 --json "$OUT/memory.json"
fi

# 5. Activation memory with and without gradient checkpointing.
step checkpointing "$PYTHON" "$HERE/bench_checkpointing.py" --device "$DEVICE" "${QUICK[@]}" \
  --json "$OUT/checkpointing.json"

# 6. (issue 27) Long context: per-rank activations of one training forward at 8k-32k tokens on GPT-2 124M's shape
#    (fp32, batch 1) and model state, beside litune estimate (bench_parallel.py). Sequence parallelism (sp2, Ulysses)
#    and tensor parallelism (tp2) need 2 GPUs (one NCCL rank each): added when the machine has them.
if (( DRY_RUN )); then
  step long-context "$PYTHON" "$HERE/bench_parallel.py" --quick --layouts tp1 --json "$OUT/long_context.json"
else
  LAYOUTS=(tp1)
  if (( $(nvidia-smi -L 2>/dev/null | wc -l) >= 2 )); then LAYOUTS+=(tp2 sp2); fi
  step long-context "$PYTHON" "$HERE/bench_parallel.py" --device cuda --layouts "${LAYOUTS[@]}" --n-layer 12 \
    --n-embd 768 --n-head 12 --vocab 50257 --state-seq 512 --seq 8192 16384 32768 --json "$OUT/long_context.json"
fi

# 4. (issue 13, adapters) Full fine-tuning vs LoRA vs DoRA vs QLoRA (4-bit NF4 base) on GPT-2-small's shape, bf16-mixed:
#    peak memory, trainable parameters, checkpoint size, tokens/s and validation perplexity after the same steps.
if (( DRY_RUN )); then
  step peft "$PYTHON" "$HERE/bench_peft.py" --quick --methods full,lora,dora,qlora --json "$OUT/peft.json"
else
  step peft "$PYTHON" "$HERE/bench_peft.py" --device cuda --precision bf16-mixed --methods full,lora,dora,qlora \
    --n-layer 12 --n-embd 768 --n-head 12 --vocab 8192 --seq 512 --batch 8 --r 16 --pretrain-steps 300 \
    --n1 20 --n2 120 --rounds 1 --workdir "$OUT/peft-work" --json "$OUT/peft.json"
fi

echo "results in $OUT"
if (( ${#FAILED[@]} )); then
  echo "failed steps: ${FAILED[*]}"
  exit 1
fi
