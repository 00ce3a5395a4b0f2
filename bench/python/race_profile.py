#!/usr/bin/env python3
"""Summarises the Kineto traces of `bench_race --profile PREFIX` (bench/race.sh with RACE_PROFILE=1).

bench_race writes, per workload, one chrome trace of 5 steps of the hand-written loop with fabric's fused
step (PREFIX-<workload>-<precision>-libtorch-fused.json) and one of 5 steps of fabric's loop
(...-fabric.json). This prints, per pair: the CUDA kernels per step (count and GPU time), the CUDA runtime
calls per step (launches, copies, synchronisations), the operators per step, every operator or kernel
whose count per step differs between the two loops (where fabric's step does other work than the raw loop),
and each loop's 30 costliest kernels per step.

    python3 bench/python/race_profile.py build-race/race-out/trace-*.json
"""

import collections
import json
import os
import re
import sys

STEPS = 5  # bench_race profiles 5 steps of each loop
TOP = 30  # kernels listed per loop


def load(path):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = collections.defaultdict(lambda: collections.Counter())
    dur = collections.defaultdict(lambda: collections.Counter())
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        out[cat][e.get("name", "?")] += 1
        dur[cat][e.get("name", "?")] += float(e.get("dur", 0))
    return out, dur


def per_step(counter):
    return sum(counter.values()) / STEPS


def main(paths):
    pairs = collections.defaultdict(dict)
    for p in paths:
        m = re.match(r"(.*)-(libtorch-fused|fabric)\.json$", os.path.basename(p))
        if m:
            pairs[m.group(1)][m.group(2)] = p
    if not pairs:
        print("race_profile.py: expected traces named PREFIX-<workload>-<precision>-(libtorch-fused|fabric).json")
        return 1
    for name, pair in sorted(pairs.items()):
        print(f"\n{name}: per step (5 steps traced)")
        loaded = {k: load(v) for k, v in pair.items()}
        cats = sorted({c for counts, _ in loaded.values() for c in counts})
        print(f"  {'category':<22} " + " ".join(f"{k:>26}" for k in ("libtorch-fused", "fabric")))
        for c in cats:
            cells = []
            for k in ("libtorch-fused", "fabric"):
                if k not in loaded:
                    cells.append(f"{'—':>26}")
                    continue
                counts, durs = loaded[k]
                cells.append(f"{per_step(counts[c]):9.1f} x {sum(durs[c].values()) / STEPS:10.1f} us")
            print(f"  {c:<22} " + " ".join(cells))
        if len(loaded) == 2:
            (ca, da), (cb, db) = loaded["libtorch-fused"], loaded["fabric"]
            diffs = []
            for c in cats:
                for n in set(ca[c]) | set(cb[c]):
                    if ca[c][n] != cb[c][n]:
                        diffs.append((c, n, ca[c][n] / STEPS, cb[c][n] / STEPS, (db[c][n] - da[c][n]) / STEPS))
            print("  differing counts per step (category, name: libtorch-fused -> fabric, time difference):"
                  if diffs else "  the same operators, kernels and runtime calls in both loops")
            for c, n, a, b, d in sorted(diffs, key=lambda t: -abs(t[4]))[:40]:
                print(f"    {c:<14} {n[:70]:<70} {a:6.1f} -> {b:6.1f}  {d:+9.1f} us")
            # The host time of the operators both loops run, largest differences first.
            host = []
            for n in set(da["cpu_op"]) & set(db["cpu_op"]):
                host.append((n, da["cpu_op"][n] / STEPS, db["cpu_op"][n] / STEPS))
            host.sort(key=lambda t: -abs(t[2] - t[1]))
            print("  operators' host time per step (inclusive), largest differences:")
            for n, a, b in host[:12]:
                print(f"    {n[:60]:<60} {a:9.1f} -> {b:9.1f} us  {b - a:+8.1f}")
        # Each loop's kernels by GPU time per step: the breakdown of where its step's time goes.
        for k, (counts, durs) in loaded.items():
            kernels = durs["kernel"]
            print(f"  {k}: kernels by GPU time per step ({sum(kernels.values()) / STEPS:.1f} us in all)")
            print(f"    {'us/step':>9} {'n/step':>7}  kernel")
            for n, d in kernels.most_common(TOP):
                print(f"    {d / STEPS:9.1f} {counts['kernel'][n] / STEPS:7.1f}  {n[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
