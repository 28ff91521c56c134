#!/usr/bin/env bash
# Data parallel over several machines: run this once on every machine, with its own machine rank.
#
#   launch/multi_node.sh --num-machines 2 --machine-rank 0 --main-addr 10.0.0.1 -- --data-dir DIR   # on 10.0.0.1
#   launch/multi_node.sh --num-machines 2 --machine-rank 1 --main-addr 10.0.0.1 -- --data-dir DIR   # on the other
#
# Settings, as options before `--` or as environment variables (options win):
#   --num-machines     NUM_MACHINES      machines taking part                              (required)
#   --machine-rank     MACHINE_RANK      this machine: 0 .. NUM_MACHINES-1; 0 hosts the rendezvous (required)
#   --main-addr        MAIN_ADDR         address of machine 0, reachable from all machines (required)
#   --main-port        MAIN_PORT         free TCP port on machine 0                        (default 29500)
#   --gpus-per-machine GPUS_PER_MACHINE  processes per machine                  (default: GPUs here, 1 if none)
# Everything after `--` (or from the first unknown argument on) goes to `python -m distmnist.train`.
# Every machine must see the same data (or download it) and its own --output-dir is written by rank 0 only.
#
# A machine without GPUs runs its processes on the CPU over gloo, which is how this is tested on one
# host: two invocations, machine ranks 0 and 1, both with --main-addr 127.0.0.1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NUM_MACHINES="${NUM_MACHINES:-}"
MACHINE_RANK="${MACHINE_RANK:-}"
MAIN_ADDR="${MAIN_ADDR:-}"
MAIN_PORT="${MAIN_PORT:-29500}"
GPUS_PER_MACHINE="${GPUS_PER_MACHINE:-}"
while (( $# )); do
    case "$1" in
        --num-machines) NUM_MACHINES="$2"; shift 2 ;;
        --machine-rank) MACHINE_RANK="$2"; shift 2 ;;
        --main-addr) MAIN_ADDR="$2"; shift 2 ;;
        --main-port) MAIN_PORT="$2"; shift 2 ;;
        --gpus-per-machine) GPUS_PER_MACHINE="$2"; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

for name in NUM_MACHINES MACHINE_RANK MAIN_ADDR; do
    if [[ -z "${!name}" ]]; then
        echo "error: ${name} is not set (use --$(tr '[:upper:]_' '[:lower:]-' <<<"$name") or the environment)" >&2
        exit 2
    fi
done
require_int NUM_MACHINES "$NUM_MACHINES" 1
require_int MACHINE_RANK "$MACHINE_RANK" 0
require_int MAIN_PORT "$MAIN_PORT" 1
if (( MACHINE_RANK >= NUM_MACHINES )); then
    echo "error: MACHINE_RANK must be < NUM_MACHINES ($NUM_MACHINES), got $MACHINE_RANK" >&2
    exit 2
fi

gpus="$(count_gpus)"
if (( gpus == 0 )); then
    export ACCELERATE_USE_CPU=1  # CPU processes over gloo; --multi_gpu is still what starts them
fi
GPUS_PER_MACHINE="${GPUS_PER_MACHINE:-$(( gpus > 0 ? gpus : 1 ))}"
require_int GPUS_PER_MACHINE "$GPUS_PER_MACHINE" 1

# --num_processes is the total over all machines; accelerate starts total / machines on each.
exec "$ACCELERATE" launch --config_file "$CONFIGS/multi_node.yaml" \
    --num_machines "$NUM_MACHINES" \
    --num_processes "$(( NUM_MACHINES * GPUS_PER_MACHINE ))" \
    --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_ADDR" \
    --main_process_port "$MAIN_PORT" \
    -m distmnist.train "$@"
