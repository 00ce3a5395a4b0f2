#!/usr/bin/env bash
# Builds and runs fabric's GPU checks on the GPU machine (PyTorch wheel's LibTorch, NCCL, one H100) in
# one go: the unit tests ([cuda] included), the DDP worker over NCCL with one process, the Fashion-MNIST
# example on CUDA in every precision, and the benchmarks. Logs go to $OUT (or build-gpu/logs); a short
# summary is printed last. Prepare on the CPU machine first:
#     bash ../shared/gpu/fetch-deps.sh; mkdir -p .deps/fashion-mnist; cp /usr/share/datasets/fashion-mnist/* .deps/fashion-mnist/
# then run it there with .deps carried:   tools/gpu.sh [steps...]   (default: build test dist example bench)
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-build test dist example bench}
logs=${OUT:-build-gpu/logs}
mkdir -p "$logs"
summary=()
note() { summary+=("$*"); echo "==> $*"; }

# NOTE: the range-v3 package ships usr/include/std/iterator, which shadows g++ 13's <iterator>.
[ -e .deps/root/usr/include/std/iterator ] && mv .deps/root/usr/include/std/iterator .deps/iterator-aside
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
NCCL_INC=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
flags=""
[ -n "$NCCL_INC" ] && [ -e "$NCCL_INC/nccl.h" ] && flags="-I$NCCL_INC"
export NCCL_NVLS_ENABLE=0

if [[ " $steps " == *" build "* ]]; then
  start=$(date +%s)
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$PWD/.deps/root/usr" \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS=-rdynamic -DFABRIC_INSTALL=OFF -DFABRIC_BUILD_EXAMPLES=ON -DFABRIC_BUILD_BENCH=ON \
    -DFABRIC_DIST_WORKER_PCH="${FABRIC_DIST_WORKER_PCH:-ON}" \
    >"$logs/configure.log" 2>&1 || { tail -30 "$logs/configure.log"; note "configure FAILED"; }
  targets=$(cmake --build build-gpu --target help 2>/dev/null | awk -F: '/^[a-z_0-9-]+: /{print $1}' |
    grep -E "^(${FABRIC_GPU_TARGETS:-fabric_tests|fabric_ddp_worker|fashion_mnist|gpt2|bench_race|bench_optim_step|fabric-run})\$" | tr '\n' ' ')
  cmake --build build-gpu -j 16 --target $targets -- -k 0 >"$logs/build.log" 2>&1 ||
    { grep -E "error|Error" "$logs/build.log" | head -40; note "build FAILED (see build.log)"; }
  note "build: $targets in $(($(date +%s) - start)) s"
fi

if [[ " $steps " == *" test "* ]]; then
  t=build-gpu/tests/fabric_tests
  $t "~save/load round trip*" --reporter compact >"$logs/unit.log" 2>&1
  note "unit tests (all but the two round-trip cases, CUDA visible): exit $? | $(tail -2 "$logs/unit.log" | tr '\n' ' ')"
  $t "[cuda]" --reporter compact >"$logs/cuda.log" 2>&1
  note "[cuda] tests: exit $? | $(tail -2 "$logs/cuda.log" | tr '\n' ' ')"
  grep -E "failed|FAILED|error" "$logs/unit.log" | head -20
  gcc -shared -fPIC -O1 -o build-gpu/segv_backtrace.so tools/segv_backtrace.c -ldl &&
    LD_PRELOAD=$PWD/build-gpu/segv_backtrace.so $t "save/load round trip: modules*" >"$logs/roundtrip.log" 2>&1
  note "round trip (checkpoint test) alone: exit $?"
  grep -A40 "segv_backtrace" "$logs/roundtrip.log" | c++filt | cut -c1-260 | head -45
  tail -5 "$logs/roundtrip.log"
  if command -v gdb >/dev/null; then
    gdb -batch -ex run -ex bt --args $t "save/load round trip: modules*" \
      >"$logs/gdb-roundtrip.log" 2>&1
    note "round trip under gdb: $(grep -E 'passed|failed|SIGSEGV' "$logs/gdb-roundtrip.log" | head -3 | tr '\n' ' ')"
    grep -A25 SIGSEGV "$logs/gdb-roundtrip.log" | head -40
  else
    note "no gdb on this machine"
  fi
fi

if [[ " $steps " == *" dist "* ]]; then
  w=build-gpu/tests/dist/fabric_ddp_worker
  for s in "train --devices 1 --cuda" "train --devices 1 --cuda --grad-as-view --comm-hook bf16" \
    "train --devices 1 --cuda --static-graph" "collectives --devices 1 --cuda" "save --devices 1 --cuda --dir build-gpu"; do
    $w $s >"$logs/dist.log" 2>&1
    note "nccl ddp_worker $s: exit $? | $(tail -1 "$logs/dist.log")"
  done
fi

if [[ " $steps " == *" example "* ]]; then
  for p in 32-true 64-true bf16-mixed 16-mixed bf16-true 16-true; do
    build-gpu/examples/fashion_mnist --accelerator cuda --precision $p --epochs 1 --train-subset 20000 \
      --data-dir .deps/fashion-mnist >"$logs/example-$p.log" 2>&1
    note "fashion_mnist cuda $p: exit $? | $(grep -iE 'accuracy' "$logs/example-$p.log" | tail -1)"
  done
fi

if [[ " $steps " == *" example "* ]] && [ -x build-gpu/examples/gpt2/gpt2 ]; then
  build-gpu/examples/gpt2/gpt2 --steps 30 --expect-loss-decrease >"$logs/gpt2.log" 2>&1
  note "gpt2 example (cuda, bf16-mixed, 30 steps): exit $? | $(tail -2 "$logs/gpt2.log" | tr '\n' ' ')"
fi

if [[ " $steps " == *" bench "* ]]; then
  if [ -x build-gpu/bench/bench_optim_step ]; then
    for o in adamw sgd; do
      build-gpu/bench/bench_optim_step --device cuda --optimizer $o --steps 50 >"$logs/optim-$o.log" 2>&1
      note "optim step $o: $(tail -2 "$logs/optim-$o.log" | tr '\n' ' ')"
    done
  fi
  if [ -x bench/race.sh ] && [ -x build-gpu/bench/bench_race ]; then
    RACE_CONFIGURE=0 BUILD_DIR=build-gpu OUT="$logs/race" bench/race.sh >"$logs/race.log" 2>&1
    note "race: exit $?"
    tail -45 "$logs/race.log"
  fi
fi

echo
echo "==== summary"
printf '%s\n' "${summary[@]}"
