#!/bin/bash
# Run the same line on every node (without Slurm); MASTER_ADDR is the first node's address.
#   MASTER_ADDR=node0 NNODES=4 bash examples/torchrun/multi-node.sh examples/configs/finpythia-6.9b-dacp.yaml
set -euo pipefail
CONFIG=${1:?usage: multi-node.sh CONFIG [key=value ...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the first node}"
NNODES=${NNODES:?set NNODES}
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
exec torchrun --nnodes "$NNODES" --nproc-per-node "${NPROC_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-finpythia}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m megacpt train --config "$CONFIG" "$@"
