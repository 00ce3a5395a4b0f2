#!/usr/bin/env bash
# fabric::nn::cross_entropy on the GPU machine (issue 17), in one call: builds the loss tests and bench_loss,
# runs the tests ([nn][loss], the [cuda] ones included: the fused NVRTC kernel against F::cross_entropy and
# the ATen paths, under fabric.capture), then bench_loss on GPT-2's logits (8192 x 50304 bfloat16): forward +
# backward ms and peak extra memory of the float32 path, the recomputing backward, the gradient computed in
# forward with ATen ops and the fused kernel (each also in place). With "race", bench/race.sh --workload gpt2
# afterwards (about 150 s more).
# Usage, from the repository root, after ../shared/gpu/fetch-deps.sh (carry .deps):
#
#   bench/loss_gpu.sh            # tests + bench_loss
#   bench/loss_gpu.sh race       # and the gpt2 race
#
# Logs go under $OUT (default build-loss-gpu/out); the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-loss-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rc=0
start=$(date +%s)
# NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside; fi
P=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
NCCL_INC=$($PY -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
flags=""
[ -n "$NCCL_INC" ] && [ -e "$NCCL_INC/nccl.h" ] && flags="-I$NCCL_INC"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  -DCMAKE_CXX_FLAGS="$flags" -DFABRIC_TEST_GLOB="unit/nn/loss_test.cpp" -DFABRIC_BUILD_EXAMPLES=OFF \
  -DFABRIC_BUILD_BENCH=ON -DFABRIC_INSTALL=OFF >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
if ! cmake --build "$BUILD_DIR" --target fabric_tests bench_loss -j "$(nproc)" -- -k 0 >"$OUT/build.log" 2>&1; then
  grep -E "error" -m 30 "$OUT/build.log"
  rc=1  # NOTE: whichever of the two built still runs below
fi
echo "loss_gpu.sh: built in $(($(date +%s) - start)) s"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/loss_gpu.sh: GPU /'
# NOTE: shared GPU.md: the wheel's libtorch.so exports std::filesystem symbols that crash; preload libstdc++.
PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
[ -x "$BUILD_DIR/tests/fabric_tests" ] && LD_PRELOAD=$PRELOAD "$BUILD_DIR/tests/fabric_tests" "[loss]" --reporter compact >"$OUT/tests.log" 2>&1
[ $? = 0 ] || rc=1
grep -E "FAILED|failed|fused kernel|error" "$OUT/tests.log" | head -40
tail -2 "$OUT/tests.log"
LD_PRELOAD=$PRELOAD "$BUILD_DIR/bench/bench_loss" --json "$OUT/loss.json" 2>&1 | tee "$OUT/bench-loss.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
LD_PRELOAD=$PRELOAD "$BUILD_DIR/bench/bench_loss" --smoothing 0.1 --steps 10 --paths f32,aten,fused \
  --json "$OUT/loss-smoothing.json" 2>&1 | tee "$OUT/bench-loss-smoothing.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
if [ "${1:-}" = race ]; then
  OUT="$OUT/race" bench/race.sh --workload gpt2 || rc=1
fi
echo "loss_gpu.sh: done in $(($(date +%s) - start)) s, exit $rc"
exit $rc
