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
cmake -S . -B "$build-clang" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++-19 -DFABRIC_TORCH_FREE=ON
cmake --build "$build-clang" -j "$jobs"
ctest --test-dir "$build-clang" --output-on-failure -j "$jobs"
