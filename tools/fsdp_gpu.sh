#!/usr/bin/env bash
# Issue 18's GPU check of fabric::FSDP's overlap and prefetch (one call on the GPU machine, carry .deps):
# builds the FSDP unit tests and bench_fsdp_memory against the wheel's LibTorch, runs the [fsdp] tests with
# NCCL and one process (the Gloo ones skip there), then GPT-2's FULL_SHARD peak memory without prefetch,
# with BACKWARD_PRE (the default) and with forward_prefetch too (bench_fsdp_memory's JSON lines).
# Usage, from the repository root:  tools/fsdp_gpu.sh        Logs under $OUT (default build-fsdp-gpu/out).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${BUILD_DIR:-build-fsdp-gpu}
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
[ -e .deps/root/usr/include/std/iterator ] && mv .deps/root/usr/include/std/iterator .deps/iterator-aside
P=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
NCCL_INC=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
export NCCL_NVLS_ENABLE=0
start=$(date +%s)
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  ${NCCL_INC:+-DCMAKE_CXX_FLAGS=-I$NCCL_INC} -DFABRIC_TEST_GLOB="unit/strategies/fsdp_test.cpp" \
  -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=ON -DFABRIC_INSTALL=OFF >"$OUT/configure.log" 2>&1 ||
  { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build "$B" -j "$(nproc)" --target fabric_tests bench_fsdp_memory -- -k 0 >"$OUT/build.log" 2>&1 ||
  { grep -E "error" -m 30 "$OUT/build.log"; exit 1; }
echo "fsdp_gpu.sh: built in $(($(date +%s) - start)) s"
pre=$(g++ -print-file-name=libstdc++.so.6)
LD_PRELOAD=$pre "$B/tests/fabric_tests" "[fsdp]" --reporter compact >"$OUT/fsdp.log" 2>&1
echo "[fsdp] tests (the Gloo ones skip; [cuda] runs on NCCL): exit $? | $(tail -2 "$OUT/fsdp.log" | tr '\n' ' ')"
grep -E "failed|FAILED|skipped" "$OUT/fsdp.log" | grep -v "has no Gloo" | head -20
# NOTE: GPT-2 small, FULL_SHARD, no activation checkpointing: the three prefetch settings (bench/fsdp_memory.sh
# runs the whole table).
for p in none backward all; do
  LD_PRELOAD=$pre MASTER_PORT=$((29500 + RANDOM % 1000)) timeout 60 "$B/bench/bench_fsdp_memory" --strategy full_shard \
    --prefetch $p --gpt2-config small --batch 8 --device cuda 2>>"$OUT/bench.err" | tee -a "$OUT/fsdp_memory.json"
done
tail -5 "$OUT/bench.err"
