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
printf '%-14s %-14s %-9s %12s %12s %12s %14s %8s\n' strategy checkpointing prefetch params_MiB grads_MiB optim_MiB \
  peak_alloc_MiB max_units
row() {
  line=$(MASTER_PORT=$((29500 + RANDOM % 1000)) "$build/bench/bench_fsdp_memory" "$@" \
    --gpt2-config "${GPT2_CONFIG:-small}" --batch "${BATCH:-8}" --device cuda)
  echo "$line" >>"$out/fsdp_memory.json"
  python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
mib = lambda b: f"{b / 2**20:.1f}"
p = r.get("prefetch") or {}
print(f"{r['strategy']:<14} {str(r['activation_checkpointing']).lower():<14} {p.get('mode', '-'):<9} "
      f"{mib(r['parameters_bytes']):>12} {mib(r['gradients_bytes']):>12} {mib(r['optimizer_state_bytes']):>12} "
      f"{mib(r['peak_allocated_bytes']):>14} {p.get('max_units_gathered', '-'):>8}")
PY
}
# STRATEGIES narrows the table (e.g. "full_shard"); FULL_SHARD's rows are also measured without prefetch and
# with forward_prefetch (max_units: the most blocks gathered at once, the root unit aside).
for strategy in ${STRATEGIES:-ddp no_shard shard_grad_op full_shard}; do
  for ckpt in "" --checkpointing; do
    row --strategy "$strategy" $ckpt
    if [[ $strategy == full_shard ]]; then
      row --strategy "$strategy" $ckpt --prefetch none
      row --strategy "$strategy" $ckpt --prefetch all
    fi
  done
done
