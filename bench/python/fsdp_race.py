#!/usr/bin/env python3
"""Python Lightning Fabric's FSDPStrategy: the competitor of bench_ddp_race --strategy fsdp in bench/multi_gpu.sh.

One run trains one workload with Fabric(devices=N, strategy=FSDPStrategy(...), precision=...) over N
processes started by fabric.launch(), each with its own batch of --batch rows (global batch N x batch),
as bench_ddp_race (bench/ddp_race.cpp) does:

  FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=S, activation_checkpointing_policy={Block}
               with --checkpointing), the GPT-2 Block of bench/python/race.py (the model of
               examples/gpt2/gpt2.hpp: the script prints the parameter count to compare);
  model = fabric.setup_module(GPT(config)), optimizer = fabric.setup_optimizers(AdamW(model.parameters())),
  then loss = cross_entropy(model(x), y), fabric.backward(loss), optimizer.step(), optimizer.zero_grad().

Steps are timed with CUDA events (time.perf_counter on the CPU) after a warm-up; rank 0 prints and writes
its median, the slowest rank's median and the largest peak memory of any rank. --strategy ddp runs
Lightning's DDP with the same model and batch (for the largest-model search).

Lightning's bf16-mixed under FSDP gathers the parameters and reduces the gradients in bfloat16
(MixedPrecision(param_dtype=reduce_dtype=buffer_dtype=bfloat16), its FSDPPrecision); fabric's FSDP keeps
float32 parameters, gathers and reduces them in float32 and runs the forward under autocast, as DDP does.
--mixed-precision fp32 gives Lightning fabric's arrangement (float32 parameters and reduction, autocast).

A CUDA out-of-memory error ends every process with exit code 3 and the line "fsdp_race.py: out of
memory" (bench/multi_gpu.sh fsdp-largest counts on it).

    python3 bench/python/fsdp_race.py --devices 2 --sharding FULL_SHARD --json fsdp-lightning.json
    python3 bench/python/fsdp_race.py --device cpu --gpt2-config tiny --steps 3 --warmup 1

Where Lightning is not installed, the script prints the model's parameter count and exits 0 with a message.
"""

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import race  # noqa: E402  (the models of the DDP race: race.GPT, race.Block, race.Mlp, and its Fabric import)

SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--devices", type=int, default=1, help="processes, one GPU each (default 1)")
    p.add_argument("--strategy", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--sharding", type=str.upper, choices=SHARDINGS, default="FULL_SHARD")
    p.add_argument("--checkpointing", action="store_true", help="activation_checkpointing_policy={Block}")
    p.add_argument("--mixed-precision", choices=["lightning", "fp32"], default="lightning",
                   help="lightning: Lightning's FSDP bf16-mixed (bfloat16 parameters and reduction); fp32: "
                   "float32 parameters and reduction under autocast, as fabric's FSDP")
    p.add_argument("--workload", choices=["gpt2", "mlp-fp32", "mlp-bf16-mixed"], default="gpt2")
    p.add_argument("--gpt2-config", choices=["small", "tiny"], default="small")
    p.add_argument("--n-layer", type=int, default=0, help="gpt2: blocks (default the config's)")
    p.add_argument("--n-embd", type=int, default=0, help="gpt2: width (default the config's)")
    p.add_argument("--n-head", type=int, default=0, help="gpt2: heads (default the config's, or width / 64)")
    p.add_argument("--batch", type=int, default=0, help="rows per device (gpt2 8, mlp 256)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (gpt2 30, mlp 300)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (gpt2 10, mlp 50)")
    p.add_argument("--timeout-s", type=int, default=120, help="the process group's timeout")
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument("--json", help="rank 0 writes the results to PATH")
    p.add_argument("--tag", help="ignored (names the processes of a run for pgrep)")
    a = p.parse_args(argv)
    gpt = a.workload == "gpt2"
    if a.checkpointing and (not gpt or a.strategy != "fsdp"):
        p.error("--checkpointing needs --strategy fsdp and --workload gpt2 (the blocks)")
    if not gpt and (a.n_layer or a.n_embd or a.n_head):
        p.error("--n-layer, --n-embd and --n-head need --workload gpt2")
    if a.devices < 1:
        p.error(f"expected --devices >= 1, found {a.devices}")
    a.batch = a.batch or (8 if gpt else 256)
    a.steps = a.steps or (30 if gpt else 300)
    a.warmup = a.warmup if a.warmup >= 0 else (10 if gpt else 50)
    return a


def gpt2_config(a):
    c = race.GPTConfig.tiny() if a.gpt2_config == "tiny" else race.GPTConfig()
    if a.n_layer:
        c.n_layer = a.n_layer
    if a.n_embd:
        c.n_embd = a.n_embd
    if a.n_head:
        c.n_head = a.n_head
    elif a.n_embd:
        c.n_head = max(1, a.n_embd // 64)
    if c.n_embd % c.n_head:
        sys.exit(f"fsdp_race.py: expected n_embd divisible by n_head, found {c.n_embd} and {c.n_head}")
    return c


def make_strategy(a):
    try:
        from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
    except ImportError:
        from lightning_fabric.strategies import DDPStrategy, FSDPStrategy
    timeout = datetime.timedelta(seconds=a.timeout_s)
    if a.strategy == "ddp":
        return DDPStrategy(timeout=timeout)
    kwargs = dict(sharding_strategy=a.sharding, timeout=timeout, state_dict_type="full")
    if a.workload == "gpt2":
        kwargs["auto_wrap_policy"] = {race.Block}
        if a.checkpointing:
            kwargs["activation_checkpointing_policy"] = {race.Block}
    if a.mixed_precision == "fp32":
        from torch.distributed.fsdp import MixedPrecision

        kwargs["mixed_precision"] = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                                   buffer_dtype=torch.float32)
    return FSDPStrategy(**kwargs)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device):
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return 0, 0


def time_steps(device, a, step, barrier):
    """Warm-up, a barrier, then timed steps (CUDA events; perf_counter on the CPU); returns (ms per step, wall
    mean ms, last loss)."""
    loss = None
    for _ in range(a.warmup):
        loss = step()
    synchronize(device)
    barrier()
    cuda = device.type == "cuda"
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.steps)]
    cpu_ms = []
    start = time.perf_counter()
    for i in range(a.steps):
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
    wall = (time.perf_counter() - start) * 1e3 / a.steps
    ms = [x.elapsed_time(y) for x, y in events] if cuda else cpu_ms
    return ms, wall, loss.item()


def build(a, config):
    torch.manual_seed(0)
    return race.GPT(config) if a.workload == "gpt2" else race.Mlp()


def main(argv):
    a = parse_args(argv)
    gpt = a.workload == "gpt2"
    bf16 = a.workload != "mlp-fp32"
    config = gpt2_config(a) if gpt else None
    shape = (f"n_layer {config.n_layer} n_embd {config.n_embd} n_head {config.n_head} block_size {config.block_size} "
             f"vocab {config.vocab_size}" if gpt else "784-1024-1024-10")

    def count(net):
        n = sum(p.numel() for p in net.parameters())
        print(f"fsdp_race.py: {a.workload} ({shape}): {n:,} parameters", flush=True)
        return n

    if race.Fabric is None:
        params = count(build(a, config))
        print("fsdp_race.py: Lightning is not installed (no lightning.fabric or lightning_fabric): skipping the "
              "lightning competitor", file=sys.stderr)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(skipped=["lightning"], params=params, results=[]), f, indent=2)
                f.write("\n")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("fsdp_race.py: --device cuda: no GPU is visible")
    precision = "bf16-mixed" if bf16 else "32-true"
    fabric = race.Fabric(accelerator=a.device, devices=a.devices, strategy=make_strategy(a), precision=precision)
    fabric.launch()
    device = fabric.device
    rank = fabric.global_rank
    try:
        reset_memory(device)
        net = build(a, config)
        params = count(net) if rank == 0 else sum(p.numel() for p in net.parameters())
        model = fabric.setup_module(net)
        lr, wd = (6e-4, 0.1) if gpt else (1e-3, 1e-2)
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd))
        gen = torch.Generator().manual_seed(1000 + rank)
        if gpt:
            tokens = torch.randint(config.vocab_size, (a.batch, config.block_size + 1), generator=gen)
            x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
        else:
            x = (torch.rand(a.batch, 784, generator=gen) * 0.9 + 0.1).to(device)  # in [0.1, 1)
            y = torch.randint(0, 10, (a.batch,), generator=gen).to(device)
        loss_fn = race.gpt2_loss if gpt else race.mlp_loss

        def step():
            loss = loss_fn(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            return loss

        ms, wall, last = time_steps(device, a, step, fabric.barrier)
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; so is the CPU allocator's failure
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in str(e) and \
                "out of memory" not in str(e):
            raise
        # Ends every process at once (rank 0 kills the children it started: they would wait in a collective).
        print(f"fsdp_race.py: out of memory on rank {rank} ({a.strategy} {a.sharding}): {str(e).splitlines()[0]}",
              file=sys.stderr, flush=True)
        launcher = getattr(fabric.strategy, "launcher", None) or getattr(fabric.strategy, "_launcher", None)
        for proc in getattr(launcher, "procs", []):
            proc.kill()
        os._exit(3)
    peak_allocated, peak_reserved = peak_memory(device)
    world = fabric.world_size
    med = statistics.median(ms)
    reduce = lambda v, op: fabric.all_reduce(torch.tensor(float(v), device=device), reduce_op=op).item()
    slowest = reduce(med, "max")
    peak_max = int(reduce(peak_allocated, "max"))
    last = reduce(last, "mean")
    rows = a.batch * world
    tokens_per_step = rows * (config.block_size if gpt else 1)
    flops = 6.0 * params * tokens_per_step
    if gpt:
        flops += 12.0 * config.n_layer * config.n_embd * config.block_size * tokens_per_step
    per_s = tokens_per_step / (med * 1e-3)
    mfu = flops / (med * 1e-3) / (a.peak_tflops * 1e12 * world)
    label = "DDP" if a.strategy == "ddp" else f"FSDP {a.sharding.lower()}" + (" ckpt" if a.checkpointing else "")
    version = getattr(sys.modules.get("lightning"), "__version__", None) or getattr(
        sys.modules.get("lightning_fabric"), "__version__", None)
    kernels = race.optimizer_kernels(getattr(optimizer, "optimizer", optimizer), device)
    if rank == 0:
        print(f"  {a.workload.split('-')[0]:<5} {precision:<10} {world} x {label:<22} {med:9.3f} ms/step (slowest rank "
              f"{slowest:.3f})  {per_s:10.0f} {'tok' if gpt else 'samples'}/s ({per_s / world:.0f} per device)  "
              f"MFU {mfu:.3f}  peak {peak_allocated / 2**30:.2f} GiB (largest rank {peak_max / 2**30:.2f}, reserved "
              f"{peak_reserved / 2**30:.2f})  loss {last:.4f}  AdamW {kernels}  mixed precision {a.mixed_precision}  "
              f"Lightning {version}", flush=True)
        if a.json:
            r = dict(mode="time", workload=a.workload.split("-")[0], precision=precision, competitor="lightning",
                     language="Python", devices=world, strategy=a.strategy,
                     sharding=a.sharding.lower() if a.strategy == "fsdp" else "",
                     activation_checkpointing=a.checkpointing, mixed_precision=a.mixed_precision,
                     n_layer=config.n_layer if gpt else 0, n_embd=config.n_embd if gpt else 0,
                     n_head=config.n_head if gpt else 0, batch_per_device=a.batch, steps=a.steps, warmup=a.warmup,
                     ms_median=med, ms_median_slowest_rank=slowest, ms_min=min(ms), ms_max=max(ms),
                     wall_ms_mean=wall, params=params, global_rows=rows, tokens_per_step=tokens_per_step, per_s=per_s,
                     per_s_per_device=per_s / world, flops_per_step=flops, mfu=mfu,
                     peak_allocated_bytes=peak_allocated, peak_reserved_bytes=peak_reserved,
                     peak_allocated_bytes_max_rank=peak_max, last_loss=last, optimizer_kernels=kernels,
                     torch=torch.__version__, lightning=version, device=str(device))
            with open(a.json, "w") as f:
                json.dump(r, f, indent=2)
                f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
