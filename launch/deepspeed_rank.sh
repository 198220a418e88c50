#!/usr/bin/env bash
# One rank under the DeepSpeed launcher (see launch/deepspeed.sh): Lightning reads the node rank from NODE_RANK.
set -euo pipefail
export NODE_RANK=${CROSS_RANK:-${NODE_RANK:-0}}
exec python -m litune.cli "$@"
