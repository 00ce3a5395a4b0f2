#!/usr/bin/env bash
# Issue 14's checks on the GPU machine (PyTorch 2.11 wheel, Lightning 2.6.6), in one go; run from the repository
# root with .deps carried (tools/fetch-gpu-deps.sh), logs under $OUT:
#   1. the std::filesystem trap: user programs built the documented ways (CMake find_package(Torch) +
#      find_package(fabric) + fabric::fabric, tests/package/filesystem; the README's wheel compile line; and, as the
#      control that shows the trap, the same line without -lstdc++ first) — NEEDED (readelf -d), where the
#      program's std::filesystem calls bind (LD_DEBUG=bindings), and a run calling every path where fabric uses
#      std::filesystem, with no LD_PRELOAD; then fabric's io tests (the checkpoint suite) with no preload;
#   2. fidelity with Python Lightning Fabric (tests/python/fidelity.py) and with plain PyTorch 2.11;
#   3. the fixtures Debian's Python cannot make (tests/python/fidelity.py --fixtures, make_scaler_fixture.py)
#      into $OUT/fixtures.tar, to be committed under tests/unit/io/fixtures.
# Steps (default all): build filesystem io fidelity fixtures. Logs go to /tmp/gpu-checks; $OUT gets at most 8
# files (the device's limit): summary.txt, io-tests.log, fidelity-lightning.log, bindings.txt, fixtures.tar.
set -uo pipefail
cd "$(dirname "$0")/../.."
steps=" ${*:-build filesystem io fidelity fixtures} "
out=${OUT:-build-gpu-py/out}
logs=/tmp/gpu-checks
mkdir -p "$logs" "$out"
summary=()
note() { summary+=("$*"); echo "==> $*"; }
note "LD_PRELOAD before: '${LD_PRELOAD:-}' (unset from here on); $(g++ --version | head -1); $(cmake --version | head -1)"
unset LD_PRELOAD
[ -e .deps/root/usr/include/std/iterator ] && mv .deps/root/usr/include/std/iterator .deps/iterator-aside
P=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
NCCL_INC=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "include"))' 2>/dev/null || true)
flags=""
[ -n "$NCCL_INC" ] && [ -e "$NCCL_INC/nccl.h" ] && flags="-I$NCCL_INC"
deps=$PWD/.deps/root/usr
B=build-gpu-py
start=$(date +%s)

if [[ $steps == *" build "* ]]; then
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$P;$deps" -DCMAKE_CXX_FLAGS="$flags" \
  -DFABRIC_INSTALL=ON -DCMAKE_INSTALL_PREFIX=$PWD/$B/prefix -DFABRIC_TEST_GLOB="unit/io/*.cpp" \
  -DFABRIC_SANITIZED_CHECKPOINT_TESTS=OFF -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=OFF -DFABRIC_BUILD_RUN=OFF \
  >"$logs/configure.log" 2>&1 || { tail -30 "$logs/configure.log"; note "configure FAILED"; }
cmake --install $B >"$logs/install.log" 2>&1 || note "install FAILED"
# The README's wheel line (README.md, "quickstart: wheel"), plus the include directory of range-v3 and nlohmann-json.
readme_line() {
  g++ -std=c++20 -O2 -DFMT_HEADER_ONLY -I single_include -isystem "$deps/include" -isystem $TORCH/include \
    -isystem $TORCH/include/torch/csrc/api/include tests/package/filesystem/main.cpp -o "$1" -L$TORCH/lib \
    -Wl,-rpath,$TORCH/lib "${@:2}"
}
(cmake --build $B -j 12 --target fabric_tests fabric_fidelity >"$logs/build.log" 2>&1 || echo "build FAILED" >>"$logs/build.log") &
(cmake -S tests/package/filesystem -B $B/fs-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
   -DCMAKE_PREFIX_PATH="$PWD/$B/prefix;$P;$deps" -DCMAKE_CXX_FLAGS="$flags" >"$logs/fs-cmake.log" 2>&1 &&
 cmake --build $B/fs-cmake -v >>"$logs/fs-cmake.log" 2>&1 || echo "fs-cmake FAILED" >>"$logs/fs-cmake.log") &
(readme_line $B/fs-readme -lstdc++ -Wl,--no-as-needed -ltorch -ltorch_cpu -ltorch_cuda -Wl,--as-needed -lc10 -lc10_cuda \
   >"$logs/fs-readme.log" 2>&1 || echo "fs-readme FAILED" >>"$logs/fs-readme.log") &
# The same user project with the system's g++ (a shared libstdc++; CMake's default here is /opt/gcc, whose
# libstdc++ is static), and its control linked to torch alone.
(cmake -S tests/package/filesystem -B $B/fs-cmake-sys -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
   -DFILESYSTEM_USER_CONTROL=ON -DCMAKE_PREFIX_PATH="$PWD/$B/prefix;$P;$deps" -DCMAKE_CXX_FLAGS="$flags" >"$logs/fs-cmake-sys.log" 2>&1 &&
 cmake --build $B/fs-cmake-sys -v >>"$logs/fs-cmake-sys.log" 2>&1 || echo "fs-cmake-sys FAILED" >>"$logs/fs-cmake-sys.log") &
(readme_line $B/fs-naive -Wl,--no-as-needed -ltorch -ltorch_cpu -ltorch_cuda -Wl,--as-needed -lc10 -lc10_cuda \
   >"$logs/fs-naive.log" 2>&1 || echo "fs-naive FAILED" >>"$logs/fs-naive.log") &
wait
note "builds in $(($(date +%s) - start)) s: $(grep -l FAILED "$logs"/build.log "$logs"/fs-*.log 2>/dev/null | tr '\n' ' ')"
grep -E "error" "$logs/build.log" | head -20
for l in fs-cmake fs-cmake-sys; do
  note "$l link lines: $(grep -E ' -o filesystem_user(_control)? ' "$logs/$l.log" | sed -E 's/.* -o (filesystem_user[a-z_]*) (.*)/\1: \2/' | cut -c1-700 | tr '\n' ';')"
done
fi

# Where a program's own std::filesystem calls bind, and whether it runs.
inspect() {
  local name=$1 exe=$2
  shift 2
  [ -x "$exe" ] || { note "$name: not built"; return; }
  note "$name NEEDED: $(readelf -d "$exe" | awk '/NEEDED/ {print $5}' | tr -d '[]' | tr '\n' ' ')"
  note "$name defines std::filesystem itself: $(nm -C --defined-only "$exe" | grep -c ' std::filesystem::') symbols"
  rm -f /tmp/bind.$name.*
  LD_DEBUG=bindings LD_DEBUG_OUTPUT=/tmp/bind.$name "$exe" "$@" >"$logs/$name.run.log" 2>&1
  local rc=$?
  grep -h "binding file $exe " /tmp/bind.$name.* 2>/dev/null | grep 10filesystem |
    sed -E 's/.* to ([^ ]+) .*symbol `([^'"'"']+).*/\1 \2/' | sort -u >"$logs/$name.bindings.txt"
  sed "s/^/$name /" "$logs/$name.bindings.txt" >>"$logs/bindings.txt"
  note "$name run (no preload): exit $rc | $(tail -1 "$logs/$name.run.log" | cut -c1-200)"
  note "$name std::filesystem bindings: $(awk '{print $1}' "$logs/$name.bindings.txt" | sort | uniq -c | tr '\n' ' ')"
  rm -f /tmp/bind.$name.*
}
if [[ $steps == *" filesystem "* ]]; then
  inspect fs-cmake $B/fs-cmake/filesystem_user
  inspect fs-cmake-sys $B/fs-cmake-sys/filesystem_user
  inspect fs-cmake-sys-control $B/fs-cmake-sys/filesystem_user_control
  inspect fs-readme $B/fs-readme
  inspect fs-naive $B/fs-naive
  inspect fidelity $B/tests/python/fabric_fidelity init
  cp "$logs/bindings.txt" "$out/" 2>/dev/null
fi

t=$B/tests/fabric_tests
if [[ $steps == *" io "* ]] && [ -x $t ]; then
  note "fabric_tests NEEDED: $(readelf -d $t | awk '/NEEDED/ {print $5}' | tr -d '[]' | tr '\n' ' ')"
  $t --reporter compact >"$logs/io-tests.log" 2>&1
  note "io tests (tests/unit/io/*.cpp, no preload): exit $? | $(tail -2 "$logs/io-tests.log" | tr '\n' ' ')"
  grep -E "failed|FAILED" "$logs/io-tests.log" | head -10
  note "of which [checkpoint]: $($t "[checkpoint]" --list-tests | grep -i "matching test case")"
  cp "$logs/io-tests.log" "$out/"
fi

f=$B/tests/python/fabric_fidelity
if [[ $steps == *" fidelity "* ]] && [ -x $f ]; then
  python3 tests/python/fidelity.py --cxx $f --work "$logs/fidelity-lightning" --lightning yes \
    --fixtures "$logs/fixtures" >"$logs/fidelity-lightning.log" 2>&1
  note "fidelity vs Lightning: exit $? | $(tail -1 "$logs/fidelity-lightning.log")"
  cat "$logs/fidelity-lightning.log"
  cp "$logs/fidelity-lightning.log" "$out/"
  python3 tests/python/fidelity.py --cxx $f --work "$logs/fidelity-torch" --lightning no >"$logs/fidelity-torch.log" 2>&1
  note "fidelity vs PyTorch: exit $? | $(tail -1 "$logs/fidelity-torch.log")"
  grep -E "^(ok|FAIL)" "$logs/fidelity-torch.log"
fi
if [[ $steps == *" fixtures "* ]]; then
  [ -e "$logs/fixtures/lightning_fidelity_sgd.ckpt" ] ||
    python3 tests/python/fidelity.py --cxx $f --work "$logs/fidelity-fx" --fixtures "$logs/fixtures" >"$logs/fidelity-fx.log" 2>&1
  python3 tests/python/make_scaler_fixture.py "$logs/fixtures" >"$logs/scaler-fixture.log" 2>&1
  note "scaler fixture: exit $? | $(tail -1 "$logs/scaler-fixture.log" | cut -c1-300)"
  cp "$logs/fidelity-fx.log" "$out/" 2>/dev/null
  ls -la "$logs/fixtures" 2>/dev/null
  tar -C "$logs/fixtures" -cf "$out/fixtures.tar" .
fi

echo
echo "==== summary ($(($(date +%s) - start)) s)"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
