#!/usr/bin/env bash
# Registers, stack frames and spills of every kernel of one csrc/<family>_cuda.cu at one
# arch, from ptxas (-Xptxas -v). Needs nvcc only: works on a CPU-only machine with a CPU
# build of torch (the generated header c10/cuda/impl/cuda_cmake_macros.h is stubbed, as in
# tests/test_cuda_compile.py).
#
#   bash benchmarks/gpu/ptxas_registers.sh gates                 # every kernel of gates_cuda.cu, sm_90
#   bash benchmarks/gpu/ptxas_registers.sh gates 'stencil|elat'  # the kernels whose name matches
#   ARCH=80 bash benchmarks/gpu/ptxas_registers.sh telu
set -euo pipefail
FAMILY=${1:?usage: ptxas_registers.sh <family> [kernel-regex]}
PATTERN=${2:-.}
ARCH=${ARCH:-90}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
STUB=$(mktemp -d)
trap 'rm -rf "$STUB"' EXIT
mkdir -p "$STUB/c10/cuda/impl" && echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
INC=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
PYINC=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# shellcheck disable=SC2086
"$NVCC" -c "$ROOT/csrc/${FAMILY}_cuda.cu" -o "$STUB/out.o" -std=c++17 -gencode=arch=compute_$ARCH,code=sm_$ARCH -O3 \
  --expt-relaxed-constexpr -DDISSEG_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -Xcompiler -fPIC -w \
  -I"$STUB" $INC -I"$PYINC" -I"$ROOT/csrc" -Xptxas -v 2>&1 |
  awk -v pat="$PATTERN" '
    /Compiling entry function/ { name = $0; sub(/.*function .(_Z)?/, "", name); sub(/. for .*/, "", name)
                                 sub(/^N6disseg[0-9]+_GLOBAL__N__[0-9a-f]+_[0-9]+_[a-z_]+_cu_[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]/, "", name)
                                 sub(/^[0-9]+/, "", name); keep = (name ~ pat) }
    /Function properties/ { next }
    keep && /stack frame/ { frame = $0; sub(/^ +/, "", frame) }
    keep && /Used [0-9]+ registers/ { regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs);
                                      printf "%4s regs  %-62s %s\n", regs, frame, substr(name, 1, 90) }
    /error/ { print; bad = 1 }
    END { exit bad }'
