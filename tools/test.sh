#!/usr/bin/env bash
# Installs what is missing, checks the generated single header, builds fabric's tests (against the
# single header), every public header on its own, the examples and benchmarks, and runs the whole
# test suite with CTest; then builds and tests the torch-free parts with clang. Idempotent: a second
# run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${FABRIC_BUILD_DIR:-build/ci}
jobs=${FABRIC_JOBS:-$(nproc)}

echo "==> fabric: installing missing dependencies"
tools/install-deps.sh
echo "==> fabric: checking that single_include/fabric/fabric.hpp is up to date"
python3 tools/amalgamate.py --check
echo "==> fabric: checking that every test of Lightning's tests_fabric is mirrored or left out with a reason"
python3 tools/lightning_port.py --check | tail -1
if command -v clang-format >/dev/null; then
  echo "==> fabric: checking formatting (.clang-format)"
  git ls-files '*.hpp' '*.cpp' | grep -v '^single_include/' | xargs clang-format --dry-run --Werror
fi
echo "==> fabric: configuring $build (tests build against the single header)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFABRIC_TEST_SINGLE_HEADER=ON -DFABRIC_INSTALL=ON
echo "==> fabric: building tests, examples, benchmarks and the per-header check"
cmake --build "$build" -j "$jobs"
cmake --build "$build" -j "$jobs" --target fabric_header_check
echo "==> fabric: running the test suite"
ctest --test-dir "$build" --output-on-failure -j "$jobs"
# NOTE: LibTorch 1.13's own headers do not compile with clang in C++20, so clang checks the torch-free parts.
echo "==> fabric: building and testing the torch-free parts with clang 19 (FABRIC_TORCH_FREE)"
cmake -S . -B "$build-clang" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++-19 -DFABRIC_TORCH_FREE=ON \
  -DFABRIC_FUZZ=ON
cmake --build "$build-clang" -j "$jobs"
ctest --test-dir "$build-clang" --output-on-failure -j "$jobs"
# Each libFuzzer target of the torch-free readers runs about a minute (FABRIC_FUZZ_SECONDS) from its
# committed seed corpus (tests/fuzz/corpus/<name without _fuzz>, or the part before the first _).
fuzzers=("$build-clang"/tests/fuzz/*_fuzz)
# Runs one fuzzer for FABRIC_FUZZ_SECONDS; its log is $build-clang/fuzz-corpus/<name>.log.
fuzz() {
  local fuzzer=$1 name corpus work
  name=$(basename "$fuzzer")
  corpus=tests/fuzz/corpus/${name%_fuzz}
  [ -d "$corpus" ] || corpus=tests/fuzz/corpus/${name%%_*}
  work="$build-clang/fuzz-corpus/$name"
  mkdir -p "$work"
  "$fuzzer" -max_total_time="${FABRIC_FUZZ_SECONDS:-60}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build-clang/fuzz-corpus/$name-" "$work" "$corpus" >"$build-clang/fuzz-corpus/$name.log" 2>&1
}
if [ -x "${fuzzers[0]}" ]; then
  # NOTE: $jobs fuzzers at a time (each is one process), then each one's result in order.
  pids=()
  for fuzzer in "${fuzzers[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "==> fabric: fuzzing $(basename "$fuzzer") for ${FABRIC_FUZZ_SECONDS:-60} s"
    fuzz "$fuzzer" &
    pids+=($!)
  done
  failed=0
  for i in "${!fuzzers[@]}"; do
    name=$(basename "${fuzzers[$i]}")
    log="$build-clang/fuzz-corpus/$name.log"
    if ! wait "${pids[$i]}"; then
      tail -n 60 "$log"
      echo "fabric: $name failed: a crash, a hang or a sanitizer report (the input is in $build-clang/fuzz-corpus/)" >&2
      failed=1
    else
      echo "--> $name"
      grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    fi
  done
  [ "$failed" = 0 ] || exit 1
else
  echo "==> fabric: skipping the fuzz targets (clang-19's libFuzzer is not installed: apt-get install libclang-rt-19-dev)"
fi
