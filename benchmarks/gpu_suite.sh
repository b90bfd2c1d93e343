#!/usr/bin/env bash
# The whole GPU check in one command (about 8 minutes on one H200; every part has its own timeout,
# so one failure or hang costs only that part):
#   1. build the C++ extension        2. the gpu-marked tests          3. kernels vs Liger
#   4. fused linear CE at vocab 128256 5. 1B BF16 MFU at seq 4096 (eager / Triton / compiled)
#   6. FP8 (torchao) vs BF16 step      7. megalite vs megatron-core
# Results: $OUT/gpu_suite_results.md (markdown for benchmarks/RESULTS.md: date, device, commit),
# rewritten after each part, and $OUT/gpu_suite.log (every command's full output).
#
#   bash benchmarks/fetch_gpu_wheels.sh        # here: wheels/ for the GPU machine (no network there)
#   bash benchmarks/gpu_suite.sh               # there, with wheels/ carried along
#   bash benchmarks/gpu_suite.sh --dry-run     # on a CPU, tiny shapes, under ~2 minutes (tests/test_gpu_suite.py)
# Options: --out DIR (default $OUT, else ./gpu_suite_out).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
DEST=${OUT:-$ROOT/gpu_suite_out}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) DEST=$2; shift ;;
    *) echo "error: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST"
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS=$DEST/gpu_suite_results.md
LOG=$DEST/gpu_suite.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

# Wheels the GPU image lacks (torchao, liger-kernel, megatron-core, zstandard), installed apart
# from the system's packages and without dependencies, so that nothing can replace torch.
if [ "$DRY" = 0 ] && ls "$ROOT"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$ROOT"/wheels/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:$WORK/site
fi

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEVICE="CPU ($(getconf _NPROCESSORS_ONLN) cores), dry run: tiny shapes, numbers mean nothing"
else
  export TRITON_INTERPRET=0
  DEVICE=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
  DEVICE=${DEVICE:-"no GPU found"}
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "${MEGALITE_COMMIT:-unknown}")
if [ "$COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (+ uncommitted changes)"
fi
VERSIONS=$("$PY" -c "import sys, torch, triton; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}')" 2>/dev/null)
STARTED=$(date -u +"%Y-%m-%d %H:%M UTC")
: >"$WORK/summary" ; : >"$WORK/details"

render() {
  {
    echo "## GPU suite (\`benchmarks/gpu_suite.sh$([ "$DRY" = 1 ] && echo " --dry-run")\`)"
    echo
    echo "### $STARTED, $DEVICE, commit $COMMIT"
    echo
    echo "$VERSIONS. Each part ran under its own timeout; the full output is in gpu_suite.log."
    echo
    echo "| part | status | seconds |"
    echo "|---|---|---:|"
    cat "$WORK/summary"
    echo
    cat "$WORK/details"
  } >"$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
}

# part NUMBER TITLE TIMEOUT_S COMMAND [ACCEPT]: runs COMMAND (bash) with a timeout; ACCEPT, if
# given, is a pattern whose presence in the output makes a non-zero exit an expected refusal.
part() {
  local num=$1 title=$2 limit=$3 cmd=$4 accept=${5:-}
  local out=$WORK/part$num.out status start elapsed rc
  echo "=== $num. $title: $cmd" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c "$cmd" >"$out" 2>&1
  rc=$?
  elapsed=$(( $(date +%s) - start ))
  if [ $rc = 0 ]; then status=ok
  elif [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMED OUT after ${limit} s"
  elif [ -n "$accept" ] && grep -q -- "$accept" "$out"; then status="refused as expected (exit $rc)"
  else status="FAILED (exit $rc)"
  fi
  cat "$out" >>"$LOG"
  echo "--- $num. $title: $status, ${elapsed} s" | tee -a "$LOG"
  echo "| $num. $title | $status | $elapsed |" >>"$WORK/summary"
  {
    echo "#### $num. $title"
    echo
    echo "Status: $status, ${elapsed} s (limit ${limit} s). Command: \`$cmd\`"
    echo
    echo '```'
    # The result lines, without library warnings and progress noise.
    grep -v -E "Warning|warnings.warn|^\s*$|Failed to load|KernelPreference|return func\(|^  warn|^\[pp rank|^megalite pretrain \|" "$out" | tail -n 45
    echo '```'
    echo
  } >>"$WORK/details"
  render
}

TP=benchmarks/train_throughput.py
if [ "$DRY" = 1 ]; then
  TINY="examples/configs/tiny.yaml model.num_layers=2 train.seq_len=64 train.micro_batch_size=8 train.global_batch_size=8"
  part 1 "C++ extension" 300 "$PY -c 'import megalite._C' 2>/dev/null && echo 'megalite._C already built' || $PY setup.py -q build_ext --inplace"
  part 2 "gpu-marked tests" 120 "$PY -m pytest -q -m gpu tests -p no:cacheprovider --timeout 120"
  part 3 "kernels vs Liger" 60 "$PY benchmarks/kernels.py --small --tokens 256 --sweep 1024 --only rmsnorm swiglu ce --no-compile --warmup 1 --iters 2"
  part 4 "fused linear CE" 60 "$PY benchmarks/kernels.py --small --tokens 128 --only flce --no-compile --warmup 1 --iters 2"
  part 5 "training throughput: eager vs compiled" 150 "$PY $TP --config $TINY --steps 1 --warmup 1 --compare-compile"
  part 6 "FP8 (torchao) vs BF16 step" 60 "$PY $TP --config $TINY --steps 1 --warmup 1 --base-name bf16 --variant fp8-tensorwise:train.precision=fp8,train.fp8_backend=torchao,train.fp8_recipe=tensorwise" "needs a CUDA GPU"
  # megatron-core is not a test dependency (it requires torch, so it is installed with --no-deps).
  part 7 "megalite vs megatron-core" 120 "$PY benchmarks/vs_megatron.py --shape tiny --steps 2 --warmup 1 && $PY benchmarks/vs_megatron.py --shape tiny --tp 2 --sp --spawn 2 --steps 1 --warmup 1" "megatron-core is not installed"
else
  ONE_B="examples/configs/llama3_1b.yaml train.micro_batch_size=2 train.global_batch_size=8 parallel.distributed_optimizer=false"
  FAST="model.norm_impl=triton,model.mlp_impl=triton,model.loss_impl=fused_linear"
  part 1 "C++ extension" 40 "$PY setup.py -q build_ext --inplace"
  part 2 "gpu-marked tests" 60 "$PY -m pytest -q -m gpu tests -p no:cacheprovider --timeout 50"
  part 3 "kernels vs Liger" 55 "$PY benchmarks/kernels.py --tokens 8192 --sweep 4096 8192 --only rmsnorm addnorm swiglu ce --no-compile --warmup 5 --iters 20"
  part 4 "fused linear CE at vocab 128256" 35 "$PY benchmarks/kernels.py --tokens 8192 --only flce --no-compile --warmup 3 --iters 10"
  part 5 "1B BF16 MFU at seq 4096: eager / Triton / compiled" 110 "$PY $TP --config $ONE_B --steps 4 --warmup 2 --variant triton:$FAST --variant compiled:$FAST,train.compile=true"
  part 6 "FP8 (torchao) vs BF16 step, 1B, compiled" 100 "$PY $TP --config $ONE_B --steps 4 --warmup 2 --base-name bf16 train.compile=true model.norm_impl=triton model.mlp_impl=triton model.loss_impl=fused_linear --variant fp8-tensorwise:train.precision=fp8,train.fp8_backend=torchao,train.fp8_recipe=tensorwise --variant fp8-rowwise:train.precision=fp8,train.fp8_backend=torchao,train.fp8_recipe=rowwise"
  part 7 "megalite vs megatron-core (TP1; one GPU)" 70 "$PY benchmarks/vs_megatron.py --shape 55m --steps 4 --warmup 1 && $PY benchmarks/vs_megatron.py --shape 1b --steps 3 --warmup 1"
fi
echo "results: $RESULTS"
