#!/usr/bin/env bash
# fabric's DDP and FSDP on several GPUs, in one command (shared BENCH.md, last target row; bench/README.md,
# "DDP on several GPUs" and "FSDP on several GPUs"; issue 19). On a machine with N >= 2 GPUs it builds
# bench_ddp_race and fabric-run, then prints, for every device count D in 2 4 8 up to N:
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
#   fsdp-check    FSDP over D GPUs (bench_ddp_race --mode check --strategy fsdp) against one device on the
#            same global batches, which the check step shows DDP equals: every sharding strategy, with and
#            without activation checkpointing of the blocks, for mlp fp32, gpt2 tiny and gpt2 small
#            (bf16-mixed); max |FSDP - one device| of the parameters after the last step against its
#            tolerance (2 x lr x steps) and the relative drift against its (1e-3 fp32, 5e-2 bf16-mixed);
#   fsdp-time     fabric's FSDP (GPT-2 small, the Block as the unit, bf16-mixed, 8 x 1024 tokens per GPU)
#            against Python Lightning Fabric's FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=S)
#            (bench/python/fsdp_race.py) on D GPUs, for FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, without and
#            with activation checkpointing; rounds alternate the two; ms/step medians, fabric/Lightning
#            (target <= 0.85), the largest per-GPU peak memory of each, both models' parameter counts;
#   fsdp-largest  the deepest GPT-2 of width MULTI_GPU_LARGEST_EMBD (default 1600, GPT-2 XL's) that trains
#            at batch 8 x 1024 per GPU on the largest D, under each sharding strategy, fabric against
#            Lightning: n_layer doubles from MULTI_GPU_LARGEST_START (48) until a run fails, then
#            MULTI_GPU_LARGEST_BISECT (3) bisections; an out-of-memory run exits 3 and counts as "oom";
#   fsdp-faults   rank 1 of D killed with SIGKILL during FSDP training of gpt2 over NCCL, started by
#            fabric.launch(), fabric-run and torchrun: as the faults step, under FSDP; and started as D
#            independent processes with SLURM's variables (tests/dist/fake_srun.sh), where no launcher
#            stops the survivors: each must end with fabric's error naming its rank within the timeout.
#
# Usage, from the repository root on the GPU machine (carry .deps, see tools/gpu.sh):
#
#   bench/multi_gpu.sh                      # everything
#   bench/multi_gpu.sh check faults         # a subset of: build check time faults worker fsdp-check
#                                           #   fsdp-time fsdp-largest fsdp-faults
#
# One call of the GPU machine runs at most 600 s: MULTI_GPU_BUDGET_S (default 0: none) makes the script skip
# what would start after that many seconds (listed in OUT/skipped.txt), so that a call returns its tables.
#
# Environment: OUT (logs and multi_gpu.json; default build-gpu/multi-gpu), PYTHON (default python3),
# MULTI_GPU_DEVICES (the device counts, default "2 4 8" up to the GPUs present), MULTI_GPU_ROUNDS
# (timing rounds, default 1), MULTI_GPU_WORKLOADS (default "mlp-fp32 mlp-bf16-mixed gpt2"),
# MULTI_GPU_FABRIC_VARIANTS (fabric DDP options also timed on MULTI_GPU_VARIANT_WORKLOADS, default gpt2: one
# variant per word, "=" for a space; default "--grad-as-view --bucket-cap-mb=10 --bucket-cap-mb=50
# --bucket-cap-mb=100 --grad-as-view=--static-graph"; "none" for none), BUILD_DIR (default build-gpu),
# MULTI_GPU_TARGETS (what the build step builds, default "bench_ddp_race|fabric-run|fabric_ddp_worker");
# FSDP: MULTI_GPU_FSDP_DEVICES (default the device counts), MULTI_GPU_FSDP_SHARDINGS (default "full_shard
# shard_grad_op no_shard"), MULTI_GPU_FSDP_CHECK_WORKLOADS (default "mlp-fp32 gpt2-tiny gpt2"),
# MULTI_GPU_FSDP_CKPT (fsdp-time: "off on"), MULTI_GPU_LIGHTNING_FSDP_VARIANTS (fsdp-time: more
# fsdp_race.py runs, e.g. "--mixed-precision=fp32": float32 gathers and reductions as fabric's),
# MULTI_GPU_LARGEST_DEVICES (default the largest count), MULTI_GPU_LARGEST_STRATEGIES (default the
# shardings), MULTI_GPU_LARGEST_SIDES ("fabric lightning"), MULTI_GPU_LARGEST_START / _MAX (48 / 384 layers),
# MULTI_GPU_LARGEST_EMBD (1600), MULTI_GPU_LARGEST_BISECT (3), MULTI_GPU_LARGEST_GRAIN (8 layers),
# MULTI_GPU_LARGEST_TRIAL_S (300 s a trial), MULTI_GPU_LARGEST_ULIMIT_KB (ulimit -v of a trial: the CPU dry
# run's out of memory). A dry run of the script's logic on the CPU (Gloo; Lightning is skipped where missing):
#   RACE_DEVICE=cpu MULTI_GPU_GPUS=2 BUILD_DIR=build PYTHON=/usr/bin/python3 \
#     MULTI_GPU_ARGS="--gpt2-config tiny --steps 3 --warmup 1" bench/multi_gpu.sh check time faults
# and for the FSDP steps (a tiny family, and ulimit -v for an out-of-memory error of the host's allocator):
#   RACE_DEVICE=cpu MULTI_GPU_GPUS=2 BUILD_DIR=build PYTHON=/usr/bin/python3 MULTI_GPU_ARGS="--gpt2-config tiny \
#     --steps 1 --warmup 0" MULTI_GPU_LARGEST_EMBD=512 MULTI_GPU_LARGEST_START=2 MULTI_GPU_LARGEST_MAX=64 \
#     MULTI_GPU_LARGEST_GRAIN=2 MULTI_GPU_LARGEST_ULIMIT_KB=2500000 bench/multi_gpu.sh fsdp-check fsdp-time \
#     fsdp-largest fsdp-faults     (on 2 cores about 8 minutes; it found 40 layers under full_shard there)
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${*:-build check time faults worker fsdp-check fsdp-time fsdp-largest fsdp-faults}
OUT_DIR=${OUT:-build-gpu/multi-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off, in every process the launchers start too
start=$(date +%s)
say() { echo "multi_gpu.sh [$(($(date +%s) - start)) s]: $*"; }
budget=${MULTI_GPU_BUDGET_S:-0}
: >"$OUT_DIR/skipped.txt"
# Whether there is time left to start $*; says and records what is skipped.
in_budget() {
  [ "$budget" = 0 ] || [ $(($(date +%s) - start)) -lt "$budget" ] && return 0
  echo "$*" >>"$OUT_DIR/skipped.txt"
  say "budget of $budget s spent: skipping $*"
  return 1
}

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
  FABRIC_DIST_WORKER_PCH=OFF FABRIC_GPU_TARGETS=${MULTI_GPU_TARGETS:-bench_ddp_race|fabric-run|fabric_ddp_worker} OUT="$OUT_DIR" \
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
  read -r -a variants <<<"${MULTI_GPU_FABRIC_VARIANTS:---grad-as-view --bucket-cap-mb=10 --bucket-cap-mb=50 --bucket-cap-mb=100 --grad-as-view=--static-graph}"
  [ "${variants[*]}" = none ] && variants=()
  for r in $(seq 1 "${MULTI_GPU_ROUNDS:-1}"); do
    for w in ${MULTI_GPU_WORKLOADS:-mlp-fp32 mlp-bf16-mixed gpt2}; do
      for d in 1 $counts; do
        f="$OUT_DIR/time-fabric-$w-$d-r$r"
        $bench --mode time --workload "$w" --devices "$d" "${extra[@]}" --json "$f.json" >"$f.log" 2>&1 ||
          { failed=1; tail -3 "$f.log"; }
        grep -E "^  (mlp|gpt2)|error" "$f.log" | sed "s/^/fabric    /"
        f="$OUT_DIR/time-lightning-$w-$d-r$r"
        # (--rounds 1: this script alternates the rounds itself)
        $PY bench/python/race.py --device "$DEVICE" --competitors lightning --devices "$d" --rounds 1 --workload "$w" \
          "${extra[@]}" --json "$f.json" >"$f.log" 2>&1 || { failed=1; tail -3 "$f.log"; }
        grep -E "^  (mlp|gpt2)|Error" "$f.log" | sed "s/^/lightning /"
        # fabric's DDP options (MULTI_GPU_FABRIC_VARIANTS="--grad-as-view --bucket-cap-mb=100": one
        # variant per word, = for a space), on more than one GPU.
        [ "$d" -gt 1 ] || continue
        [[ " ${MULTI_GPU_VARIANT_WORKLOADS:-gpt2} " == *" $w "* ]] || continue
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
        if r.get("skipped") or "ms_median" not in r:
            continue
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
best = {}  # (workload, precision, devices) -> [(variant / defaults, variant)]
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
        if f:
            best.setdefault((w, p, d), []).append((v["ms_median"] / f["ms_median"], who[len("fabric "):]))
rounds = max((len(v) for v in runs.values()), default=0)
print(f"{rounds} round(s); ms/step is the median over the rounds (each round's in parentheses)")
print("\n".join(lines))
if len(variant_lines) > 2:
    print()
    print("\n".join(variant_lines))
    # What a change of DDP's defaults would rest on: the fastest variant per device count.
    for (w, p, d), vs in sorted(best.items()):
        ratio, v = min(vs)
        print(f"{w} {p} on {d} GPUs: fastest fabric DDP options {v}: {ratio:.3f} of the defaults' step"
              + (" (less than 1 % apart: keep the defaults)" if ratio > 0.99 else ""))
path = os.path.join(out, "multi_gpu.json")
doc = json.load(open(path)) if os.path.exists(path) else {}  # the FSDP steps' tables stay
doc.update({"table": lines, "variants": variant_lines[2:],
            "runs": [dict(r, who=k[3]) for k, rs in sorted(runs.items()) for r in rs]})
with open(path, "w") as fh:
    json.dump(doc, fh, indent=2)
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

fsdp_counts=${MULTI_GPU_FSDP_DEVICES:-$counts}
read -r -a shardings <<<"${MULTI_GPU_FSDP_SHARDINGS:-full_shard shard_grad_op no_shard}"
if [[ " $steps " == *" fsdp-check "* ]]; then
  for d in $fsdp_counts; do
    for w in ${MULTI_GPU_FSDP_CHECK_WORKLOADS:-mlp-fp32 gpt2-tiny gpt2}; do
      case $w in
        gpt2-tiny) args=(--workload gpt2 --gpt2-config tiny --steps 10) ;;
        gpt2) args=(--workload gpt2 --steps 10) ;;
        *) args=(--workload "$w" --steps 20) ;;
      esac
      ckpts=(off)
      [[ $w == gpt2* ]] && ckpts=(off on)
      for sh in "${shardings[@]}"; do
        for ck in "${ckpts[@]}"; do
          name=fsdp-check-$w-$sh$([ "$ck" = on ] && echo -ckpt)-$d
          in_budget "$name" || continue
          $bench --mode check "${args[@]}" --strategy fsdp --sharding "$sh" $([ "$ck" = on ] && echo --checkpointing) \
            --devices "$d" "${extra[@]}" --json "$OUT_DIR/$name.json" >"$OUT_DIR/$name.log" 2>&1 || failed=1
          grep -E "^  (ok|FAILED)|error" "$OUT_DIR/$name.log" || { tail -5 "$OUT_DIR/$name.log"; failed=1; }
        done
      done
    done
  done
  $PY bench/python/multi_gpu_tables.py fsdp-check "$OUT_DIR"
fi

if [[ " $steps " == *" fsdp-time "* ]]; then
  # Rounds alternate fabric and Lightning (which goes first flips each round); the table takes the medians.
  read -r -a lvariants <<<"${MULTI_GPU_LIGHTNING_FSDP_VARIANTS:-}"
  for r in $(seq 1 "${MULTI_GPU_ROUNDS:-1}"); do
    for d in $fsdp_counts; do
      for sh in "${shardings[@]}"; do
        for ck in ${MULTI_GPU_FSDP_CKPT:-off on}; do
          base=$OUT_DIR/fsdp-time-$sh-$ck-$d-r$r
          in_budget "$(basename "$base")" || continue
          flag=()
          [ "$ck" = on ] && flag=(--checkpointing)
          fabric_run() {
            $bench --mode time --workload gpt2 --strategy fsdp --sharding "$sh" "${flag[@]}" --devices "$d" "${extra[@]}" \
              --json "$base-fabric.json" >"$base-fabric.log" 2>&1 || { failed=1; tail -3 "$base-fabric.log"; }
            grep -E "^  gpt2|error" "$base-fabric.log" | sed "s/^/fabric    /"
          }
          lightning_run() {  # $1: the variant's file suffix, then its flags
            local suffix=$1
            shift
            $PY bench/python/fsdp_race.py --device "$DEVICE" --devices "$d" --sharding "$sh" "${flag[@]}" "${extra[@]}" "$@" \
              --json "$base-lightning$suffix.json" >"$base-lightning$suffix.log" 2>&1 ||
              { failed=1; tail -3 "$base-lightning$suffix.log"; }
            grep -E "^  gpt2|parameters|Error|skipping" "$base-lightning$suffix.log" | sed "s/^/lightning$suffix /"
          }
          if [ $((r % 2)) = 1 ]; then fabric_run; lightning_run ""; else lightning_run ""; fabric_run; fi
          for v in "${lvariants[@]}"; do
            # shellcheck disable=SC2086 # the variant's words are flags
            lightning_run "${v//[ =]/_}" ${v//=/ }
          done
        done
      done
    done
  done
  $PY bench/python/multi_gpu_tables.py fsdp-time "$OUT_DIR"
fi

if [[ " $steps " == *" fsdp-largest "* ]]; then
  ld=${MULTI_GPU_LARGEST_DEVICES:-$(echo $counts | awk '{print $NF}')}
  embd=${MULTI_GPU_LARGEST_EMBD:-1600}
  grain=${MULTI_GPU_LARGEST_GRAIN:-8}
  trials=$OUT_DIR/fsdp-largest-trials.txt
  : >"$trials"
  # One training run of n_layer $3 blocks under sharding $1 by $2 (fabric or lightning); prints ok, oom, timeout
  # or error, and records it.
  trial() {
    local sh=$1 who=$2 n=$3 f code outcome
    f=$OUT_DIR/fsdp-largest-$sh-$who-$ld-$n
    local args=(--workload gpt2 --devices "$ld" --n-layer "$n" --n-embd "$embd" --batch 8 --steps 2 --warmup 1
      --timeout-s 120 "${extra[@]}" --json "$f.json")
    (
      [ -n "${MULTI_GPU_LARGEST_ULIMIT_KB:-}" ] && ulimit -v "$MULTI_GPU_LARGEST_ULIMIT_KB"
      if [ "$who" = fabric ]; then
        exec timeout -k 10 "${MULTI_GPU_LARGEST_TRIAL_S:-300}" $bench --mode time --strategy fsdp --sharding "$sh" "${args[@]}"
      else
        exec timeout -k 10 "${MULTI_GPU_LARGEST_TRIAL_S:-300}" $PY bench/python/fsdp_race.py --device "$DEVICE" \
          --sharding "$sh" "${args[@]}"
      fi
    ) >"$f.log" 2>&1
    code=$?
    if [ $code = 0 ] && [ -s "$f.json" ] && grep -q ms_median "$f.json"; then
      outcome=ok
    elif [ $code = 0 ]; then
      outcome=skipped  # Lightning missing
    elif grep -q "out of memory" "$f.log"; then
      outcome=oom
    elif [ $code = 124 ] || [ $code = 137 ]; then
      outcome=timeout
    else
      outcome=error
    fi
    echo "$ld $sh $who $n $embd $outcome $code" >>"$trials"
    say "fsdp-largest $who $sh $ld GPUs n_layer $n x $embd: $outcome (exit $code)$(grep -hE "^  gpt2" "$f.log" |
      sed -E 's/ +/ /g' | cut -c1-150 | sed 's/^/ |/')" >&2
    [ "$outcome" = error ] && tail -3 "$f.log" >&2
    echo "$outcome"
  }
  for sh in ${MULTI_GPU_LARGEST_STRATEGIES:-${shardings[*]}}; do
    for who in ${MULTI_GPU_LARGEST_SIDES:-fabric lightning}; do
      good=0 bad=0 n=${MULTI_GPU_LARGEST_START:-48} outcome=""
      while [ "$n" -le "${MULTI_GPU_LARGEST_MAX:-384}" ]; do
        in_budget "fsdp-largest $who $sh n_layer $n" || { outcome=budget; break; }
        outcome=$(trial "$sh" "$who" "$n")
        [ "$outcome" = error ] && failed=1
        [ "$outcome" = ok ] || break
        good=$n
        n=$((n * 2))
      done
      [ "$outcome" = ok ] || [ "$outcome" = skipped ] || [ "$outcome" = budget ] || bad=$n
      for _ in $(seq 1 "${MULTI_GPU_LARGEST_BISECT:-3}"); do
        [ "$bad" -gt 0 ] && [ $((bad - good)) -gt "$grain" ] || break
        mid=$(((good + bad) / 2 / grain * grain))
        [ "$mid" -gt "$good" ] || break
        in_budget "fsdp-largest $who $sh n_layer $mid" || break
        outcome=$(trial "$sh" "$who" "$mid")
        [ "$outcome" = error ] && failed=1
        if [ "$outcome" = ok ]; then good=$mid; else bad=$mid; fi
      done
      if [ "$outcome" = skipped ]; then
        say "fsdp-largest $who $sh on $ld GPUs: not run (Lightning is not installed)"
      else
        say "fsdp-largest $who $sh on $ld GPUs: largest that trains n_layer $good x $embd (0: none);" \
          "smallest that did not: $bad (0: none up to ${MULTI_GPU_LARGEST_MAX:-384})"
      fi
    done
  done
  $PY bench/python/multi_gpu_tables.py fsdp-largest "$OUT_DIR"
fi

if [[ " $steps " == *" fsdp-faults "* ]]; then
  d=$(echo $fsdp_counts | awk '{print $NF}')
  kill=(--mode time --strategy fsdp --workload gpt2 --devices "$d" "${extra[@]}" --steps 1000 --warmup 0 --kill-rank 1
    --kill-at-step 5 --timeout-s 30)
  expect=tests/dist/expect_failure.sh
  if in_budget "fsdp-faults"; then
    $expect 60 "local rank 1 .*killed by signal 9" -- $bench "${kill[@]}" >"$OUT_DIR/fsdp-fault-launch.log" 2>&1 ||
      { failed=1; tail -5 "$OUT_DIR/fsdp-fault-launch.log"; }
    say "FSDP fault, fabric.launch(), $d GPUs: $(grep -E "^expect_failure:|stopping" "$OUT_DIR/fsdp-fault-launch.log" | tr '\n' ' ')"
    if [ -x $BUILD/tools/fabric_run/fabric-run ]; then
      $expect 60 "local rank 1 .*killed by signal 9" -- $BUILD/tools/fabric_run/fabric-run --devices "$d" -- \
        $bench "${kill[@]}" >"$OUT_DIR/fsdp-fault-fabric-run.log" 2>&1 || failed=1
      say "FSDP fault, fabric-run, $d GPUs: $(grep -E "^expect_failure:|stopping" "$OUT_DIR/fsdp-fault-fabric-run.log" | tr '\n' ' ')"
    fi
    # Independent processes (as srun starts them: no launcher stops the others): the survivors' next
    # collective fails and each ends with fabric's error naming its rank, within --timeout-s.
    $expect 60 "bench_ddp_race: .*failed on rank" -- tests/dist/fake_srun.sh "$d" $bench "${kill[@]}" \
      >"$OUT_DIR/fsdp-fault-srun.log" 2>&1 || { failed=1; tail -5 "$OUT_DIR/fsdp-fault-srun.log"; }
    say "FSDP fault, $d independent processes (SLURM variables): $(grep -E "^expect_failure:|failed on rank" \
      "$OUT_DIR/fsdp-fault-srun.log" | cut -c1-200 | tr '\n' ' ')"
    if command -v torchrun >/dev/null; then
      # The other ranks must end too: with torchrun the survivors' next collective fails within --timeout-s,
      # or torchrun stops them; either way within the expect's 60 s and with no process left.
      [ "$DEVICE" = cpu ] && tr_extra=(--redirects 1 --tee 1 --log_dir "$OUT_DIR/torchrun-fsdp") || tr_extra=()
      $expect 60 "(SIGKILL|Signal 9|exitcode *: *-9)" -- torchrun --standalone --nproc_per_node "$d" "${tr_extra[@]}" --no_python \
        $bench "${kill[@]}" >"$OUT_DIR/fsdp-fault-torchrun.log" 2>&1 || failed=1
      say "FSDP fault, torchrun, $d GPUs: $(grep -E "^expect_failure:|SIGKILL|Signal 9" "$OUT_DIR/fsdp-fault-torchrun.log" | head -3 | tr '\n' ' ')"
    fi
  fi
fi

[ -s "$OUT_DIR/skipped.txt" ] && say "skipped for the budget: $(tr '\n' ';' <"$OUT_DIR/skipped.txt")"
if [ "$failed" = 0 ]; then say "done: every check passed"; else say "done: something FAILED (see above and $OUT_DIR)"; fi
exit $failed
