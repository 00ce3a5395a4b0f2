#!/usr/bin/env bash
# Issue 19, "1 GPU, script check" (NOT a multi-GPU result): builds bench_ddp_race on the one-GPU machine and
# runs, with a world of one on NCCL, fabric's FSDP and Python Lightning Fabric's FSDPStrategy through
# bench/multi_gpu.sh fsdp-time, then one fsdp-largest trial per side that must run out of memory (exit 3,
# "oom"), to prove both sides and the script's steps work there.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-build-gpu/check19}
mkdir -p "$OUT"
echo "=== 1 GPU, script check (world of one on NCCL): not a multi-GPU result ==="
export MULTI_GPU_DEVICES=1 MULTI_GPU_TARGETS=bench_ddp_race
bench/multi_gpu.sh build 2>&1 | tail -4
MULTI_GPU_ARGS="--steps 10 --warmup 3" MULTI_GPU_FSDP_SHARDINGS=full_shard MULTI_GPU_FSDP_CKPT=off \
  bench/multi_gpu.sh fsdp-time 2>&1 | grep -v "^multi_gpu.sh \[0 s\]"
MULTI_GPU_ARGS="--batch 256" MULTI_GPU_LARGEST_EMBD=768 MULTI_GPU_LARGEST_START=12 MULTI_GPU_LARGEST_MAX=12 \
  MULTI_GPU_LARGEST_BISECT=0 MULTI_GPU_LARGEST_STRATEGIES=full_shard bench/multi_gpu.sh fsdp-largest 2>&1 |
  grep -v "^multi_gpu.sh \[0 s\]"
grep -h "out of memory" "$OUT"/fsdp-largest-*.log | cut -c1-200
echo "=== end of the 1 GPU script check ==="
