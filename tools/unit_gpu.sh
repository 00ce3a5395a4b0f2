#!/usr/bin/env bash
# Builds some unit tests against the GPU machine's PyTorch wheel (LibTorch) and runs them, the [cuda] ones
# included: the one script behind tools/nn_gpu.sh and tools/capture_gpu.sh.
# Usage, from the repository root, after tools/fetch-gpu-deps.sh (carry .deps):
#   tools/unit_gpu.sh NAME GLOB FILTER      e.g.  tools/unit_gpu.sh nn "unit/nn/*.cpp" "[nn]"
# GLOB is FABRIC_TEST_GLOB (relative to tests/), FILTER the Catch2 test spec. Builds in $BUILD_DIR (default
# build-NAME-gpu); logs go under $OUT (default $BUILD_DIR/out): NAME-configure.log, NAME-build.log, NAME.log.
set -uo pipefail
[ $# -eq 3 ] || { echo "usage: tools/unit_gpu.sh NAME GLOB FILTER" >&2; exit 2; }
name=$1 glob=$2 filter=$3
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-$name-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
# NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside-$name; fi
P=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  -DFABRIC_TEST_GLOB="$glob" -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=OFF \
  >"$OUT/$name-configure.log" 2>&1 || { tail -30 "$OUT/$name-configure.log"; exit 1; }
start=$(date +%s)
if ! cmake --build "$BUILD_DIR" --target fabric_tests -j "$(nproc)" >"$OUT/$name-build.log" 2>&1; then
  grep -E "error" -m 30 "$OUT/$name-build.log"
  exit 1
fi
echo "unit_gpu.sh $name: built fabric_tests in $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=name --format=csv,noheader
# NOTE: shared GPU.md: the wheel's libtorch.so exports std::filesystem symbols that crash; preload libstdc++.
LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) "$BUILD_DIR/tests/fabric_tests" "$filter" 2>&1 | tee "$OUT/$name.log" | tail -80
exit "${PIPESTATUS[0]}"
