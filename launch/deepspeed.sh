#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (passwordless ssh from this node to every host; pdsh by default):
#   HOSTFILE=launch/hostfile NNODES=2 NPROC_PER_NODE=8 launch/deepspeed.sh --config configs/gpt2-finetune.yaml \
#       --config configs/strategy/deepspeed_zero3.yaml
# The hostfile lists "<host> slots=<GPUs>" per line (see launch/hostfile.example). Topology only: HOSTFILE, NNODES,
# NPROC_PER_NODE, MASTER_ADDR (default: first host), MASTER_PORT (default 29500). With NNODES=1 and no hostfile the
# launcher starts the processes on this machine without ssh.
set -euo pipefail
HOSTFILE=${HOSTFILE:-launch/hostfile}
: "${NNODES:?set NNODES, the number of hosts to use from the hostfile}"
: "${NPROC_PER_NODE:?set NPROC_PER_NODE, processes (GPUs) per host}"
if [[ -f "$HOSTFILE" ]]; then
  hosts=(--hostfile="$HOSTFILE")
  MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
elif [[ "$NNODES" == 1 ]]; then
  hosts=()
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
else
  echo "launch/deepspeed.sh: NNODES=$NNODES needs a hostfile; $HOSTFILE does not exist (see hostfile.example)" >&2
  exit 2
fi
# All ranks must agree on one run folder and this launcher has no job id: name it here (litune reads LITUNE_RUN_ID).
# The launcher forwards it to the ranks on this host; for other hosts put it in ./.deepspeed_env (see README.md).
export LITUNE_RUN_ID=${LITUNE_RUN_ID:-ds-$(date +%Y%m%d-%H%M%S)}
HERE=$(cd "$(dirname "$0")" && pwd)
# The launcher sets RANK/LOCAL_RANK/WORLD_SIZE but names the node rank CROSS_RANK; launch/deepspeed_rank.sh maps it
# to NODE_RANK for Lightning and runs `litune fit` (--no_python: it is not a Python file; --no_local_rank: litune
# reads LOCAL_RANK from the environment, not a --local_rank argument).
exec deepspeed "${hosts[@]}" --num_nodes="$NNODES" --num_gpus="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" --no_python --no_local_rank \
  "$HERE/deepspeed_rank.sh" fit "$@" --trainer.devices="$NPROC_PER_NODE" --trainer.num_nodes="$NNODES"
