#!/usr/bin/env python3
"""Fidelity of fabric with Python (issue 14), on the CPU in float32: runs tests/python/fidelity.cpp
(`fabric_fidelity`) beside the same training in Python and compares, printing one row per check:

  - init: the same seed and nn.Sequential(Linear(4, 16), Tanh(), Linear(16, 1)) built in the same order give
    fabric's initial weights bit for bit (the C++ model built with braces); the model built with parentheses,
    `Sequential(Linear(...), Tanh(), Linear(...))`, differs under g++ (arguments evaluated right to left);
  - the loss curves of 40 steps: SGD (momentum 0.9) exactly, AdamW within the stated tolerance (fabric's step
    is fused where LibTorch has `_fused_adamw_`, Python's on the CPU single-tensor); the difference is printed;
  - 20 steps in C++, `fabric.save` (TorchCheckpointIO), 20 more in Python, and the reverse (Python's save, C++'s
    `fabric.load`), against the uninterrupted 40-step runs of each: the curves continue without a jump.

Python is Lightning Fabric (`Fabric.setup`, `fabric.backward`, `fabric.save`/`load`) where it is installed
(`--lightning auto`), else plain PyTorch (`torch.save`/`torch.load(weights_only=True)`, `load_state_dict`): Debian's
torch 1.13 in CI. `--fixtures DIR` (Lightning only) also writes lightning_fidelity_{sgd,adamw}.ckpt, Lightning's
`fabric.save` after 20 steps with the data ("x", "y"), and expected_fidelity.txt (the next 20 losses of Python)
for tests/unit/io/torch_pickle_test.cpp.

    python3 tests/python/fidelity.py --cxx build/tests/python/fabric_fidelity [--lightning auto|yes|no]
"""
import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)
ADAMW_RTOL = 1e-4  # fused (one rounding per element) against single-tensor (one per operation), 40 steps


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)


def make_data():
    torch.manual_seed(7)
    x = torch.randn(64, 4)
    return x, torch.sin(x.sum(1, keepdim=True))


def py_train(opt_name, steps, lightning, resume=None, save=None, fixture=False):
    if lightning:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
        fabric.seed_everything(42, verbose=False)
    else:
        torch.manual_seed(42)
    model = build_model()
    optimizer = make_optimizer(opt_name, model.parameters())
    if lightning:
        model, optimizer = fabric.setup(model, optimizer)
    step = 0
    if resume:
        if lightning:
            state = {"model": model, "optimizer": optimizer, "step": 0}
            fabric.load(resume, state)
            step = state["step"]
        else:
            # NOTE: torch 1.13's weights-only unpickler lacks BINFLOAT (opcode 71, a pickled float); 2.x reads it.
            ckpt = torch.load(resume, weights_only=int(torch.__version__.split(".")[0]) >= 2)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = ckpt["step"]
    x, y = make_data()
    losses = []
    for s in range(step, step + steps):
        rows = slice((s % 4) * 16, (s % 4) * 16 + 16)
        optimizer.zero_grad()
        loss = F.mse_loss(model(x[rows]), y[rows])
        fabric.backward(loss) if lightning else loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if save:
        state = {"model": model, "optimizer": optimizer, "step": step + steps}
        if fixture:
            state.update(x=x, y=y)
        if lightning:
            fabric.save(save, state)
        else:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + steps}, save)
    return losses


def run_cxx(args, *argv, env=None):
    out = subprocess.run([args.cxx, *argv], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return out.splitlines()


def cxx_train(args, opt_name, steps, resume=None, save=None, env=None):
    argv = ["train", "--optimizer", opt_name, "--steps", str(steps)]
    argv += ["--resume", resume] if resume else []
    argv += ["--save", save] if save else []
    return [float.fromhex(line.split()[2]) for line in run_cxx(args, *argv, env=env) if line.startswith("loss ")]


def max_rel(a, b):
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(a, b))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cxx", required=True, help="the fabric_fidelity program")
    parser.add_argument("--work", default="build/fidelity")
    parser.add_argument("--lightning", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--fixtures", help="write Lightning's checkpoints and Python's losses for the C++ tests")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    lightning = args.lightning == "yes"
    if args.lightning == "auto":
        try:
            import lightning.fabric  # noqa: F401

            lightning = True
        except ImportError:
            lightning = False
    who = "Lightning Fabric" if lightning else "PyTorch"
    if lightning:
        import lightning as L

        who += f" {L.__version__}"
    print(f"# fabric against {who}, torch {torch.__version__}, CPU float32, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    rows, failed = [], []

    def check(name, ok, detail):
        rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failed.append(name)

    # Initial weights.
    lines = run_cxx(args, "init")
    compiler = lines[0].split()[1]
    cxx = {}
    for line in lines[1:]:
        how, name, values = line.split("|")
        cxx.setdefault(how, {})[name] = [float.fromhex(v) for v in values.split()]
    torch.manual_seed(42)
    py = {k: v.detach().reshape(-1).tolist() for k, v in build_model().named_parameters()}
    check("init weights, braced Sequential{...}", cxx["braced"] == py,
          f"{sum(len(v) for v in py.values())} values of {list(py)} bit-equal" if cxx["braced"] == py else "differ")
    same = cxx["parenthesized"] == py
    check("init weights, parenthesized Sequential(...)", same if compiler != "g++" else not same,
          f"{'equal' if same else 'differ'} under {compiler}" + ("" if same else " (arguments evaluated right to left)"))

    losses = {}
    for opt in ("sgd", "adamw"):
        losses[("cxx", opt)] = cxx_train(args, opt, 40)
        losses[("py", opt)] = py_train(opt, 40, lightning)
    check("SGD 40 steps, fabric == Python", losses[("cxx", "sgd")] == losses[("py", "sgd")],
          f"max rel diff {max_rel(losses[('cxx', 'sgd')], losses[('py', 'sgd')]):.3g}, "
          f"loss {losses[('py', 'sgd')][0]:.6f} -> {losses[('py', 'sgd')][-1]:.6f}")
    d = max_rel(losses[("cxx", "adamw")], losses[("py", "adamw")])
    check("AdamW 40 steps, fabric ~ Python", d <= ADAMW_RTOL,
          f"max rel diff {d:.3g} (tolerance {ADAMW_RTOL:g}), loss {losses[('py', 'adamw')][0]:.6f} -> "
          f"{losses[('py', 'adamw')][-1]:.6f}")
    for mode in ("0", "foreach"):
        own = cxx_train(args, "adamw", 40, env={"FABRIC_FOREACH_STEP": mode})
        d = max_rel(own, losses[("py", "adamw")])
        check(f"AdamW 40 steps, FABRIC_FOREACH_STEP={mode} ~ Python", d <= ADAMW_RTOL, f"max rel diff {d:.3g}")

    # 20 steps in one, checkpoint, 20 in the other.
    for opt in ("sgd", "adamw"):
        cxx_ckpt = os.path.join(args.work, f"cxx_{opt}_20.ckpt")
        py_ckpt = os.path.join(args.work, f"py_{opt}_20.ckpt")
        first_cxx = cxx_train(args, opt, 20, save=cxx_ckpt)
        then_py = py_train(opt, 20, lightning, resume=cxx_ckpt)
        first_py = py_train(opt, 20, lightning, save=py_ckpt)
        then_cxx = cxx_train(args, opt, 20, resume=py_ckpt)
        for name, curve in ((f"C++ 20 -> {who.split()[0]} 20", first_cxx + then_py),
                            (f"{who.split()[0]} 20 -> C++ 20", first_py + then_cxx)):
            d_cxx = max_rel(curve, losses[("cxx", opt)])
            d_py = max_rel(curve, losses[("py", opt)])
            jump = abs(curve[20] - losses[("py", opt)][20]) / abs(losses[("py", opt)][20])
            ok = (d_cxx == 0 and d_py == 0) if opt == "sgd" else (d_cxx <= ADAMW_RTOL and d_py <= ADAMW_RTOL)
            check(f"{opt.upper() if opt == 'sgd' else 'AdamW'} {name}", ok,
                  f"vs uninterrupted C++ 40: max rel {d_cxx:.3g}; vs {who.split()[0]} 40: {d_py:.3g}; "
                  f"step 21 {curve[20]:.6f} (uninterrupted {losses[('py', opt)][20]:.6f}, rel {jump:.3g})")

    if args.fixtures:
        assert lightning, "--fixtures needs Lightning"
        os.makedirs(args.fixtures, exist_ok=True)
        lines = [f"# made by tests/python/fidelity.py --fixtures with {who}, torch {torch.__version__}"]
        for opt in ("sgd", "adamw"):
            path = os.path.join(args.fixtures, f"lightning_fidelity_{opt}.ckpt")
            py_train(opt, 20, True, save=path, fixture=True)
            lines.append(f"{opt} " + " ".join(v.hex() for v in losses[("py", opt)][20:]))
        with open(os.path.join(args.fixtures, "expected_fidelity.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote the fixtures to {args.fixtures}")

    with open(os.path.join(args.work, "fidelity.json"), "w") as f:
        json.dump({"python": who, "torch": torch.__version__, "compiler": compiler, "checks": rows,
                   "losses": {f"{k[0]}_{k[1]}": v for k, v in losses.items()}}, f, indent=1)
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
