#!/usr/bin/env python3
"""Makes the fixtures Debian's Python cannot: a checkpoint of Python Lightning Fabric's fabric.save (torch 2.x),
for tests/unit/io/torch_pickle_test.cpp. Run where Lightning is installed, from the repository root:

    python3 tests/python/make_lightning_fixtures.py tests/unit/io/fixtures

It writes lightning_adamw.ckpt ({"model", "optimizer" (AdamW after two steps), "step": 5, "name": "x",
"nested": {"list": [1, 2.5, "a"]}}), lightning_state_dict.pt (torch.save(model.state_dict()) of torch 2.x) and
expected_lightning.txt in the format of make_pickle_fixtures.py (after_step3_lightning: the parameters after
one more step on x).
"""
import os
import sys

import torch
from lightning.fabric import Fabric

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/unit/io/fixtures"
os.makedirs(OUT, exist_ok=True)
lines = []


def emit(name, path, value):
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if value.is_floating_point():
            vals = " ".join(float(v).hex() for v in flat.double().tolist())
        elif value.dtype == torch.bool:
            vals = " ".join("1" if v else "0" for v in flat.tolist())
        else:
            vals = " ".join(str(v) for v in flat.tolist())
        lines.append(f"{name}|{path}|{str(value.dtype).replace('torch.', '')}|{','.join(map(str, value.shape))}|{vals}")
    elif isinstance(value, bool):
        lines.append(f"{name}|{path}|bool||{int(value)}")
    elif isinstance(value, int):
        lines.append(f"{name}|{path}|int||{value}")
    elif isinstance(value, float):
        lines.append(f"{name}|{path}|float||{float(value).hex()}")
    elif isinstance(value, str):
        lines.append(f"{name}|{path}|str||{value}")
    elif value is None:
        lines.append(f"{name}|{path}|none||")
    elif isinstance(value, dict):
        for k, v in value.items():
            emit(name, f"{path}/{k}" if path else str(k), v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            emit(name, f"{path}/{i}", v)


fabric = Fabric(accelerator="cpu", devices=1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
model, optimizer = fabric.setup(model, optimizer)
x = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 10
for _ in range(3):
    if _ == 2:
        path = os.path.join(OUT, "lightning_adamw.ckpt")
        fabric.save(path, {"model": model, "optimizer": optimizer, "step": 5, "name": "x",
                           "nested": {"list": [1, 2.5, "a"]}})
        torch.save(model.state_dict(), os.path.join(OUT, "lightning_state_dict.pt"))
        raw = torch.load(path, weights_only=True)
        emit("lightning_adamw.ckpt", "", {k: v for k, v in raw.items() if k != "model"})
        emit("lightning_state_dict.pt", "", dict(raw["model"]))
    optimizer.zero_grad()
    fabric.backward(model(x).pow(2).sum())
    optimizer.step()
emit("after_step3_lightning", "", dict(model.state_dict()))
with open(os.path.join(OUT, "expected_lightning.txt"), "w") as f:
    import lightning

    f.write(f"# made by tests/python/make_lightning_fixtures.py with torch {torch.__version__}, "
            f"lightning {lightning.__version__}\n")
    f.write("\n".join(lines) + "\n")
print(f"wrote {len(lines)} expected values; torch {torch.__version__}")
