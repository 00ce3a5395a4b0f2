#!/usr/bin/env bash
# fabric's DDP on several GPUs, in one command (shared BENCH.md, last target row; bench/README.md,
# "DDP on several GPUs"). On a machine with N >= 2 GPUs it builds bench_ddp_race and fabric-run, then
# prints, for every device count D in 2 4 8 up to N:
#
#   check    DDP over D GPUs against one device on the same global batches (bench_ddp_race --mode
#            check): the first step's gradients and the parameters after the last step, for mlp fp32,
#            mlp bf16-mixed and gpt2 bf16-mixed;
#   time     fabric (bench_ddp_race --mode time) and Python Lightning Fabric (bench/python/race.py
#            --devices D, strategy="ddp") on 1 and D GPUs, each GPU with the workload's batch (global
#            batch D x batch); a table of ms/step, fabric/Lightning, per-GPU throughput and scaling
#            efficiency (per-GPU throughput on D GPUs / throughput on one GPU without DDP);
#   worker   the multi-process tests' scenarios (tests/dist/ddp_worker.cpp) over NCCL on D GPUs:
#            DDP options against one process, collectives, the distributed sampler, a model mismatch,
#            collective save/load;
#   faults   rank 1 of D killed with SIGKILL during gpt2 training, started by fabric.launch(),
#            fabric-run and torchrun: the job must fail with the launcher's message within 60 s and
#            leave no process behind (tests/dist/expect_failure.sh).
#
# Usage, from the repository root on the GPU machine (carry .deps, see tools/gpu.sh):
#
#   bench/multi_gpu.sh                      # everything
#   bench/multi_gpu.sh check faults         # a subset of: build check time faults worker
#
# Environment: OUT (logs and multi_gpu.json; default build-gpu/multi-gpu), PYTHON (default python3),
# MULTI_GPU_DEVICES (the device counts, default "2 4 8" up to the GPUs present), MULTI_GPU_ROUNDS
# (timing rounds, default 1), MULTI_GPU_WORKLOADS (default "mlp-fp32 mlp-bf16-mixed gpt2"),
# MULTI_GPU_FABRIC_VARIANTS (fabric DDP options also timed, e.g. "--grad-as-view --bucket-cap-mb=100"),
# BUILD_DIR (default build-gpu). A dry run of the script's logic on the CPU (Gloo; Lightning is skipped where missing):
#   RACE_DEVICE=cpu MULTI_GPU_GPUS=2 BUILD_DIR=build PYTHON=/usr/bin/python3 \
#     MULTI_GPU_ARGS="--gpt2-config tiny --steps 3 --warmup 1" bench/multi_gpu.sh check time faults
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-build check time faults worker}
OUT_DIR=${OUT:-build-gpu/multi-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off, in every process the launchers start too
start=$(date +%s)
say() { echo "multi_gpu.sh [$(($(date +%s) - start)) s]: $*"; }

DEVICE=${RACE_DEVICE:-cuda}
BUILD=${BUILD_DIR:-build-gpu}
read -r -a extra <<<"${MULTI_GPU_ARGS:-}"
gpus=${MULTI_GPU_GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
counts=""
for d in ${MULTI_GPU_DEVICES:-2 4 8}; do [ "$d" -le "$gpus" ] && counts="$counts $d"; done
say "$gpus GPU(s): $(nvidia-smi -L 2>/dev/null | tr '\n' ';') device counts:${counts:- none}"
[ -n "$counts" ] || { say "needs at least 2 GPUs"; exit 1; }
nvidia-smi topo -m 2>/dev/null | head -8

if [[ " $steps " == *" build "* ]]; then
  FABRIC_DIST_WORKER_PCH=OFF FABRIC_GPU_TARGETS='bench_ddp_race|fabric-run|fabric_ddp_worker' OUT="$OUT_DIR" \
    tools/gpu.sh build | grep -E "^==>|error"
fi
bench=$BUILD/bench/bench_ddp_race
[ -x "$bench" ] || { say "no $bench: build it first"; exit 1; }

failed=0
if [[ " $steps " == *" check "* ]]; then
  for d in $counts; do
    for w in "mlp-fp32 --steps 20" "mlp-bf16-mixed --steps 20" "gpt2 --steps 10"; do
      name=$(echo "$w" | cut -d' ' -f1)
      $bench --mode check --workload $w --devices "$d" "${extra[@]}" --json "$OUT_DIR/check-$name-$d.json" \
        >"$OUT_DIR/check-$name-$d.log" 2>&1 || failed=1
      grep -E "^  (ok|FAILED)|error" "$OUT_DIR/check-$name-$d.log" || { tail -5 "$OUT_DIR/check-$name-$d.log"; failed=1; }
    done
  done
fi

if [[ " $steps " == *" time "* ]]; then
  # Rounds alternate the competitors (fabric, Lightning, fabric's variants) so that drifts of the
  # machine hit all of them; the table takes each figure's median over the rounds.
  read -r -a variants <<<"${MULTI_GPU_FABRIC_VARIANTS:-}"
  for r in $(seq 1 "${MULTI_GPU_ROUNDS:-1}"); do
    for w in ${MULTI_GPU_WORKLOADS:-mlp-fp32 mlp-bf16-mixed gpt2}; do
      for d in 1 $counts; do
        f="$OUT_DIR/time-fabric-$w-$d-r$r"
        $bench --mode time --workload "$w" --devices "$d" "${extra[@]}" --json "$f.json" >"$f.log" 2>&1 ||
          { failed=1; tail -3 "$f.log"; }
        grep -E "^  (mlp|gpt2)|error" "$f.log" | sed "s/^/fabric    /"
        f="$OUT_DIR/time-lightning-$w-$d-r$r"
        $PY bench/python/race.py --device "$DEVICE" --competitors lightning --devices "$d" --workload "$w" \
          "${extra[@]}" --json "$f.json" >"$f.log" 2>&1 || { failed=1; tail -3 "$f.log"; }
        grep -E "^  (mlp|gpt2)|Error" "$f.log" | sed "s/^/lightning /"
        # fabric's DDP options (MULTI_GPU_FABRIC_VARIANTS="--grad-as-view --bucket-cap-mb=100": one
        # variant per word, = for a space), on more than one GPU.
        [ "$d" -gt 1 ] || continue
        for v in "${variants[@]}"; do
          f="$OUT_DIR/time-fabric${v//[ =]/_}-$w-$d-r$r"
          # shellcheck disable=SC2086 # the variant's words are flags
          $bench --mode time --workload "$w" --devices "$d" "${extra[@]}" ${v//=/ } --json "$f.json" >"$f.log" 2>&1 ||
            { failed=1; tail -3 "$f.log"; }
          grep -E "^  (mlp|gpt2)|error" "$f.log" | sed "s/^/fabric $v /"
        done
      done
    done
  done
  $PY - "$OUT_DIR" <<'EOF'
import glob, json, os, re, sys

out = sys.argv[1]
runs = {}  # (workload, precision, devices, who) -> the results of every round
for path in sorted(glob.glob(os.path.join(out, "time-*-r*.json"))):
    with open(path) as f:
        data = json.load(f)
    m = re.match(r"time-(fabric|lightning)(\S*?)-(mlp|gpt2)", os.path.basename(path))
    who = m.group(1) + (" " + m.group(2).strip("_").replace("_", " ") if m.group(2) else "")
    for r in data["results"] if "results" in data else [data]:
        runs.setdefault((r["workload"], r["precision"], r["devices"], who), []).append(r)


def pick(key):
    """The round with the median step time (the lower middle one of an even count), and every round's time."""
    rs = sorted(runs.get(key, []), key=lambda r: r["ms_median"])
    return (rs[(len(rs) - 1) // 2], [r["ms_median"] for r in runs[key]]) if rs else (None, [])


na = "n/a"
def ms(r, all_ms):
    if not r:
        return na
    return f"{r['ms_median']:.3f}" + (f" ({' / '.join(f'{m:.2f}' for m in all_ms)})" if len(all_ms) > 1 else "")
eff = lambda r, r1: f"{r['per_s_per_device'] / r1['per_s_per_device']:.1%}" if r and r1 else na
mem = lambda r: f"{r['peak_allocated_bytes'] / 2**30:.2f}" if r else na

lines = ["| workload | GPUs | fabric ms/step | Lightning ms/step | fabric/Lightning | fabric per-GPU throughput | "
         "fabric scaling efficiency | Lightning scaling efficiency | peak GiB fabric / Lightning (rank 0) |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
variant_lines = ["| workload | GPUs | fabric DDP options | ms/step | scaling efficiency | against fabric's defaults |",
                 "| --- | ---: | --- | ---: | ---: | ---: |"]
keys = sorted(runs, key=lambda k: (k[0] != "mlp", k[1], k[2], k[3]))
for w, p, d, who in keys:
    (f, fms), (f1, _) = pick((w, p, d, "fabric")), pick((w, p, 1, "fabric"))
    if who == "fabric":
        (l, lms), (l1, _) = pick((w, p, d, "lightning")), pick((w, p, 1, "lightning"))
        unit = "tok/s" if w == "gpt2" else "samples/s"
        ratio = f"{f['ms_median'] / l['ms_median']:.3f}" if f and l else na
        lines.append(f"| {w} {p} | {d} | {ms(f, fms)} | {ms(l, lms)} | {ratio} | {f['per_s_per_device']:,.0f} {unit} | "
                     f"{eff(f, f1)} | {eff(l, l1)} | {mem(f)} / {mem(l)} |")
    elif who.startswith("fabric "):
        v, vms = pick((w, p, d, who))
        against = f"{v['ms_median'] / f['ms_median']:.3f}" if f else na
        variant_lines.append(f"| {w} {p} | {d} | {who[len('fabric '):]} | {ms(v, vms)} | {eff(v, f1)} | {against} |")
rounds = max((len(v) for v in runs.values()), default=0)
print(f"{rounds} round(s); ms/step is the median over the rounds (each round's in parentheses)")
print("\n".join(lines))
if len(variant_lines) > 2:
    print()
    print("\n".join(variant_lines))
with open(os.path.join(out, "multi_gpu.json"), "w") as fh:
    json.dump({"table": lines, "variants": variant_lines[2:],
               "runs": [dict(r, who=k[3]) for k, rs in sorted(runs.items()) for r in rs]}, fh, indent=2)
    fh.write("\n")
EOF
fi

if [[ " $steps " == *" faults "* ]]; then
  d=$(echo $counts | awk '{print $NF}')
  kill=(--mode time --workload gpt2 --devices "$d" "${extra[@]}" --steps 1000 --warmup 0 --kill-rank 1 --kill-at-step 5
    --timeout-s 30)
  expect=tests/dist/expect_failure.sh
  $expect 60 "local rank 1 .*killed by signal 9" -- $bench "${kill[@]}" >"$OUT_DIR/fault-launch.log" 2>&1 ||
    { failed=1; tail -5 "$OUT_DIR/fault-launch.log"; }
  say "fault, fabric.launch(), $d GPUs: $(grep -E "^expect_failure:|stopping" "$OUT_DIR/fault-launch.log" | tr '\n' ' ')"
  if [ -x $BUILD/tools/fabric_run/fabric-run ]; then
    $expect 60 "local rank 1 .*killed by signal 9" -- $BUILD/tools/fabric_run/fabric-run --devices "$d" -- \
      $bench "${kill[@]}" >"$OUT_DIR/fault-fabric-run.log" 2>&1 || failed=1
    say "fault, fabric-run, $d GPUs: $(grep -E "^expect_failure:|stopping" "$OUT_DIR/fault-fabric-run.log" | tr '\n' ' ')"
  fi
  if command -v torchrun >/dev/null; then
    # NOTE: Debian's torchrun (the CPU dry run) crashes with its default output settings.
    [ "$DEVICE" = cpu ] && tr_extra=(--redirects 1 --tee 1 --log_dir "$OUT_DIR/torchrun") || tr_extra=()
    $expect 60 "(SIGKILL|Signal 9|exitcode *: *-9)" -- torchrun --standalone --nproc_per_node "$d" "${tr_extra[@]}" --no_python \
      $bench "${kill[@]}" >"$OUT_DIR/fault-torchrun.log" 2>&1 || failed=1
    say "fault, torchrun, $d GPUs: $(grep -E "^expect_failure:|SIGKILL|Signal 9" "$OUT_DIR/fault-torchrun.log" | head -3 | tr '\n' ' ')"
  fi
fi
if [[ " $steps " == *" worker "* ]]; then
  worker=$BUILD/tests/dist/fabric_ddp_worker
  mkdir -p "$OUT_DIR/save"
  for d in $counts; do
    for s in "train" "train --grad-as-view --comm-hook bf16" "train --static-graph" "train --find-unused" \
      "train --accumulate 3" "collectives" "sampler" "mismatch" "save --dir $OUT_DIR/save"; do
      [ "$DEVICE" = cuda ] && on=--cuda || on=""
      $worker $s --devices "$d" $on >"$OUT_DIR/worker.log" 2>&1
      code=$?
      [ "$code" = 0 ] || failed=1
      say "ddp_worker $s --devices $d $on: exit $code | $(grep -E "ok|FAILED|error" "$OUT_DIR/worker.log" | head -2 | cut -c1-220 | tr '\n' ' ')"
    done
    if command -v torchrun >/dev/null && [ "$DEVICE" = cuda ]; then
      torchrun --standalone --nproc_per_node "$d" --no_python $worker train --devices "$d" --cuda --external \
        >"$OUT_DIR/worker-torchrun.log" 2>&1
      code=$?
      [ "$code" = 0 ] || failed=1
      say "torchrun ddp_worker train --devices $d --cuda: exit $code | $(grep -E "ok|FAILED|error" "$OUT_DIR/worker-torchrun.log" | head -2 | cut -c1-220 | tr '\n' ' ')"
    fi
  done
fi

if [ "$failed" = 0 ]; then say "done: every check passed"; else say "done: something FAILED (see above and $OUT_DIR)"; fi
exit $failed
