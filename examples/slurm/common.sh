# Shared body of the stage sbatch files in this folder (sourced, not run). Each sbatch file sets
# its #SBATCH resources, then STAGE and CONFIG, and calls `megalite_launch "$@"`.
#
# What it does:
#   * one torchrun per node (srun --ntasks-per-node=1), all joining a c10d rendezvous on the
#     job's first node, so the same command works on any node count;
#   * preemption and the time limit: Slurm sends SIGUSR1 to this batch shell (--signal=B:USR1@120,
#     two minutes ahead); the trap forwards it to every rank, megalite checkpoints at the next step
#     boundary and exits 0, and the job requeues itself; the new run resumes from the run dir's
#     `latest` (checkpoint.load=auto, the default), under any layout (checkpoints reshard).
#
# Variables (set by the sbatch file or the environment):
#   STAGE        the megalite stage: pretrain | sft | rm | dpo | ppo | grpo
#   CONFIG       the run config (YAML); extra key=value arguments of sbatch override it
#   RUN_DIR      where metrics.jsonl, checkpoints and logs go; default runs/<job name>, stable
#                across requeues (it must not contain the job id, or a requeue would start over)
#   RDZV_PORT    the rendezvous TCP port on the first node (default 29500)
#   OMP_NUM_THREADS  CPU threads per rank for host work (default: the task's CPUs / GPUs per node)
# From Slurm: SLURM_JOB_NODELIST (the nodes), SLURM_NNODES, SLURM_GPUS_PER_NODE,
#   SLURM_CPUS_PER_TASK, SLURM_JOB_ID (also the rendezvous id), SLURM_JOB_NAME.
# Submit from the repository root (paths are relative to it): `sbatch examples/slurm/<stage>.sbatch`.

megalite_launch() {
  set -euo pipefail
  : "${STAGE:?STAGE is not set}" "${CONFIG:?CONFIG is not set}"
  local head_node gpus run_dir port srun_pid
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  gpus=${SLURM_GPUS_PER_NODE##*:}  # "h100:8" -> 8
  run_dir=${RUN_DIR:-runs/$SLURM_JOB_NAME}
  port=${RDZV_PORT:-29500}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} / gpus > 0 ? ${SLURM_CPUS_PER_TASK:-8} / gpus : 1 ))}
  mkdir -p logs "$run_dir"
  echo "megalite $STAGE: $SLURM_NNODES nodes x $gpus GPUs, config $CONFIG, run dir $run_dir (restart ${SLURM_RESTART_COUNT:-0})"

  # --kill-on-bad-exit: a rank that dies takes the job down instead of leaving the others waiting.
  # `trap '' USR1` before exec: torchrun's agent has no SIGUSR1 handler and would die of it (and its
  # ranks with it); an ignored signal stays ignored across exec, while each rank's Python installs
  # megalite's own handler (training/preemption.py) and checkpoints.
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'trap "" USR1; exec "$@"' torchrun \
    torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus" \
      --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" --rdzv_id "$SLURM_JOB_ID" \
      -m megalite.cli "$STAGE" --config "$CONFIG" "train.run_dir=$run_dir" "$@" &
  srun_pid=$!
  PREEMPTED=0
  # The signal reaches only this shell (B:); send it on to the job's processes on every node.
  trap 'PREEMPTED=1; echo "preemption notice: forwarding SIGUSR1"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  # `wait` returns early when a trapped signal arrives: keep waiting until srun has really exited.
  local rc=0
  while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || rc=$?; done
  if [ "$PREEMPTED" = 1 ]; then
    # megalite saved a checkpoint and exited cleanly; queue the same job again to resume.
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}
