#!/usr/bin/env bash
# Several nodes with torchrun and c10d rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=2 NPROC_PER_NODE=8 launch/torchrun_multinode.sh --config configs/gpt2-finetune.yaml \
#       --config configs/strategy/deepspeed_zero2.yaml
# The rendezvous (c10d, hosted by the agent on MASTER_ADDR) assigns node ranks, so nodes need no NODE_RANK and may
# start in any order. Topology only: NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT (default 29400) and RUN_ID.
# All ranks share one litune run folder named after RUN_ID (torchrun passes it as TORCHELASTIC_RUN_ID), and
# `--ckpt_path last` resumes that folder's checkpoint, so RUN_ID must be new for each job and the same on every node.
# Default: the scheduler's job id (SLURM, PBS, LSF, SGE, Flux), unique per job and known on every node; without a
# scheduler there is no id that all nodes know, so give one (e.g. RUN_ID=$(date +%Y%m%d-%H%M%S) once, passed to all
# nodes) or the script refuses to start. A single node may omit it: a timestamp is used.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NPROC_PER_NODE:?set NPROC_PER_NODE, processes (GPUs) per node}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host that runs the rendezvous}"
MASTER_PORT=${MASTER_PORT:-29400}
RUN_ID=${RUN_ID:-${SLURM_JOB_ID:-${PBS_JOBID:-${LSB_JOBID:-${JOB_ID:-${FLUX_JOB_ID:-}}}}}}
if [[ -z "$RUN_ID" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "torchrun_multinode.sh: set RUN_ID to a new id for this job, the same on all $NNODES nodes" \
      "(e.g. RUN_ID=\$(date +%Y%m%d-%H%M%S)); no scheduler job id was found to use" >&2
    exit 2
  fi
  RUN_ID=$(date +%Y%m%d-%H%M%S)-$$
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m litune.cli fit "$@" --trainer.devices="$NPROC_PER_NODE" --trainer.num_nodes="$NNODES"
