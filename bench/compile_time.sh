#!/usr/bin/env bash
# bench/compile_time.sh: compares the compile time of translation units that train a model with
# fabric — on one device (bench/compile_time/fabric_loop.cpp: <fabric/fabric.hpp> + <torch/torch.h>) and
# with DDP (fabric_ddp_loop.cpp: <fabric/distributed.hpp> + <torch/torch.h>) — with that of the same
# training loop written with LibTorch alone (bench/compile_time/torch_loop.cpp: <torch/torch.h>).
# Each is compiled RUNS times (default 3), in rotating order, with the exact command CMake uses (taken
# from compile_commands.json of the build directory, Release flags); it prints the median wall-clock
# and CPU (user + system) seconds of each and the ratios to the LibTorch loop (targets: 1.10 for one
# device, 1.25 with DDP). CPU seconds depend less on other work on the machine than wall-clock seconds.
#
# Run it from anywhere in the repository:
#     bench/compile_time.sh
# Environment: BUILD_DIR (default build-bench), RUNS (default 3).
set -euo pipefail

cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build-bench}
runs=${RUNS:-3}

# Configure (a new build directory gets the benchmarks only) and export the compile commands.
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFABRIC_BUILD_TESTS=OFF \
    -DFABRIC_BUILD_EXAMPLES=OFF -DFABRIC_BUILD_BENCH=ON -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
else
  cmake -S . -B "$build_dir" -DFABRIC_BUILD_BENCH=ON -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Writes the command that compiles $1 (a path relative to the repository) into $tmp/<name>.sh, with
# the object file sent to $tmp instead of the build directory.
extract() {
  python3 - "$build_dir/compile_commands.json" "$PWD/$1" "$tmp/$(basename "$1" .cpp)" <<'EOF'
import json, shlex, sys
db, source, out = sys.argv[1:]
for entry in json.load(open(db)):
    if entry["file"] == source:
        args = shlex.split(entry["command"]) if "command" in entry else entry["arguments"]
        args[args.index("-o") + 1] = out + ".o"
        with open(out + ".sh", "w") as f:
            f.write("cd %s && %s\n" % (shlex.quote(entry["directory"]), shlex.join(args)))
        break
else:
    sys.exit("compile_time.sh: expected %s in %s, found no entry; is the bench directory configured?" % (source, db))
EOF
}
units=(fabric_loop fabric_ddp_loop torch_loop)
for unit in "${units[@]}"; do extract "bench/compile_time/$unit.cpp"; done
echo "compile_time.sh: compiling each translation unit $runs times with:"
for unit in "${units[@]}"; do sed 's/^/  /' "$tmp/$unit.sh"; done

# Appends "<wall> <cpu>" of one compile of $1 to $tmp/$1.times (the compiler's messages go to a log,
# shown only when the compile fails).
measure() {
  if ! /usr/bin/time -f '%e %U %S' -o "$tmp/$1.time" bash "$tmp/$1.sh" >"$tmp/$1.log" 2>&1; then
    cat "$tmp/$1.log" >&2
    echo "compile_time.sh: compiling $1.cpp failed" >&2
    exit 1
  fi
  awk '{ printf "%.2f %.2f\n", $1, $2 + $3 }' "$tmp/$1.time" >>"$tmp/$1.times"
}
for ((i = 1; i <= runs; ++i)); do
  # Rotate the order so that drift of the machine's load hits every unit alike.
  for ((k = 0; k < ${#units[@]}; ++k)); do measure "${units[(i + k) % ${#units[@]}]}"; done
  echo "  run $i: fabric $(tail -n1 "$tmp/fabric_loop.times") s, fabric DDP $(tail -n1 "$tmp/fabric_ddp_loop.times") s," \
    "torch $(tail -n1 "$tmp/torch_loop.times") s (wall cpu)"
done

# Median of column $2 of file $1.
median() { sort -n -k"$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
fw=$(median "$tmp/fabric_loop.times" 1); fc=$(median "$tmp/fabric_loop.times" 2)
dw=$(median "$tmp/fabric_ddp_loop.times" 1); dc=$(median "$tmp/fabric_ddp_loop.times" 2)
tw=$(median "$tmp/torch_loop.times" 1); tc=$(median "$tmp/torch_loop.times" 2)
printf '%-36s %10s %10s\n' "translation unit" "wall s" "cpu s"
printf '%-36s %10.2f %10.2f\n' "fabric_loop.cpp (fabric, one device)" "$fw" "$fc" \
  "fabric_ddp_loop.cpp (fabric, DDP)" "$dw" "$dc" "torch_loop.cpp (LibTorch)" "$tw" "$tc"
awk -v fw="$fw" -v tw="$tw" -v fc="$fc" -v tc="$tc" -v dw="$dw" -v dc="$dc" 'BEGIN {
  printf "ratio fabric/torch:     wall %.3f, cpu %.3f (target <= 1.10)\n", fw / tw, fc / tc
  printf "ratio fabric DDP/torch: wall %.3f, cpu %.3f (target <= 1.25)\n", dw / tw, dc / tc }'
