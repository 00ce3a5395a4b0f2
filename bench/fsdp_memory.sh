#!/usr/bin/env bash
# fabric::FSDP's memory on the GPU machine (README, "fabric::FSDP"): one process on NCCL, GPT-2 small in
# bf16-mixed, the peak memory the caching allocator saw under DDP and each FSDP sharding strategy, with and
# without activation checkpointing of the blocks, and the bytes of parameters, gradients and optimizer state
# held after a step. Usage, from the repository root: bench/fsdp_memory.sh [BUILD_DIR] (default build-gpu).
# Prints a table and writes $OUT/fsdp_memory.json (OUT default: BUILD_DIR/fsdp-memory).
set -euo pipefail
build=${1:-${BUILD_DIR:-build-gpu}}
out=${OUT:-$build/fsdp-memory}
mkdir -p "$out"
if [[ ! -x $build/bench/bench_fsdp_memory ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFABRIC_BUILD_BENCH=ON >/dev/null
  cmake --build "$build" --target bench_fsdp_memory
fi
: >"$out/fsdp_memory.json"
printf '%-14s %-14s %12s %12s %12s %14s\n' strategy checkpointing params_MiB grads_MiB optim_MiB peak_alloc_MiB
for strategy in ddp no_shard shard_grad_op full_shard; do
  for ckpt in "" --checkpointing; do
    line=$(MASTER_PORT=$((29500 + RANDOM % 1000)) "$build/bench/bench_fsdp_memory" --strategy "$strategy" $ckpt \
      --gpt2-config "${GPT2_CONFIG:-small}" --batch "${BATCH:-8}" --device cuda)
    echo "$line" >>"$out/fsdp_memory.json"
    python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
mib = lambda b: f"{b / 2**20:.1f}"
print(f"{r['strategy']:<14} {str(r['activation_checkpointing']).lower():<14} {mib(r['parameters_bytes']):>12} "
      f"{mib(r['gradients_bytes']):>12} {mib(r['optimizer_state_bytes']):>12} {mib(r['peak_allocated_bytes']):>14}")
PY
  done
done
