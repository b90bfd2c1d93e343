#!/usr/bin/env bash
# Multi-node pretraining with torchrun. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> bash examples/pretrain_torchrun.sh \
#       examples/configs/llama3_8b.yaml data.path=/data/web_text_document
# On one machine (CPU, gloo): NPROC=2 bash examples/pretrain_torchrun.sh examples/configs/tiny.yaml parallel.tp=2
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# One BLAS thread per rank: ranks share the node's cores, and oversubscription is far slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m megalite.cli pretrain --config "$CONFIG" "$@"
