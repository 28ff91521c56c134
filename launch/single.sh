#!/usr/bin/env bash
# Train on one GPU, or on the CPU when the machine has none: one process, no process group.
#
#   launch/single.sh --data-dir DIR [distmnist.train flags...]
#   CUDA_VISIBLE_DEVICES=3 launch/single.sh ...      # pick the GPU
#
# Every argument goes to `python -m distmnist.train` (see its --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# --config_file: always our config, so a personal ~/.cache/huggingface/accelerate/default_config.yaml
# cannot silently change the launch.
exec "$ACCELERATE" launch --config_file "$CONFIGS/single_gpu.yaml" -m distmnist.train "$@"
