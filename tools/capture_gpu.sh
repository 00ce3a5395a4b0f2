#!/usr/bin/env bash
# Issue 17's GPU check of Fabric::capture (include/fabric/utils/capture.hpp) on the GPU machine: builds
# the unit tests of tests/unit/utils/capture_test.cpp against the PyTorch wheel's LibTorch and runs them,
# the [cuda] ones included (bit-identical to the eager loop, the refusals, the ms/step timing line).
# Usage, from the repository root, after ../shared/gpu/fetch-deps.sh (carry .deps):  tools/capture_gpu.sh
# Logs go under $OUT (default build-capture-gpu/out).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-capture-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
# NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside-capture; fi
P=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  -DFABRIC_TEST_GLOB="unit/utils/capture_test.cpp" -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=OFF \
  >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
start=$(date +%s)
if ! cmake --build "$BUILD_DIR" --target fabric_tests -j "$(nproc)" >"$OUT/build.log" 2>&1; then
  grep -E "error" -m 30 "$OUT/build.log"
  exit 1
fi
echo "capture_gpu.sh: built fabric_tests in $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=name --format=csv,noheader
# NOTE: shared GPU.md: the wheel's libtorch.so exports std::filesystem symbols that crash; preload libstdc++.
LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) "$BUILD_DIR/tests/fabric_tests" "[capture]" 2>&1 | tee "$OUT/capture.log" | tail -60
exit "${PIPESTATUS[0]}"
