#!/usr/bin/env bash
# Issue 17's GPU check of Fabric::capture (include/fabric/utils/capture.hpp) on the GPU machine: builds
# the unit tests of tests/unit/utils/capture_test.cpp against the PyTorch wheel's LibTorch and runs them,
# the [cuda] ones included (bit-identical to the eager loop, the refusals, the ms/step timing line).
# Usage, from the repository root, after tools/fetch-gpu-deps.sh (carry .deps):  tools/capture_gpu.sh
# Logs go under $OUT (default build-capture-gpu/out); tools/unit_gpu.sh does the work.
exec "$(dirname "$0")/unit_gpu.sh" capture "unit/utils/capture_test.cpp" "[capture]"
