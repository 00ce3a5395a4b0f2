#!/usr/bin/env bash
# The race on the GPU machine from a committed tree, in one call (issue 17): in a shared working tree other
# people's half-done headers would be built too, so
#
#   bench/race_gpu.sh pack [REV]     # here: git archive REV (default HEAD) into build/race-gpu/src.tar
#   bench/race_gpu.sh run [FLAGS]    # there, carrying .deps and build/race-gpu: unpacks it under /tmp/race-src,
#                                    # runs RACE_PROFILE=1 bench/race.sh FLAGS there, then bench_race
#                                    # --profile for gpt2; logs, traces and race.json go to $OUT
#
# RACE_TIMEOUT (default 265) bounds the race itself (the table then shows the rounds that finished); the
# build takes about 160 s on the H200 and the full race about 245 s.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
  pack)
    mkdir -p build/race-gpu
    git archive "${1:-HEAD}" -o build/race-gpu/src.tar && echo "race_gpu.sh: build/race-gpu/src.tar is $(git rev-parse --short "${1:-HEAD}")"
    ;;
  run)
    OUT=${OUT:-$PWD/build/race-gpu/out}
    mkdir -p "$OUT" /tmp/race-src
    [ -e build/race-gpu/src.tar ] || { echo "race_gpu.sh: no build/race-gpu/src.tar; run bench/race_gpu.sh pack first and carry build/race-gpu"; exit 1; }
    tar -xf build/race-gpu/src.tar -C /tmp/race-src
    [ -e /tmp/race-src/.deps ] || ln -s "$PWD/.deps" /tmp/race-src/.deps
    cd /tmp/race-src || exit 1
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    export BUILD_DIR=/tmp/build-race
    OUT=$OUT RACE_PROFILE=1 RACE_TIMEOUT=${RACE_TIMEOUT:-265} bench/race.sh "$@" >"$OUT/race-sh.log" 2>&1
    rc=$?
    grep -E "race.sh \[|error" "$OUT/race-sh.log" | head -20
    sed -n '/^profile /,/^race.sh \[/p' "$OUT/race-sh.log" | head -150
    sed -n '/^The race on/,$p' "$OUT/race-sh.log"
    timeout 60 "$BUILD_DIR/bench/bench_race" --device cuda --profile "$OUT/trace" --workload gpt2 --profile-steps 20 \
      >"$OUT/profile-gpt2.log" 2>&1
    timeout 30 python3 bench/python/race_profile.py "$OUT"/trace-gpt2-*.json >>"$OUT/profile-gpt2.log" 2>&1
    head -60 "$OUT/profile-gpt2.log"
    exit $rc
    ;;
  *)
    echo "usage: bench/race_gpu.sh pack [REV] | run [race.sh flags]" >&2
    exit 2
    ;;
esac
