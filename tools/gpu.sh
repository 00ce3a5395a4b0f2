#!/usr/bin/env bash
# Builds and runs fabric's GPU checks on the GPU machine (PyTorch wheel's LibTorch, NCCL, one GPU) in
# one go: every public header on its own and the compile-time tests, the unit tests ([cuda] included)
# and the torch-free ones, the DDP worker over NCCL with one process, the Fashion-MNIST example on CUDA
# in every precision, and the benchmarks. Logs go to $OUT (or build-gpu/logs); a short
# summary is printed last. Prepare on the CPU machine first (range-v3, CLI11, nlohmann-json, the data set):
#     tools/fetch-gpu-deps.sh
# then run it there with .deps carried:   tools/gpu.sh [steps...]   (default: build test dist example bench)
# FABRIC_GPU_TARGETS (a regex of targets) and FABRIC_TEST_GLOB (the unit test sources) narrow the build.
# The step "readme" runs the README quick start's PyTorch-wheel compile line; "tensorboard" reads fabric's event
# files with TensorBoard's EventAccumulator (tests/python/read_tensorboard.py).
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
    -DFABRIC_DIST_WORKER_PCH="${FABRIC_DIST_WORKER_PCH:-ON}" ${FABRIC_TEST_GLOB:+"-DFABRIC_TEST_GLOB=$FABRIC_TEST_GLOB"} \
    >"$logs/configure.log" 2>&1 || { tail -30 "$logs/configure.log"; note "configure FAILED"; }
  targets=$(cmake --build build-gpu --target help 2>/dev/null | awk -F: '/^[a-z_0-9-]+: /{print $1}' |
    grep -E "^(${FABRIC_GPU_TARGETS:-fabric_tests|fabric_core_tests|launch_worker|fabric_ddp_worker|fashion_mnist|gpt2|bench_race|bench_ddp_race|bench_optim_step|bench_cpu_overhead|fabric-run|fabric_static_policies|fabric_static_one_process|fabric_header_check})\$" | tr '\n' ' ')
  cmake --build build-gpu -j 16 --target $targets -- -k 0 >"$logs/build.log" 2>&1 ||
    { grep -E "error|Error" "$logs/build.log" | head -40; note "build FAILED (see build.log)"; }
  note "build: $targets in $(($(date +%s) - start)) s"
fi

if [[ " $steps " == *" test "* ]]; then
  t=build-gpu/tests/fabric_tests
  # NOTE: fabric's CMake names libstdc++ before libtorch (the wheel's libtorch exports std::filesystem).
  note "NEEDED of fabric_tests: $(readelf -d $t | awk '/NEEDED/ {print $5}' | tr -d '[]' | tr '\n' ' ')"
  note "std::filesystem::remove_all in fabric_tests: $(nm -C $t | grep -c ' [Tt] std::filesystem::remove_all') definition(s) of its own"
  $t --reporter compact >"$logs/unit.log" 2>&1
  note "unit tests (all, CUDA visible): exit $? | $(tail -2 "$logs/unit.log" | tr '\n' ' ')"
  grep -E "failed|FAILED|error" "$logs/unit.log" | head -20
  $t "[cuda]" --reporter compact >"$logs/cuda.log" 2>&1
  note "[cuda] tests: exit $? | $(tail -2 "$logs/cuda.log" | tr '\n' ' ')"
  build-gpu/tests/fabric_core_tests --reporter compact >"$logs/core.log" 2>&1
  note "torch-free tests (environments, launchers): exit $? | $(tail -2 "$logs/core.log" | tr '\n' ' ')"
  for s in build-gpu/tests/static/fabric_static_policies build-gpu/tests/static/fabric_static_one_process; do
    [ -x "$s" ] && { $s; note "$(basename $s) (built, ran): exit $?"; }
  done
fi

if [[ " $steps " == *" dist "* ]]; then
  w=build-gpu/tests/dist/fabric_ddp_worker
  for s in "train --devices 1 --cuda" "train --devices 1 --cuda --grad-as-view --comm-hook bf16" \
    "train --devices 1 --cuda --static-graph" "collectives --devices 1 --cuda" "save --devices 1 --cuda --dir build-gpu"; do
    $w $s >"$logs/dist.log" 2>&1
    note "nccl ddp_worker $s: exit $? | $(tail -1 "$logs/dist.log")"
  done
  # The rendezvous of a world of two nodes whose second never comes names it, within the timeout.
  tests/dist/expect_failure.sh 20 "rank 1 never arrived" -- env TORCHELASTIC_RUN_ID=gpu WORLD_SIZE=2 RANK=0 \
    LOCAL_RANK=0 GROUP_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29581 $w train --devices 1 --num-nodes 2 --external \
    --cuda --timeout-s 5 >"$logs/rendezvous.log" 2>&1
  note "nccl rendezvous without its second node: exit $? | $(grep -m1 'never arrived' "$logs/rendezvous.log" | cut -c1-160)"
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

if [[ " $steps " == *" tensorboard "* ]]; then
  # TensorBoard's own reader (EventAccumulator, the hparams plugin's parsers) on fabric's event files: the
  # sample run the hidden test writes (checked against its expected.json), then a CUDA run of the example.
  export FABRIC_TB_SAMPLE_DIR="$logs/tb-sample"
  rm -rf "$FABRIC_TB_SAMPLE_DIR" && mkdir -p "$FABRIC_TB_SAMPLE_DIR"
  build-gpu/tests/fabric_core_tests '[.tensorboard-sample]' >"$logs/tb-sample.log" 2>&1
  python3 tests/python/read_tensorboard.py "$FABRIC_TB_SAMPLE_DIR" --expect-text command \
    --expected "$FABRIC_TB_SAMPLE_DIR/lightning_logs/version_0/expected.json" >>"$logs/tb-sample.log" 2>&1
  note "tensorboard sample read by EventAccumulator: exit $? | $(tail -1 "$logs/tb-sample.log")"
  rm -rf "$logs/fm-logs"
  build-gpu/examples/fashion_mnist --accelerator cuda --precision bf16-mixed --epochs 2 --train-subset 20000 \
    --data-dir .deps/fashion-mnist --log-dir "$logs/fm-logs" >"$logs/example-logs.log" 2>&1
  python3 tests/python/read_tensorboard.py "$logs/fm-logs/tensorboard" >"$logs/tb-example.log" 2>&1
  note "fashion_mnist --log-dir read by EventAccumulator: exit $? | $(tail -1 "$logs/tb-example.log")"
fi

if [[ " $steps " == *" readme "* ]]; then
  python3 tests/package/quickstart.py --readme README.md --source . --work build-gpu/quickstart \
    --blocks train.cpp,wheel --expect "accuracy 9[0-9]" >"$logs/quickstart.log" 2>&1
  note "README quick start with the wheel's LibTorch: exit $? | $(grep -E 'accuracy' "$logs/quickstart.log" | tail -1)"
fi

if [[ " $steps " == *" bench "* ]]; then
  if [ -x build-gpu/bench/bench_optim_step ]; then
    for o in adamw sgd; do
      build-gpu/bench/bench_optim_step --device cuda --optimizer $o --steps 50 >"$logs/optim-$o.log" 2>&1
      note "optim step $o: $(tail -2 "$logs/optim-$o.log" | tr '\n' ' ')"
    done
  fi
  if [ -x build-gpu/bench/bench_cpu_overhead ]; then
    for flag in "" --progress; do
      build-gpu/bench/bench_cpu_overhead --threads 1 --steps 200 --warmup 20 $flag >"$logs/cpu-overhead$flag.log" 2>&1
      note "cpu overhead $flag: $(tail -3 "$logs/cpu-overhead$flag.log" | tr '\n' ' ')"
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
