#!/usr/bin/env bash
# Any megalite stage on several machines with torchrun's c10d rendezvous. Run the same command on
# every node (the order they start in does not matter; they wait for each other):
#   RDZV_HOST=node0.cluster NNODES=2 bash examples/torchrun_multi_node.sh data.path=/data/web_text_document
#   STAGE=sft CONFIG=examples/configs/sft_llama3_8b.yaml RDZV_HOST=node0 NNODES=2 bash examples/torchrun_multi_node.sh
# On Slurm, use examples/slurm/*.sbatch instead (they add requeue on preemption).
set -euo pipefail

# STAGE: pretrain | sft | rm | dpo | ppo | grpo | eval | generate.
STAGE=${STAGE:-pretrain}
# CONFIG: the run config; world size = NNODES * NPROC_PER_NODE, DP = world / (tp * pp).
CONFIG=${CONFIG:-examples/configs/llama3_8b.yaml}
# NNODES: machines in the job (a range MIN:MAX lets torchrun start with MIN and admit late nodes).
NNODES=${NNODES:-2}
# NPROC_PER_NODE: ranks per machine, one per GPU.
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
# RDZV_HOST / RDZV_PORT: where the c10d rendezvous store lives: any node all others can reach,
# conventionally the first one. The port must be free there and open between the nodes.
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST to the hostname of one node (e.g. the first)}
RDZV_PORT=${RDZV_PORT:-29500}
# RDZV_ID: names this job at the store, so a second job using the same host/port cannot join it.
RDZV_ID=${RDZV_ID:-megalite-$STAGE}
# MAX_RESTARTS: torchrun restarts all ranks this many times after a failure; each restart resumes
# from the run dir's latest checkpoint (checkpoint.load=auto).
MAX_RESTARTS=${MAX_RESTARTS:-0}
# OMP_NUM_THREADS: CPU threads per rank for host-side work.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NCCL_SOCKET_IFNAME (optional): the network interface NCCL bootstraps over, if it picks a wrong one.
# NCCL_IB_HCA (optional): the InfiniBand adapters to use.

exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RDZV_ID" \
    --max_restarts "$MAX_RESTARTS" \
    -m megalite.cli "$STAGE" --config "$CONFIG" "$@"
