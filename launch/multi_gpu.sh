#!/usr/bin/env bash
# Data parallel over all GPUs of this machine: one process per GPU (DDP over NCCL).
#
#   launch/multi_gpu.sh --data-dir DIR [distmnist.train flags...]
#   CUDA_VISIBLE_DEVICES=0,1 launch/multi_gpu.sh ...   # only some GPUs
#   NUM_PROCESSES=2 launch/multi_gpu.sh ...            # on a CPU-only machine: 2 processes over gloo
#
# Every argument goes to `python -m distmnist.train`. Each process trains --batch-size images per
# step, so the global batch is NUM_PROCESSES x --batch-size.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

gpus="$(count_gpus)"
NUM_PROCESSES="${NUM_PROCESSES:-$gpus}"
if (( gpus == 0 )); then
    # No GPU: run the processes on the CPU. `accelerate launch --cpu --num_processes N` would start a
    # single process, so keep --multi_gpu (it is what starts N processes) and tell Accelerate to use
    # the CPU; distmnist then joins them over gloo.
    export ACCELERATE_USE_CPU=1
    if [[ "$NUM_PROCESSES" == 0 ]]; then
        echo "error: no GPU found; set NUM_PROCESSES to run that many processes on the CPU" >&2
        exit 2
    fi
fi
require_int NUM_PROCESSES "$NUM_PROCESSES" 1

if (( NUM_PROCESSES == 1 )); then  # --multi_gpu needs at least 2 processes
    exec "$ACCELERATE" launch --config_file "$CONFIGS/single_gpu.yaml" -m distmnist.train "$@"
fi
exec "$ACCELERATE" launch --config_file "$CONFIGS/multi_gpu.yaml" --num_processes "$NUM_PROCESSES" \
    -m distmnist.train "$@"
