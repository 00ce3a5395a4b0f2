#!/usr/bin/env bash
# Issue 17's GPU check of fabric::nn (include/fabric/nn/): the unit tests of tests/unit/nn/ against the
# PyTorch wheel's LibTorch, the [cuda] ones included: Linear's mixed-precision backward (float32 weight
# gradients from the GEMM, bias gradients from the column-sum kernels), LayerNorm's fused kernels against
# at::layer_norm, cross_entropy's kernel.
# Usage, from the repository root, after tools/fetch-gpu-deps.sh (carry .deps):  tools/nn_gpu.sh
# Logs go under $OUT (default build-nn-gpu/out); tools/unit_gpu.sh does the work.
exec "$(dirname "$0")/unit_gpu.sh" nn "unit/nn/*.cpp" "[nn]"
