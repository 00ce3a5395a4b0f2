#!/usr/bin/env bash
# Issue 17's GPU check of fabric::nn (fabric::nn::Linear, fabric::nn::cross_entropy) on the GPU machine:
#   tests  builds the unit tests of include/fabric/nn/ and runs them, the [cuda] ones included
#          (cross_entropy on bfloat16, float16 and float32 CUDA logits against F::cross_entropy);
#   race   bench/race.sh with the given flags (every workload by default; fabric-f32-loss is fabric's
#          float32-logits line for gpt2);
#   all    both (default).
# Usage, from the repository root, after ../shared/gpu/fetch-deps.sh (carry .deps):
#
#   bench/fast_gpu.sh tests
#   bench/fast_gpu.sh race --workload gpt2
#   bench/fast_gpu.sh all
#
# Logs go under $OUT (default build-fast-gpu/out).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
[ $# -gt 0 ] && shift
BUILD_DIR=${BUILD_DIR:-build-fast-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rc=0

if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  # NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
  if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside; fi
  P=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
  NCCL_INC=$($PY -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
  echo "fast_gpu.sh: configuring $BUILD_DIR"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
    ${NCCL_INC:+-DCMAKE_CXX_FLAGS=-I$NCCL_INC} -DFABRIC_TEST_GLOB="unit/nn/*.cpp" -DFABRIC_BUILD_EXAMPLES=OFF \
    -DFABRIC_BUILD_BENCH=OFF >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  echo "fast_gpu.sh: building fabric_tests (tests/unit/nn)"
  if cmake --build "$BUILD_DIR" --target fabric_tests -j "$(nproc)" >"$OUT/build.log" 2>&1; then
    # NOTE: shared GPU.md: the wheel's libtorch.so exports std::filesystem symbols that crash; preload libstdc++.
    LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) "$BUILD_DIR/tests/fabric_tests" "[nn]" 2>&1 | tee "$OUT/tests-nn.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  else
    grep -E "error" -m 20 "$OUT/build.log"
    rc=1
  fi
fi

if [ "$MODE" = race ] || [ "$MODE" = all ]; then
  OUT="$OUT/race" bench/race.sh "$@" || rc=1
fi
exit $rc
