#!/usr/bin/env python3
"""Makes the fixture of a Python Lightning Fabric checkpoint with gradient-scaler state, which Debian's Python
cannot (no Lightning, no CUDA): Fabric(accelerator="cuda", precision 16-mixed with its GradScaler given as the
plugin's), a few steps of which some overflow (init_scale 2**24: the scale backs off, then grows every 3 steps),
then fabric.save(path, {"model", "optimizer", "scaler", "step"}). Run on the GPU machine from the repository root:

    python3 tests/python/make_scaler_fixture.py tests/unit/io/fixtures

It writes lightning_scaler.ckpt and expected_scaler.txt ("<key> <value>" of scaler.state_dict(), floats in hex),
read by tests/unit/io/torch_pickle_test.cpp.
"""
import os
import sys

import lightning
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/unit/io/fixtures"
os.makedirs(OUT, exist_ok=True)
scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24, growth_interval=3)
fabric = Fabric(accelerator="cuda", devices=1, plugins=[MixedPrecision("16-mixed", "cuda", scaler)])
fabric.seed_everything(3, verbose=False)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, optimizer = fabric.setup(model, optimizer)
x = torch.randn(16, 4, device=fabric.device)
scales = []
for step in range(12):
    optimizer.zero_grad()
    fabric.backward(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))
    optimizer.step()
    scales.append(scaler.get_scale())
fabric.save(os.path.join(OUT, "lightning_scaler.ckpt"),
            {"model": model, "optimizer": optimizer, "scaler": scaler, "step": 12})
state = scaler.state_dict()
with open(os.path.join(OUT, "expected_scaler.txt"), "w") as f:
    f.write(f"# made by tests/python/make_scaler_fixture.py with torch {torch.__version__}, lightning "
            f"{lightning.__version__}; scales per step: {scales}\n")
    for key, value in state.items():
        f.write(f"{key} {float(value).hex() if isinstance(value, float) else value}\n")
print(f"scaler state {state}; scales {scales}")
