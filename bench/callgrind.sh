#!/usr/bin/env bash
# bench/callgrind.sh: counts the instructions (callgrind's Ir) that bench_cpu_overhead executes with
# the hand-written LibTorch loop alone (--mode raw) and with the fabric loop alone (--mode fabric),
# and prints both counts and their ratio fabric/raw: for the timed steps alone (callgrind dumps them
# as a part of their own) and for the whole run (process start, setup, warm-up, steps, exit).
# Instruction counts do not depend on the load of the machine, unlike times.
#
# Run it from anywhere in the repository; it builds bench_cpu_overhead first if needed:
#     bench/callgrind.sh [STEPS [WARMUP]]          # defaults: 3 timed steps, 1 warm-up step
# Environment: BUILD_DIR (default build-bench), JOBS (build jobs, default 2), OUT_DIR (where the
# callgrind.out files go, default $BUILD_DIR/callgrind). Needs valgrind. One step of the workload
# costs about a minute under callgrind with Debian's reference BLAS, so a run takes some minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
steps=${1:-3}
warmup=${2:-1}
build_dir=${BUILD_DIR:-build-bench}
out_dir=${OUT_DIR:-$build_dir/callgrind}

if ! command -v valgrind >/dev/null; then
  echo "callgrind.sh: expected valgrind on PATH, found none; install it (apt install valgrind)" >&2
  exit 1
fi

# Build (a no-op when up to date). A new build directory gets the benchmarks only.
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFABRIC_BUILD_TESTS=OFF \
    -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=ON >/dev/null
elif ! grep -q '^FABRIC_BUILD_BENCH:BOOL=ON' "$build_dir/CMakeCache.txt"; then
  cmake -S . -B "$build_dir" -DFABRIC_BUILD_BENCH=ON >/dev/null
fi
cmake --build "$build_dir" -j "${JOBS:-2}" --target bench_cpu_overhead
bench="$build_dir/bench/bench_cpu_overhead"

mkdir -p "$out_dir"
echo "callgrind.sh: ${steps} timed + ${warmup} warm-up steps per mode, OMP_NUM_THREADS=1; output in $out_dir"

# Prints "<whole-run Ir> <timed-steps Ir>" from the parts callgrind wrote for one run.
totals() {
  local prefix=$1 whole=0 part=0 n file
  for file in "$prefix" "$prefix".*; do
    [ -f "$file" ] || continue
    # "totals:" (or, in older files, "summary:") holds the Ir of the part; Ir is the first event.
    n=$(awk '/^(totals|summary):/ {print $2; exit}' "$file")
    [ -n "$n" ] || { echo "callgrind.sh: no totals line in $file" >&2; exit 1; }
    whole=$((whole + n))
    if grep -q '^desc: Trigger: Client Request: steps$' "$file"; then part=$n; fi
  done
  [ "$part" -gt 0 ] || { echo "callgrind.sh: no part named \"steps\" in $prefix*; was the bench built with valgrind/callgrind.h?" >&2; exit 1; }
  echo "$whole $part"
}

declare -A whole steps_ir
for mode in raw fabric; do
  prefix="$out_dir/callgrind.out.$mode"
  rm -f "$prefix" "$prefix".*
  start=$(date +%s)
  OMP_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$prefix" \
    "$bench" --mode "$mode" --steps "$steps" --warmup "$warmup" --threads 1 >"$out_dir/$mode.log" 2>&1 ||
    { echo "callgrind.sh: valgrind failed for --mode $mode; see $out_dir/$mode.log" >&2; exit 1; }
  result=$(totals "$prefix")
  read -r whole[$mode] steps_ir[$mode] <<<"$result"
  echo "  $mode: done in $(( $(date +%s) - start )) s"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a / b }'; }
printf '%-8s %20s %20s %18s\n' mode "whole run Ir" "timed steps Ir" "Ir per step"
for mode in raw fabric; do
  printf '%-8s %20d %20d %18d\n' "$mode" "${whole[$mode]}" "${steps_ir[$mode]}" $(( steps_ir[$mode] / steps ))
done
echo "ratio fabric/raw: timed steps $(ratio "${steps_ir[fabric]}" "${steps_ir[raw]}"), whole run $(ratio "${whole[fabric]}" "${whole[raw]}")"
echo "difference per step (fabric - raw): $(( (steps_ir[fabric] - steps_ir[raw]) / steps )) instructions"
