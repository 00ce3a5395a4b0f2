#!/usr/bin/python3
"""Checks a .ckpt written by fabric::TorchCheckpointIO from Python, as tests/unit/io/torch_pickle_test.cpp runs it:

    /usr/bin/python3 tests/python/check_ckpt.py FILE EXPECTED

FILE holds {"model", "optimizer" (AdamW), "model2", "optimizer2" (SGD with momentum), "step": 7, "name": "run",
"nested": [1.5, 2.5]} after two C++ steps; EXPECTED the C++ parameters after a third step (`label|name|hex...`).
The file is read with torch.load(weights_only=True); the state goes into fresh Python models and optimizers
through model.load_state_dict and optimizer.load_state_dict, and one more step must give C++'s parameters.
"""
import sys
import types
import pickle

import torch

path, expected_path = sys.argv[1], sys.argv[2]


def load():
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001
        # torch 1.13's weights_only reader has no BINFLOAT opcode: it reads no float at all, not even in the
        # optimizer files of its own torch.save (fixed in torch 2.0). There, check with the same allow-list of
        # globals through the standard unpickler, which is what weights_only does in later versions.
        if "Unsupported operand 71" not in str(error) or int(torch.__version__.split(".")[0]) >= 2:
            raise
    from torch._weights_only_unpickler import _get_allowed_globals

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            allowed = _get_allowed_globals()
            if f"{module}.{name}" in allowed:
                return allowed[f"{module}.{name}"]
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed by weights_only")

    restricted = types.ModuleType("restricted_pickle")
    restricted.Unpickler = Restricted
    restricted.load = lambda f, **kw: Restricted(f, **kw).load()
    return torch.load(path, pickle_module=restricted)


ckpt = load()
assert isinstance(ckpt, dict), type(ckpt)
assert ckpt["step"] == 7 and ckpt["name"] == "run" and ckpt["nested"] == [1.5, 2.5], ckpt
assert all(type(v) is torch.Tensor for v in ckpt["model"].values())


def model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


X = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 10
models = {"model": model(), "model2": model()}
opts = {
    "model": torch.optim.AdamW(models["model"].parameters(), lr=0.5),
    "model2": torch.optim.SGD(models["model2"].parameters(), lr=0.5),
}
for label, key in (("model", "optimizer"), ("model2", "optimizer2")):
    models[label].load_state_dict(ckpt[label])
    opts[label].load_state_dict(ckpt[key])
    models[label].train()
    opts[label].zero_grad()
    models[label](X).pow(2).sum().backward()
    opts[label].step()

failures = 0
for line in open(expected_path):
    label, name, *values = line.strip().split("|")
    got = dict(models[label].named_parameters())[name].detach().reshape(-1).double().tolist()
    want = [float.fromhex(v) for v in values]
    for g, w in zip(got, want):
        if abs(g - w) > 1e-6 * (1 + abs(w)):
            print(f"{label}.{name}: Python {g!r}, C++ {w!r}")
            failures += 1
print("ok" if failures == 0 else f"{failures} values differ")
if failures:
    sys.exit(1)

# Python Lightning Fabric's fabric.load, where Lightning is installed.
try:
    from lightning.fabric import Fabric
except ImportError:
    Fabric = None
if Fabric is not None:
    fabric = Fabric(accelerator="cpu", devices=1)
    m = model()
    o = torch.optim.AdamW(m.parameters(), lr=0.5)
    m, o = fabric.setup(m, o)
    rest = fabric.load(path, {"model": m, "optimizer": o})
    assert rest["step"] == 7 and rest["name"] == "run", rest
    for name, p in m.state_dict().items():
        assert torch.equal(p, ckpt["model"][name]), name
    assert o.param_groups[0]["lr"] == ckpt["optimizer"]["param_groups"][0]["lr"]
    print("Lightning's fabric.load: ok")
