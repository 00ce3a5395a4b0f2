#!/usr/bin/env bash
# The race (shared BENCH.md): builds bench_race (bench/race.cpp) and runs it and bench/python/race.py
# one after the other on the GPU, then prints one table of every competitor on every workload:
#
#   lightning       Python Lightning Fabric (Fabric(accelerator="cuda", devices=1, precision=...))
#   pytorch         a raw PyTorch loop (torch.autocast, default torch.optim.AdamW = foreach on CUDA)
#   libtorch        a hand-written LibTorch loop (LibTorch's own per-parameter AdamW step)
#   libtorch-fused  the same loop with fabric's multi-tensor AdamW step (fabric's work without fabric)
#   fabric          fabric::Fabric<CUDA, SingleDevice, FP32 | BF16Mixed>; gpt2: bfloat16 logits
#                   (BF16Mixed({.convert_output = false})) into fabric::nn::cross_entropy
#   fabric-f32-loss fabric on gpt2 with float32 logits and LibTorch's cross-entropy (the float32 path)
#
# Every C++ loop uses fabric::nn::Linear (bias inside the GEMM) and, for gpt2, the chunked loss.
#
# Usage, from the repository root (GPU machine: run ../shared/gpu/fetch-deps.sh first):
#
#   bench/race.sh                                      # all workloads, BENCH.md's steps
#   bench/race.sh --workload mlp --steps 100           # flags go to both bench_race and race.py
#   RACE_DEVICE=cpu RACE_CONFIGURE=0 BUILD_DIR=build bench/race.sh --workload mlp --steps 3 --warmup 1
#
# Environment: BUILD_DIR (default build-race), OUT (where logs and race.json go; default
# $BUILD_DIR/race-out), PYTHON (default python3), RACE_DEVICE (cuda or cpu; default cuda),
# RACE_CONFIGURE=0 to reuse an already configured BUILD_DIR.
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
CPP_OK=0
say "building bench_race"
if cmake --build "$BUILD_DIR" --target bench_race -j "$(nproc)" >"$OUT_DIR/build.log" 2>&1; then
  CPP_OK=1
  grep -m1 "bench_race with CUDA" "$OUT_DIR/configure.log" 2>/dev/null || true
else
  grep -E "error|Error" -m 20 "$OUT_DIR/build.log"
  say "build FAILED (log: $OUT_DIR/build.log); running the Python side only"
fi

# ---- run ----------------------------------------------------------------------------------------
$PY -c 'import torch; print("torch", torch.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
rm -f "$OUT_DIR/race-cpp.json" "$OUT_DIR/race-python.json"
if [ "$CPP_OK" = 1 ]; then
  say "C++: bench_race $*"
  "$BUILD_DIR/bench/bench_race" --device "$DEVICE" --json "$OUT_DIR/race-cpp.json" "$@" 2>&1 | tee "$OUT_DIR/race-cpp.log"
fi
say "Python: race.py $*"
$PY bench/python/race.py --device "$DEVICE" --json "$OUT_DIR/race-python.json" "$@" 2>&1 | tee "$OUT_DIR/race-python.log"

# ---- the table ------------------------------------------------------------------------------------
say "table"
$PY - "$OUT_DIR" <<'EOF'
import json, os, sys

out_dir = sys.argv[1]
runs, results = {}, []
for side in ("cpp", "python"):
    path = os.path.join(out_dir, f"race-{side}.json")
    if os.path.exists(path):
        with open(path) as f:
            runs[side] = json.load(f)
        results += runs[side]["results"]
    else:
        print(f"race.sh: no {path}: that side did not run to the end (see its log)")
order = {"lightning": 0, "pytorch": 1, "libtorch": 2, "libtorch-fused": 3, "fabric": 4, "fabric-f32-loss": 5}
workloads = []
for r in results:
    key = (r["workload"], r["precision"])
    if key not in workloads:
        workloads.append(key)
fabric_ms = {(r["workload"], r["precision"]): r["ms_median"] for r in results if r["competitor"] == "fabric"}
head = ("| workload | precision | competitor | ms/step (median) | tokens/s (samples/s for mlp) | MFU | "
        "peak GPU memory GiB (reserved) | competitor/fabric |")
lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
checks = []
for key in workloads:
    rows = sorted((r for r in results if (r["workload"], r["precision"]) == key), key=lambda r: order.get(r["competitor"], 9))
    for r in rows:
        ratio = r["ms_median"] / fabric_ms[key] if key in fabric_ms else float("nan")
        lines.append(f"| {key[0]} | {key[1]} | {r['competitor']} | {r['ms_median']:.3f} | {r['per_s']:,.0f} | "
                     f"{r['mfu']:.3f} | {r['peak_allocated_bytes'] / 2**30:.2f} ({r['peak_reserved_bytes'] / 2**30:.2f}) | "
                     f"{ratio:.3f} |")
    # Self-checks: every competitor trained the same model (same parameter count) from the same
    # weights on the same batch, so the last losses must agree closely.
    params = {r["params"] for r in rows}
    losses = [r["last_loss"] for r in rows]
    spread = (max(losses) - min(losses)) / max(abs(min(losses)), 1e-12)
    # NOTE: the mlp memorises its one batch (losses near 5e-4 after 300 steps), where a relative
    # spread means nothing; losses that close to zero agree when they differ by less than 1e-3.
    ok = len(params) == 1 and (spread < 0.02 or max(losses) - min(losses) < 1e-3)
    checks.append(f"{'ok  ' if ok else 'FAIL'} {key[0]} {key[1]}: parameters {sorted(params)}, last losses "
                  + ", ".join(f"{r['competitor']} {r['last_loss']:.4f}" for r in rows) + f" (spread {spread:.2%})")
print("\n".join(lines))
print()
print("\n".join(checks))
print("AdamW kernels: " + "; ".join(f"{r['workload']}/{r['precision']}/{r['competitor']}: {r['optimizer_kernels']}"
                                    for r in results if r["workload"] == "gpt2"))
combined = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in runs.items()},
            "results": results, "table": lines, "checks": checks}
with open(os.path.join(out_dir, "race.json"), "w") as f:
    json.dump(combined, f, indent=2)
    f.write("\n")
print(f"race.sh: wrote {os.path.join(out_dir, 'race.json')}")
EOF
say "done"
