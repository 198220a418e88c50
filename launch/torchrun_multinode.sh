#!/usr/bin/env bash
# Several nodes with torchrun and c10d rendezvous: run this same command on every node.
#   MASTER_ADDR=node0 NNODES=2 NPROC_PER_NODE=8 launch/torchrun_multinode.sh --config configs/gpt2-finetune.yaml \
#       --config configs/strategy/deepspeed_zero2.yaml
# The rendezvous (c10d, hosted by the agent on MASTER_ADDR) assigns node ranks, so nodes need no NODE_RANK and may
# start in any order. Topology only: NNODES, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT (default 29400) and RUN_ID
# (default: the user and MASTER_PORT; give each concurrent job its own). All ranks share one litune run folder
# named after RUN_ID (torchrun passes it as TORCHELASTIC_RUN_ID).
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NPROC_PER_NODE:?set NPROC_PER_NODE, processes (GPUs) per node}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host that runs the rendezvous}"
MASTER_PORT=${MASTER_PORT:-29400}
RUN_ID=${RUN_ID:-${USER:-litune}-${MASTER_PORT}}
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m litune.cli fit "$@" --trainer.devices="$NPROC_PER_NODE" --trainer.num_nodes="$NNODES"
