#!/usr/bin/env python3
"""The Python side of the race of bench/race.sh.

Trains the reference workloads of shared BENCH.md (mlp in fp32 and bf16-mixed, GPT-2 small in
bf16-mixed) in two ways, one after the other in one process, with the same models, protocol and
output as bench_race (bench/race.cpp):

  pytorch    a raw PyTorch loop: torch.autocast for bf16-mixed, loss.backward(),
             torch.optim.AdamW (the default: foreach on CUDA), zero_grad();
  lightning  Python Lightning Fabric: Fabric(accelerator="cuda", devices=1, precision=...),
             fabric.setup(model, optimizer), fabric.backward(loss), optimizer.step(),
             optimizer.zero_grad().

With --devices N > 1 only the lightning competitor runs, as Fabric(devices=N, strategy="ddp"), on one
workload: fabric.launch() starts N - 1 more processes running this script, each with its own batch of
the workload's size (global batch N times that), as bench_ddp_race (bench/ddp_race.cpp) does for
bench/multi_gpu.sh. Rank 0 reports its median and the slowest rank's.

Each loop builds its own model from the same seed, warms up, then times each step with CUDA events
(time.perf_counter on the CPU); the median is reported, with peak GPU memory from
torch.cuda.max_memory_allocated / max_memory_reserved since the loop was built.

    python3 bench/python/race.py --json race-python.json
    python3 bench/python/race.py --device cpu --workload mlp --steps 3 --warmup 1

Where Lightning is not installed, the lightning competitor is skipped with a message.
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # Lightning 2.x ships Fabric as lightning.fabric; the standalone package is lightning_fabric.
    from lightning.fabric import Fabric
except ImportError:
    try:
        from lightning_fabric import Fabric
    except ImportError:
        Fabric = None


# ---- the models (the same as bench/race.cpp and examples/gpt2/gpt2.hpp) -------------------------


class Mlp(nn.Module):
    """Linear 784->1024, ReLU, Linear 1024->1024, ReLU, Linear 1024->10."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.fc3 = nn.Linear(1024, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GPTConfig:
    def __init__(self, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304):
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_size, self.vocab_size = block_size, vocab_size

    @staticmethod
    def tiny():
        return GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256)


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:  # torch 1.13: the same attention spelled out
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            y = att.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: the head is the token embedding's weight (F.linear(x, wte.weight)), one Parameter."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        residual_std = 0.02 / math.sqrt(2 * c.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(0.0, residual_std)
                elif p.dim() >= 2:
                    p.normal_(0.0, 0.02)
                elif name.endswith(".bias"):
                    p.zero_()

    def forward(self, idx):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def gpt2_loss(logits, y):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))


def mlp_loss(logits, y):
    return F.cross_entropy(logits, y)


# ---- timing and memory ---------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()  # the previous competitor's objects, cycles included
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return 0, 0


def time_steps(device, w, step, barrier=None):
    """Warm-up, then timed steps; returns (ms per step, wall mean ms, last loss)."""
    loss = None
    for _ in range(w["warmup"]):
        loss = step()
    synchronize(device)
    if barrier is not None:
        barrier()
    cuda = device.type == "cuda"
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(w["steps"])]
    cpu_ms = []
    start = time.perf_counter()
    for i in range(w["steps"]):
        if cuda:
            events[i][0].record()
        else:
            t0 = time.perf_counter()
        loss = step()
        if cuda:
            events[i][1].record()
        else:
            cpu_ms.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    wall = (time.perf_counter() - start) * 1e3 / w["steps"]
    ms = [a.elapsed_time(b) for a, b in events] if cuda else cpu_ms
    return ms, wall, loss.item()


def build(w):
    torch.manual_seed(0)
    return GPT(w["gpt2"]) if w["name"] == "gpt2" else Mlp()


def make_optimizer(w, params):
    return torch.optim.AdamW(params, lr=w["lr"], weight_decay=w["weight_decay"])


def optimizer_kernels(optimizer, device):
    foreach = optimizer.defaults.get("foreach")
    fused = optimizer.defaults.get("fused")
    if fused:
        return "fused"
    if foreach or (foreach is None and device.type == "cuda"):
        return "foreach"
    return "own"


def run_pytorch(device, w):
    reset_memory(device)
    net = build(w).to(device)
    optimizer = make_optimizer(w, net.parameters())
    loss_fn = gpt2_loss if w["name"] == "gpt2" else mlp_loss
    x, y = w["x"], w["y"]

    def step():
        if w["bf16"]:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = loss_fn(net(x), y)
        else:
            loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    ms, wall, last = time_steps(device, w, step)
    synchronize(device)
    params = sum(p.numel() for p in net.parameters())
    result = dict(competitor="pytorch", ms=ms, wall=wall, last_loss=last, params=params,
                  kernels=optimizer_kernels(optimizer, device))
    result["peak_allocated"], result["peak_reserved"] = peak_memory(device)
    del net, optimizer
    return result


def run_lightning(device, w, devices=1):
    if devices == 1:  # with DDP, only after launch: the device of a rank is known then
        reset_memory(device)
    fabric = Fabric(accelerator=device.type, devices=devices, strategy="ddp" if devices > 1 else "auto",
                    precision=w["precision"])
    fabric.launch()
    if devices > 1:
        device = fabric.device
        reset_memory(device)
    net = build(w)
    optimizer = make_optimizer(w, net.parameters())
    model, optimizer = fabric.setup(net, optimizer)
    if fabric.device.type != device.type:
        raise RuntimeError(f"Lightning Fabric chose {fabric.device}, expected {device}")
    loss_fn = gpt2_loss if w["name"] == "gpt2" else mlp_loss
    x, y = w["x"].to(device), w["y"].to(device)

    def step():
        loss = loss_fn(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss

    ms, wall, last = time_steps(device, w, step, barrier=fabric.barrier if devices > 1 else None)
    synchronize(device)
    params = sum(p.numel() for p in net.parameters())
    result = dict(competitor="lightning", ms=ms, wall=wall, last_loss=last, params=params,
                  kernels=optimizer_kernels(getattr(optimizer, "optimizer", optimizer), device),
                  rank=fabric.global_rank, world=fabric.world_size)
    result["peak_allocated"], result["peak_reserved"] = peak_memory(device)
    if devices > 1:
        med = torch.tensor(statistics.median(ms), device=device)
        result["slowest"] = fabric.all_reduce(med, reduce_op="max").item()
        result["last_loss"] = fabric.all_reduce(torch.tensor(last, device=device), reduce_op="mean").item()
    del model, optimizer, net, fabric
    return result


# ---- the command line ----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--workload", action="append",
                   choices=["all", "mlp", "mlp-fp32", "mlp-bf16-mixed", "gpt2", "gpt2-bf16-mixed"],
                   help="repeatable (default all)")
    p.add_argument("--competitors", help="comma-separated subset of pytorch,lightning (default both; lightning "
                   "with --devices > 1)")
    p.add_argument("--devices", type=int, default=1, help="GPUs; more than 1 runs Lightning Fabric's DDP")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: mlp 300, gpt2 30)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (default: mlp 50, gpt2 10)")
    p.add_argument("--gpt2-config", choices=["small", "tiny"], default="small")
    p.add_argument("--gpt2-batch", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--json", help="write the results to this path as JSON")
    args = p.parse_args(argv)
    workloads = []
    for w in args.workload or ["all"]:
        if w == "all":
            workloads += ["mlp-fp32", "mlp-bf16-mixed", "gpt2-bf16-mixed"]
        elif w == "mlp":
            workloads += ["mlp-fp32", "mlp-bf16-mixed"]
        elif w == "gpt2":
            workloads.append("gpt2-bf16-mixed")
        else:
            workloads.append(w)
    args.workloads = workloads
    default = "lightning" if args.devices > 1 else "pytorch,lightning"
    args.competitor_list = [c for c in (args.competitors or default).split(",") if c]
    for c in args.competitor_list:
        if c not in ("pytorch", "lightning"):
            p.error(f"expected pytorch or lightning in --competitors, found {c!r}")
    if args.devices < 1:
        p.error(f"expected --devices >= 1, found {args.devices}")
    if args.devices > 1 and args.competitor_list != ["lightning"]:
        p.error(f"--devices {args.devices} runs only the lightning competitor (Fabric's DDP); "
                f"found --competitors {args.competitors}")
    if args.devices > 1 and len(workloads) != 1:
        p.error(f"--devices {args.devices} runs one workload (each launch starts the processes); "
                f"found {', '.join(workloads)}")
    return args


def main(argv):
    args = parse_args(argv)
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        sys.exit("race.py: --device cuda: no GPU is visible")
    device = torch.device("cuda", 0) if args.device == "cuda" or (args.device == "auto" and has_cuda) else torch.device("cpu")
    if args.devices > 1:
        # Every process runs this script; the batch is made on the CPU and moved to each rank's device.
        device = torch.device(device.type)
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0"
    competitors = list(args.competitor_list)
    skipped = []
    if "lightning" in competitors and Fabric is None:
        print("race.py: Lightning is not installed (no lightning.fabric or lightning_fabric): "
              "skipping the lightning competitor", file=sys.stderr)
        competitors.remove("lightning")
        skipped.append("lightning")
    config = GPTConfig.tiny() if args.gpt2_config == "tiny" else GPTConfig()
    version = getattr(sys.modules.get("lightning"), "__version__", None) or getattr(
        sys.modules.get("lightning_fabric"), "__version__", None)
    if rank_zero:
        print(f"race.py on {device}{f' x {args.devices} (DDP)' if args.devices > 1 else ''} (torch {torch.__version__}, "
              f"Lightning {version or 'missing'})"
              + ("" if device.type == "cuda" else " -- CPU times are for checking, not for the race"), flush=True)
    out = dict(device=str(device), torch=torch.__version__, lightning=version, peak_tflops=args.peak_tflops,
               skipped=skipped, results=[])
    for name in args.workloads:
        gpt = name.startswith("gpt2")
        bf16 = "bf16" in name
        w = dict(name="gpt2" if gpt else "mlp", bf16=bf16, precision="bf16-mixed" if bf16 else "32-true",
                 steps=args.steps if args.steps > 0 else (30 if gpt else 300),
                 warmup=args.warmup if args.warmup >= 0 else (10 if gpt else 50))
        torch.manual_seed(1)
        if gpt:
            w.update(gpt2=config, lr=6e-4, weight_decay=0.1, tokens_per_step=args.gpt2_batch * config.block_size)
            tokens = torch.randint(config.vocab_size, (args.gpt2_batch, config.block_size + 1),
                                   device=device if args.devices == 1 else "cpu")
            w["x"], w["y"] = tokens[:, :-1], tokens[:, 1:]
        else:
            w.update(lr=1e-3, weight_decay=1e-2, tokens_per_step=256)
            on = device if args.devices == 1 else "cpu"
            w["x"] = torch.rand(256, 784, device=on) * 0.9 + 0.1  # in [0.1, 1): no zeros
            w["y"] = torch.randint(0, 10, (256,), device=on)
        for competitor in competitors:
            r = run_pytorch(device, w) if competitor == "pytorch" else run_lightning(device, w, args.devices)
            world = r.get("world", 1)
            rank_zero = r.get("rank", 0) == 0
            tokens_per_step = w["tokens_per_step"] * world
            flops = 6.0 * r["params"] * tokens_per_step
            if gpt:
                flops += 12.0 * config.n_layer * config.n_embd * config.block_size * tokens_per_step
            med = statistics.median(r["ms"])
            mfu = flops / (med * 1e-3) / (args.peak_tflops * 1e12 * world)
            per_s = tokens_per_step / (med * 1e-3)
            slowest = r.get("slowest", med)
            if rank_zero:
                label = competitor if world == 1 else f"{competitor} {world} x DDP"
                print(f"  {w['name']:<5} {w['precision']:<10} {label:<15} {med:9.3f} ms/step (min {min(r['ms']):.3f}, "
                      f"max {max(r['ms']):.3f}, wall mean {r['wall']:.3f}, slowest rank {slowest:.3f})  "
                      f"{per_s:10.0f} {'tok' if gpt else 'samples'}/s ({per_s / world:.0f} per device)  "
                      f"MFU {mfu:.3f}  peak {r['peak_allocated'] / 2**30:.2f} GiB (reserved {r['peak_reserved'] / 2**30:.2f})  "
                      f"loss {r['last_loss']:.4f}  AdamW {r['kernels']}", flush=True)
            out["results"].append(dict(
                workload=w["name"], precision=w["precision"], competitor=competitor, language="Python",
                devices=world, strategy="ddp" if world > 1 else "single-device",
                steps=w["steps"], warmup=w["warmup"], ms_median=med, ms_median_slowest_rank=slowest,
                ms_min=min(r["ms"]), ms_max=max(r["ms"]), wall_ms_mean=r["wall"], params=r["params"],
                tokens_per_step=tokens_per_step, per_s=per_s, per_s_per_device=per_s / world,
                flops_per_step=flops, mfu=mfu, peak_allocated_bytes=r["peak_allocated"],
                peak_reserved_bytes=r["peak_reserved"], last_loss=r["last_loss"], optimizer_kernels=r["kernels"]))
    if args.json and rank_zero:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
