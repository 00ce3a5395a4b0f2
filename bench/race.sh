#!/usr/bin/env bash
# The race (shared BENCH.md): builds bench_race (bench/race.cpp), then bench/python/race.py runs it
# (bench_race --serve) and its own Python loops in alternating rounds on the GPU and prints one table
# of every competitor on every workload, with the loss check:
#
#   lightning          Python Lightning Fabric (Fabric(accelerator="cuda", devices=1, precision=...))
#   lightning-compile  the same with torch.compile(model) and AdamW(fused=True)
#   pytorch            a raw PyTorch loop (torch.autocast, default torch.optim.AdamW = foreach on CUDA)
#   libtorch           a hand-written LibTorch loop (LibTorch's own per-parameter AdamW step)
#   libtorch-fused     the same loop with fabric's multi-tensor AdamW step (fabric's work without fabric)
#   fabric             fabric::Fabric<CUDA, SingleDevice, FP32 | BF16Mixed>; gpt2: bfloat16 logits
#                      (BF16Mixed({.convert_output = false})) into fabric::nn::cross_entropy
#   fabric-f32-loss    fabric on gpt2 with float32 logits and LibTorch's cross-entropy (the float32 path)
#   fabric-capture     fabric's step recorded in a CUDA graph by fabric.capture
#   fabric-master      fabric::BF16Master on the bf16 workloads (where this fabric has it)
#
# Every C++ loop uses fabric::nn::Linear (bias inside the GEMM) and, for gpt2, the chunked loss.
#
# Usage, from the repository root (GPU machine: run ../shared/gpu/fetch-deps.sh first):
#
#   bench/race.sh                                      # all workloads, BENCH.md's steps, 5 rounds
#   bench/race.sh --workload mlp --steps 100 --rounds 3    # flags go to race.py (and on to bench_race)
#   RACE_PROFILE=1 bench/race.sh                       # also bench_race --profile (host time, Kineto traces)
#   RACE_DEVICE=cpu RACE_CONFIGURE=0 BUILD_DIR=build bench/race.sh --workload mlp --steps 3 --warmup 5 --rounds 2
#
# Environment: BUILD_DIR (default build-race), OUT (where logs, traces and race.json go; default
# $BUILD_DIR/race-out), PYTHON (default python3), RACE_DEVICE (cuda or cpu; default cuda),
# RACE_CONFIGURE=0 to reuse an already configured BUILD_DIR, RACE_PROFILE=1 for the profile first,
# RACE_TIMEOUT=S to stop race.py after S seconds and print the table of the rounds it finished.
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=${BUILD_DIR:-build-race}
OUT_DIR=${OUT:-$BUILD_DIR/race-out}
PY=${PYTHON:-python3}
DEVICE=${RACE_DEVICE:-cuda}
mkdir -p "$OUT_DIR"
start=$(date +%s)
say() { echo "race.sh [$(($(date +%s) - start)) s]: $*"; }

# ---- build ------------------------------------------------------------------------------------
if [ "${RACE_CONFIGURE:-1}" != 0 ]; then
  # NOTE: the std/iterator of the fetched range-v3 tree shadows g++ 13's <iterator>.
  if [ -e .deps/root/usr/include/std/iterator ]; then
    mv .deps/root/usr/include/std/iterator .deps/iterator-aside && say "moved .deps/root/usr/include/std/iterator aside"
  fi
  TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # fabric includes ProcessGroupNCCL.hpp when Torch defines USE_C10D_NCCL; the wheel's nccl.h is in nvidia.nccl.
  NCCL_INC=$($PY -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
  EXTRA_FLAGS=""
  if [ -n "$NCCL_INC" ] && [ -d "$NCCL_INC" ]; then EXTRA_FLAGS="-I$NCCL_INC"; fi
  say "configuring $BUILD_DIR (Torch from $TORCH_PREFIX${EXTRA_FLAGS:+, $EXTRA_FLAGS})"
  if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;$PWD/.deps/root/usr" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
      -DFABRIC_BUILD_TESTS=OFF -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=ON >"$OUT_DIR/configure.log" 2>&1; then
    tail -30 "$OUT_DIR/configure.log"
    say "configure FAILED (log: $OUT_DIR/configure.log); running the Python side only"
  fi
fi
CPP=()
say "building bench_race"
if cmake --build "$BUILD_DIR" --target bench_race -j "$(nproc)" >"$OUT_DIR/build.log" 2>&1; then
  CPP=(--cpp "$BUILD_DIR/bench/bench_race")
  grep -m1 "bench_race with CUDA" "$OUT_DIR/configure.log" 2>/dev/null || true
else
  grep -E "error|Error" -m 20 "$OUT_DIR/build.log"
  say "build FAILED (log: $OUT_DIR/build.log); running the Python side only"
fi

# ---- profile: fabric's step against the raw loop with the same fused step ---------------------------
if [ "${RACE_PROFILE:-0}" != 0 ] && [ ${#CPP[@]} -gt 0 ]; then
  say "profile: bench_race --profile (libtorch-fused against fabric: host time per phase, Kineto traces)"
  "$BUILD_DIR/bench/bench_race" --device "$DEVICE" --profile "$OUT_DIR/trace" --workload mlp-fp32 \
    --workload mlp-bf16-mixed 2>&1 | tee "$OUT_DIR/profile.log"
  $PY bench/python/race_profile.py "$OUT_DIR"/trace-*.json 2>&1 | tee -a "$OUT_DIR/profile.log"
fi

# ---- the race --------------------------------------------------------------------------------------
say "race.py ${CPP[*]} $*"
LIMIT=()
[ -n "${RACE_TIMEOUT:-}" ] && LIMIT=(timeout "$RACE_TIMEOUT")
"${LIMIT[@]}" $PY bench/python/race.py --device "$DEVICE" "${CPP[@]}" --json "$OUT_DIR/race.json" "$@" 2>&1 |
  tee "$OUT_DIR/race.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] && [ -e "$OUT_DIR/race.json" ]; then
  say "race.py ran past RACE_TIMEOUT=$RACE_TIMEOUT s: the table of the rounds it finished"
  $PY bench/python/race.py --summarize "$OUT_DIR/race.json" 2>&1 | tee -a "$OUT_DIR/race.log"
fi
say "done (race.py exit status $rc; log $OUT_DIR/race.log, results $OUT_DIR/race.json)"
exit "$rc"
