#!/bin/bash
# One node, all its GPUs (or N CPU processes on gloo with NPROC=N for a CPU smoke test).
#   bash examples/torchrun/single-node.sh examples/configs/finpythia-6.9b-dacp.yaml [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: single-node.sh CONFIG [key=value ...]}; shift
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC:-1}; [ "$NPROC" -ge 1 ] || NPROC=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    -m megacpt train --config "$CONFIG" "$@"
