#!/usr/bin/env bash
# Runs a multi-process command that must fail: checks that it exits non-zero (and not by the outer
# timeout) within MAX_SECONDS, that its output contains TEXT, and that no process of it is left.
#     expect_failure.sh MAX_SECONDS TEXT -- command args...
set -u
max=$1
text=$2
shift 3
tag="fabric-fault-$$-$RANDOM"
start=$(date +%s%N)
out=$(timeout --kill-after=5 $((max + 30)) "$@" --tag "$tag" 2>&1)
code=$?
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
printf '%s\n' "$out"
echo "expect_failure: exit code $code after ${elapsed_ms} ms"
fail() {
  echo "expect_failure: FAILED: $*"
  pkill -9 -f "$tag" 2>/dev/null
  exit 1
}
[ "$code" -ne 0 ] || fail "the command succeeded"
[ "$code" -ne 124 ] || fail "the command hung until the outer timeout"
[ "$elapsed_ms" -lt $((max * 1000)) ] || fail "took ${elapsed_ms} ms, more than ${max} s"
grep -qE -- "$text" <<<"$out" || fail "the output lacks /$text/"
sleep 1
if pgrep -f -- "$tag" >/dev/null; then
  pgrep -af -- "$tag"
  fail "processes were left behind"
fi
echo "expect_failure: ok"
