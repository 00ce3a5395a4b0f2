#!/usr/bin/env bash
# resume.sh BIN DIR [ARGS...]: runs BIN (fabric_resume) uninterrupted, then killed mid-epoch (SIGKILL a few
# steps after its last checkpoint), then resumed from that checkpoint, and checks that the resumed run prints
# the uninterrupted run's losses and learning rates bit for bit. Then it checks that the comparison can fail:
# a resume without the random states, and one without the loader's position, print other losses.
set -u
bin=$1
dir=$2
shift 2
kill_at=23 # checkpoints every 5 steps; 16 (8 under DDP) steps an epoch: killed mid-epoch, 3 steps after one
rm -rf "$dir"
mkdir -p "$dir"
fail() {
  echo "resume.sh: $*" >&2
  for f in "$dir"/*.log; do
    echo "--- $f" >&2
    cat "$f" >&2
  done
  exit 1
}
steps_after() { awk -v from="$1" '$1 == "step" && $2 > from' "$2"; }

"$bin" --dir "$dir/full" "$@" >"$dir/full.log" 2>&1 || fail "the uninterrupted run failed"
"$bin" --dir "$dir/cut" --kill-at "$kill_at" "$@" >"$dir/killed.log" 2>&1
rc=$?
[ "$rc" -eq 137 ] || fail "expected the run to die of SIGKILL (exit status 137), found $rc"
grep -q "^step $kill_at " "$dir/killed.log" || fail "the killed run did not reach step $kill_at"
grep -q "^done" "$dir/killed.log" && fail "the killed run finished"
cp -r "$dir/cut" "$dir/cut-copy"
"$bin" --dir "$dir/cut" --resume "$@" >"$dir/resumed.log" 2>&1 || fail "the resumed run failed"
resumed_at=$(awk '$1 == "resumed" { print $4 }' "$dir/resumed.log")
[ "$resumed_at" = 20 ] || fail "expected the resume at step 20 (the last checkpoint), found '$resumed_at'"
[ "$(steps_after 0 "$dir/resumed.log" | head -1 | awk '{ print $2 }')" = 21 ] || fail "the resumed run did not start at step 21"
[ "$(steps_after 20 "$dir/full.log" | wc -l)" -gt 20 ] || fail "the uninterrupted run printed too few steps"
if ! diff <(steps_after 20 "$dir/full.log") <(steps_after 0 "$dir/resumed.log") >"$dir/diff.txt"; then
  fail "the resumed run's losses differ from the uninterrupted run's: $(cat "$dir/diff.txt")"
fi
diff <(steps_after 0 "$dir/full.log" | head -"$kill_at") <(steps_after 0 "$dir/killed.log") >/dev/null ||
  fail "the killed run's steps differ from the uninterrupted run's"

# The comparison can fail: what a resume without the random states or the loader's position prints differs.
for entry in rng loader; do
  rm -rf "$dir/cut" && cp -r "$dir/cut-copy" "$dir/cut"
  "$bin" --dir "$dir/cut" --resume --drop "$entry" "$@" >"$dir/resumed-without-$entry.log" 2>&1 ||
    fail "the resumed run without $entry failed"
  if diff <(steps_after 20 "$dir/full.log") <(steps_after 0 "$dir/resumed-without-$entry.log") >/dev/null; then
    fail "a resume without $entry printed the same losses: the comparison cannot tell"
  fi
done
echo "resume.sh: the resumed run matches the uninterrupted one bit for bit ($(steps_after 20 "$dir/full.log" | wc -l) steps after step 20)"
