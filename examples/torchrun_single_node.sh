#!/usr/bin/env bash
# Any megalite stage on the GPUs (or CPU cores) of one machine, with torchrun.
#   bash examples/torchrun_single_node.sh                       # Llama-3-8B pretraining on 8 GPUs
#   STAGE=sft CONFIG=examples/configs/sft_llama3_8b.yaml bash examples/torchrun_single_node.sh data.path=/data/chat
#   NPROC_PER_NODE=2 CONFIG=examples/configs/tiny.yaml bash examples/torchrun_single_node.sh parallel.tp=2   # CPU, gloo
# Extra arguments are key=value overrides of the config (e.g. parallel.tp=4 train.micro_batch_size=2).
set -euo pipefail

# STAGE: pretrain | sft | rm | dpo | ppo | grpo | eval | generate.
STAGE=${STAGE:-pretrain}
# CONFIG: the run config; its parallel section sets TP/PP/VPP/SP, and DP is NPROC_PER_NODE / (tp*pp).
CONFIG=${CONFIG:-examples/configs/llama3_8b.yaml}
# NPROC_PER_NODE: processes (ranks) on this machine, one per GPU; default: every GPU nvidia-smi lists.
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 8}')}
# OMP_NUM_THREADS: CPU threads per rank; one keeps ranks from oversubscribing the cores they share.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# --standalone: a private rendezvous on localhost with a free port, so two jobs on one machine
# never collide (no MASTER_ADDR/MASTER_PORT to pick).
exec torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" \
    -m megalite.cli "$STAGE" --config "$CONFIG" "$@"
