"""Writes the safetensors fixtures that fabric's C++ tests read (tests/unit/io/safetensors_test.cpp), with
Python's own writer, safetensors.torch.save_file, and an expected.json of every tensor's dtype, shape and
values and of each file's metadata.

Run where torch and safetensors are installed (the GPU machine), from the repository root:

    python3 tests/python/safetensors_fixtures.py tests/unit/io/fixtures/safetensors

Files:
  model.safetensors   the state_dict() of torch.manual_seed(0); Sequential(Linear(3, 4), BatchNorm1d(4),
                      Linear(4, 2)) after one training-mode forward (so the BatchNorm buffers, including
                      the int64 num_batches_tracked, are not their initial values), with __metadata__
  dtypes.safetensors  bf16, f16, f64, int64, int32, uint8, bool, a 0-d and an empty tensor, with __metadata__
"""
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    m.train()
    with torch.no_grad():
        m(torch.arange(24, dtype=torch.float32).reshape(8, 3) / 10)
    return m


DTYPES = {
    torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


def describe(tensors):
    return {
        name: {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            # float64 holds every value of these types exactly
            "values": t.to(torch.float64).flatten().tolist(),
        }
        for name, t in tensors.items()
    }


def main(out):
    os.makedirs(out, exist_ok=True)
    files = {
        "model.safetensors": (
            {k: v.contiguous() for k, v in model().state_dict().items()},
            {"format": "pt", "epoch": "int:3", "note": "written by safetensors.torch.save_file"},
        ),
        "dtypes.safetensors": (
            {
                "bf16": torch.tensor([1.5, -2.25, 3.0e38], dtype=torch.bfloat16),
                "f16": torch.tensor([[0.5, -1.0], [65504.0, 2.0**-24]], dtype=torch.float16),
                "f64": torch.tensor([0.1, -1e300], dtype=torch.float64),
                "i64": torch.tensor([-(2**62), 0, 2**62 + 1], dtype=torch.int64),
                "i32": torch.tensor([-7, 2**31 - 1], dtype=torch.int32),
                "u8": torch.tensor([0, 255], dtype=torch.uint8),
                "mask": torch.tensor([True, False, True]),
                "scalar": torch.tensor(42, dtype=torch.int64),
                "empty": torch.zeros(0, 3),
            },
            {"step": "int:12", "lr": "float:0.001", "name": "str:run"},
        ),
    }
    expected = {}
    for name, (tensors, metadata) in files.items():
        path = os.path.join(out, name)
        save_file(tensors, path, metadata=metadata)
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == metadata
        expected[name] = {"tensors": describe(tensors), "metadata": metadata}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"safetensors_fixtures: wrote {', '.join(files)} and expected.json to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: safetensors_fixtures.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
