#!/usr/bin/env bash
# Single node, several GPUs (or CPU processes): one process per device, started by torchrun.
#   launch/torchrun.sh --config configs/quickstart.yaml --config configs/strategy/ddp.yaml
# Topology only, from the environment: NPROC_PER_NODE (default: all visible GPUs). Everything else is litune's config.
set -euo pipefail
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
  -m litune.cli fit "$@" --trainer.devices="$NPROC_PER_NODE" --trainer.num_nodes=1
