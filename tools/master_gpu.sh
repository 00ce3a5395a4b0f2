#!/usr/bin/env bash
# Issue 17's GPU check of fabric::BF16Master ("bf16-master") on the GPU machine, in one call:
#   1. builds tests/unit/precision/master_test.cpp and the gpt2 example, runs the [master] tests (the
#      [cuda] one included: fused AdamW on the float32 masters);
#   2. trains GPT-2 small (examples/gpt2) for --steps under bf16-mixed and bf16-master, alternating, two
#      rounds; prints the last loss and the median ms/step of steps 10.. of each run;
#   3. times, in Python (torch of the machine), the optimizer step of GPT-2's 124M parameters three ways:
#      fused AdamW on float32 (bf16-mixed's step), the bf16-master step (upcast the bf16 gradients with
#      one _foreach_copy_, fused AdamW on the masters, one _foreach_copy_ back), and its two copies alone:
#      what a kernel doing all in one pass could save at most.
# Usage, from the repository root, after ../shared/gpu/fetch-deps.sh (carry .deps): tools/master_gpu.sh [steps]
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-50}
BUILD_DIR=${BUILD_DIR:-build-master-gpu}
OUT=${OUT:-$BUILD_DIR/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
rc=0
if [ -e .deps/root/usr/include/std/iterator ]; then mv .deps/root/usr/include/std/iterator .deps/iterator-aside; fi
P=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
NCCL_INC=$($PY -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
  ${NCCL_INC:+-DCMAKE_CXX_FLAGS=-I$NCCL_INC} -DFABRIC_TEST_GLOB="unit/precision/master_test.cpp" \
  -DFABRIC_BUILD_EXAMPLES=ON -DFABRIC_BUILD_BENCH=OFF -DFABRIC_INSTALL=OFF >"$OUT/configure.log" 2>&1 ||
  { tail -30 "$OUT/configure.log"; exit 1; }
start=$(date +%s)
if ! cmake --build "$BUILD_DIR" --target fabric_tests gpt2 -j "$(nproc)" >"$OUT/build.log" 2>&1; then
  grep -E "error" -m 20 "$OUT/build.log"
  exit 1
fi
echo "master_gpu.sh: built in $(($(date +%s) - start)) s"
PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
LD_PRELOAD=$PRELOAD "$BUILD_DIR/tests/fabric_tests" "[master]" >"$OUT/tests.log" 2>&1 || rc=1
tail -3 "$OUT/tests.log"
grep -E "FAILED|SKIPPED" -A6 "$OUT/tests.log" | head -40

summary=""
for round in 1 2; do
  for precision in bf16-mixed bf16-master; do
    log="$OUT/gpt2-$precision-$round.log"
    LD_PRELOAD=$PRELOAD "$BUILD_DIR/examples/gpt2/gpt2" --steps "$STEPS" --log-every "$STEPS" --precision "$precision" \
      >"$log" 2>&1 || rc=1
    line=$($PY - "$log" <<'EOF'
import re, statistics, sys
steps = [(int(m[1]), float(m[2]), float(m[3])) for m in
         re.finditer(r"step\s+(\d+)\s+loss\s+([\d.]+)\s+([\d.]+) ms", open(sys.argv[1]).read())]
ms = [s[2] for s in steps if s[0] >= 10]
print(f"last loss {steps[-1][1]:.4f} after {len(steps)} steps, median {statistics.median(ms):.2f} ms/step" if steps and ms
      else "no steps")
EOF
)
    summary+="round $round  $precision: $line"$'\n'
  done
done
echo "GPT-2 small, batch 8 x 1024, AdamW, $STEPS steps:"
printf '%s' "$summary"
grep -h "MFU" "$OUT"/gpt2-*-2.log | head -4

$PY - <<'EOF'
import torch
torch.manual_seed(0)
d, v, L = 768, 50304, 12
shapes = [(v, d), (1024, d)] + L * [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
                                     (d, 4 * d), (d,)] + [(d,), (d,)]
dev = "cuda"
master = [torch.randn(s, device=dev) * 0.02 for s in shapes]
bf16 = [m.to(torch.bfloat16) for m in master]
gbf = [torch.randn(s, device=dev).to(torch.bfloat16) * 1e-3 for s in shapes]
g32 = [g.float() for g in gbf]
m1 = [torch.zeros_like(p) for p in master]
m2 = [torch.zeros_like(p) for p in master]
step = [torch.tensor(1.0, device=dev) for _ in master]
def fused(grads):
    torch._fused_adamw_(master, grads, m1, m2, [], step, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                        eps=1e-8, amsgrad=False, maximize=False)
def master_step():
    grads = [torch.empty_like(p) for p in master]
    torch._foreach_copy_(grads, gbf)
    fused(grads)
    torch._foreach_copy_(bf16, master)
def copies():
    grads = [torch.empty_like(p) for p in master]
    torch._foreach_copy_(grads, gbf)
    torch._foreach_copy_(bf16, master)
def timeit(fn, n=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        a.record(); fn(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
    times.sort(); return times[len(times) // 2]
n = sum(p.numel() for p in master)
print(f"optimizer step of {n / 1e6:.1f}M parameters on {torch.cuda.get_device_name()} (median ms):")
print(f"  fused AdamW, float32 weights and gradients (bf16-mixed): {timeit(lambda: fused(g32)):.3f}")
print(f"  bf16-master: upcast + fused AdamW on masters + copy back: {timeit(master_step):.3f}")
print(f"  its two _foreach_copy_ alone:                          {timeit(copies):.3f}")
EOF
exit $rc
