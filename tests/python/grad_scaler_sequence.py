"""PyTorch's GradScaler on a fixed pattern of gradients (finite, inf, NaN): prints the scale after
each update, in the format of fabric's `[scaler]` test, so the two can be compared line for line.

    python3 tests/python/grad_scaler_sequence.py cuda
"""
import sys

import torch

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
param = torch.nn.Parameter(torch.zeros(2, device=device))
optimizer = torch.optim.SGD([param], lr=0.1)
scaler = torch.amp.GradScaler(device, init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
scales = []
for g in [1.0, 1.0, float("inf"), 1.0, float("nan"), 1.0, 1.0, 1.0]:
    scaler.scale(torch.ones((), device=device))
    param.grad = torch.tensor([g, 1.0], device=device) * scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    scales.append(scaler.get_scale())
print("pytorch scales:", " ".join(f"{s:g}" for s in scales))
