#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels the GPU suite needs that the GPU machine's
# image lacks, into the git-ignored folder wheels/ (or $1). The GPU machine has no network: name
# the folder in the device tool's `carry` and benchmarks/gpu_suite.sh installs from it.
# Target: CPython 3.12, manylinux x86-64. --no-deps everywhere: none of these may bring a torch.
#   bash benchmarks/fetch_gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# torchao: fp8_backend=torchao. liger-kernel: the kernel benchmark's baseline. megatron-core: the
# side-by-side benchmark (0.19.x needs Python >= 3.12, as the GPU machine has). zstandard: a megalite
# requirement missing from that image.
WHEELS=(torchao==0.18.0 liger-kernel==0.8.5 megatron-core==0.19.2 zstandard==0.25.0)
PLATFORMS=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
  name=${w%%==*}
  if ls "$DIR"/"${name//-/_}"-"${w##*==}"-*.whl >/dev/null 2>&1; then
    echo "have $w"
    continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "$w"
done
ls -la "$DIR"
du -sh "$DIR"
