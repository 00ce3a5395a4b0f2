#!/usr/bin/env bash
# Issue 17's GPU check of fabric::nn (include/fabric/nn/): builds the unit tests of tests/unit/nn/ against the
# PyTorch wheel's LibTorch and runs them, the [cuda] ones included: Linear's mixed-precision backward (float32
# weight gradients from the GEMM), LayerNorm's fused kernels against at::layer_norm, cross_entropy's kernel.
# Usage, from the repository root, after tools/fetch-gpu-deps.sh (carry .deps):  tools/nn_gpu.sh
# Logs go under $OUT (default build-nn-gpu/out).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-nn-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
# NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside-nn; fi
P=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  -DFABRIC_TEST_GLOB="unit/nn/*.cpp" -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=OFF \
  >"$OUT/nn-configure.log" 2>&1 || { tail -30 "$OUT/nn-configure.log"; exit 1; }
start=$(date +%s)
if ! cmake --build "$BUILD_DIR" --target fabric_tests -j "$(nproc)" >"$OUT/nn-build.log" 2>&1; then
  grep -E "error" -m 30 "$OUT/nn-build.log"
  exit 1
fi
echo "nn_gpu.sh: built fabric_tests in $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=name --format=csv,noheader
# NOTE: shared GPU.md: the wheel's libtorch.so exports std::filesystem symbols that crash; preload libstdc++.
LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) "$BUILD_DIR/tests/fabric_tests" "[nn]" 2>&1 | tee "$OUT/nn.log" | tail -80
exit "${PIPESTATUS[0]}"
