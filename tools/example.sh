#!/usr/bin/env bash
# Installs what is missing, builds the Fashion-MNIST example and trains it on the CPU.
# Extra arguments go to the example (see --help), e.g. tools/example.sh --epochs 1.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${FABRIC_BUILD_DIR:-build/example}

echo "==> fabric: installing what the example needs and is missing"
tools/install-deps.sh example
echo "==> fabric: configuring and building the example in $build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFABRIC_BUILD_TESTS=OFF -DFABRIC_BUILD_BENCH=OFF
cmake --build "$build" -j "$(nproc)" --target fashion_mnist
echo "==> fabric: training a CNN on Fashion-MNIST (CPU)"
"$build/examples/fashion_mnist" "$@"
