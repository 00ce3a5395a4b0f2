#!/usr/bin/env python3
"""The FSDP tables of bench/multi_gpu.sh, from the JSON files its steps write under OUT.

    multi_gpu_tables.py fsdp-check OUT     # FSDP (and DDP) against one device on the same global batches
    multi_gpu_tables.py fsdp-time OUT      # fabric's FSDP against Lightning's FSDPStrategy: ms/step, memory
    multi_gpu_tables.py fsdp-largest OUT   # the largest GPT-2 that trains at batch 8 x 1024 per GPU

Each prints a Markdown table and merges it into OUT/multi_gpu.json under the step's name (the DDP
tables of the time step stay as they are).
"""

import glob
import json
import os
import re
import sys

NA = "n/a"


def load(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        data["_file"] = os.path.basename(path)
        out.append(data)
    return out


def merge(out, key, value):
    path = os.path.join(out, "multi_gpu.json")
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc[key] = value
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def gib(b):
    return f"{b / 2**30:.2f}" if b else NA


def fsdp_check(out):
    lines = ["| workload | GPUs | strategy | max abs diff (tolerance) | relative drift (tolerance) | ranks agree | ok |",
             "| --- | ---: | --- | ---: | ---: | --- | --- |"]
    rows = []
    for r in load(os.path.join(out, "fsdp-check-*.json")) + load(os.path.join(out, "check-*.json")):
        m = re.match(r"(fsdp-)?check-(\S+?)-(\d+)\.json", r["_file"])
        if not m or "nondet" in r["_file"]:
            continue
        strategy = "DDP" if r.get("strategy") == "ddp" else f"FSDP {r.get('sharding')}" + (
            " + activation checkpointing" if r.get("activation_checkpointing") else "")
        name = f"{r['workload']} {r['precision']}" + (f" ({r['n_layer']}x{r['n_embd']})" if r.get("n_layer") else "")
        rows.append((name, r["devices"], strategy != "DDP", strategy,
                     f"| {name} | {r['devices']} | {strategy} | {r['max_abs_diff']:.3g} ({r.get('abs_tolerance', NA)}) | "
                     f"{r['relative_drift']:.3g} ({r['tolerance']:g}) | {'yes' if r['ranks_agree'] else 'NO'} | "
                     f"{'ok' if r['ok'] else 'FAILED'} |"))
    lines += [row[-1] for row in sorted(rows)]
    print("FSDP and DDP against one device on the same global batches (DDP equals one device, so FSDP is checked "
          "against DDP); parameters after the last step")
    print("\n".join(lines))
    merge(out, "fsdp_check", lines)


def fsdp_time(out):
    runs = {}  # (devices, sharding, ckpt, who) -> rounds
    counted = {}  # the same keys -> parameters, of the runs that only counted them
    for r in load(os.path.join(out, "fsdp-time-*.json")):
        m = re.match(r"fsdp-time-(\w+)-(off|on)-(\d+)-r(\d+)-(fabric|lightning)(\S*)\.json", r["_file"])
        if not m:
            continue
        who = m.group(5) + (" " + m.group(6).strip("_").replace("_", " ") if m.group(6) else "")
        if "ms_median" not in r:  # Lightning missing: fsdp_race.py wrote the model's parameter count only
            counted[(int(m.group(3)), m.group(1), m.group(2), who)] = r.get("params")
            continue
        runs.setdefault((int(m.group(3)), m.group(1), m.group(2), who), []).append(r)

    def pick(key):
        rs = sorted(runs.get(key, []), key=lambda r: r["ms_median"])
        return (rs[(len(rs) - 1) // 2], [r["ms_median"] for r in runs[key]]) if rs else (None, [])

    def ms(r, all_ms):
        if not r:
            return NA
        return f"{r['ms_median']:.2f}" + (f" ({' / '.join(f'{m:.2f}' for m in all_ms)})" if len(all_ms) > 1 else "")

    lines = ["| GPUs | sharding | activation checkpointing | fabric ms/step | Lightning ms/step | fabric/Lightning "
             "(target <= 0.85) | fabric tok/s per GPU | peak GiB per GPU fabric / Lightning (largest rank) | "
             "parameters fabric / Lightning |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    variants = []
    for d, sh, ck, who in sorted(runs):
        if who != "fabric":
            continue
        f, fms = pick((d, sh, ck, "fabric"))
        lr, lms = pick((d, sh, ck, "lightning"))
        ratio = f"{f['ms_median'] / lr['ms_median']:.3f}" if f and lr else NA
        lp = lr["params"] if lr else counted.get((d, sh, ck, "lightning"))
        params = f"{f['params']:,} / {lp:,}" if lp else f"{f['params']:,} / {NA}"
        if lp and f["params"] != lp:
            params += " DIFFER"
        elif lp:
            params += " (same)"
        lines.append(f"| {d} | {sh} | {ck} | {ms(f, fms)} | {ms(lr, lms)} | {ratio} | {f['per_s_per_device']:,.0f} | "
                     f"{gib(f.get('peak_allocated_bytes_max_rank'))} / "
                     f"{gib(lr.get('peak_allocated_bytes_max_rank')) if lr else NA} | {params} |")
        for key in sorted(k for k in runs if k[:3] == (d, sh, ck) and k[3].startswith("lightning ")):
            v, vms = pick(key)
            variants.append(f"| {d} | {sh} | {ck} | {key[3][len('lightning '):]} | {ms(v, vms)} | "
                            f"{f['ms_median'] / v['ms_median']:.3f} | {gib(v.get('peak_allocated_bytes_max_rank'))} |")
    rounds = max((len(v) for v in runs.values()), default=0)
    print(f"fabric FSDP against Lightning FSDPStrategy, GPT-2 bf16-mixed, batch 8 x 1024 per GPU, unit/wrap policy: the "
          f"Block; {rounds} round(s), median over the rounds (each round's in parentheses)")
    print("\n".join(lines))
    if variants:
        print()
        print("| GPUs | sharding | activation checkpointing | Lightning variant | ms/step | fabric/variant | "
              "peak GiB (largest rank) |")
        print("| ---: | --- | --- | --- | ---: | ---: | ---: |")
        print("\n".join(variants))
    merge(out, "fsdp_time", {"table": lines, "lightning_variants": variants,
                             "runs": [dict(r, who=k[3]) for k, rs in sorted(runs.items()) for r in rs]})


def fsdp_largest(out):
    trials = {}  # (devices, sharding, who) -> [(n_layer, outcome, result)]
    path = os.path.join(out, "fsdp-largest-trials.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                d, sh, who, n, embd, outcome = parts[:6]
                jf = os.path.join(out, f"fsdp-largest-{sh}-{who}-{d}-{n}.json")
                r = None
                if os.path.exists(jf):
                    with open(jf) as fh:
                        r = json.load(fh)
                trials.setdefault((int(d), sh, who), []).append((int(n), int(embd), outcome, r))
    lines = ["| GPUs | strategy | who | largest that trains: n_layer x n_embd (parameters, peak GiB largest rank, "
             "ms/step) | smallest that did not (why) | trials |",
             "| ---: | --- | --- | --- | --- | ---: |"]
    for (d, sh, who), ts in sorted(trials.items()):
        if all(t[2] == "skipped" for t in ts):
            lines.append(f"| {d} | {sh} | {who} | not run (Lightning is not installed) | | {len(ts)} |")
            continue
        good = [t for t in ts if t[2] == "ok"]
        bad = [t for t in ts if t[2] not in ("ok", "skipped")]
        best = max(good, key=lambda t: t[0]) if good else None
        worst = min(bad, key=lambda t: t[0]) if bad else None
        if best and best[3]:
            r = best[3]
            b = (f"{best[0]} x {best[1]} ({r['params'] / 1e9:.2f} B, {gib(r.get('peak_allocated_bytes_max_rank'))}, "
                 f"{r['ms_median']:.0f})")
        elif best:
            b = f"{best[0]} x {best[1]}"
        else:
            b = "none"
        w = f"{worst[0]} x {worst[1]} ({worst[2]})" if worst else "none tried"
        lines.append(f"| {d} | {sh} | {who} | {b} | {w} | {len(ts)} |")
    print("the largest GPT-2 (width fixed, depth searched by doubling then bisecting) that trains at batch 8 per GPU; "
          "'oom' = out of memory, 'error'/'timeout' = see the trial's log")
    print("\n".join(lines))
    merge(out, "fsdp_largest", {"table": lines, "trials": {f"{k[0]} {k[1]} {k[2]}": [t[:3] for t in v]
                                                           for k, v in sorted(trials.items())}})


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("fsdp-check", "fsdp-time", "fsdp-largest"):
        sys.exit(__doc__)
    {"fsdp-check": fsdp_check, "fsdp-time": fsdp_time, "fsdp-largest": fsdp_largest}[sys.argv[1]](sys.argv[2])
