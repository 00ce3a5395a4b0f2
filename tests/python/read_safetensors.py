"""Reads a safetensors file fabric wrote with Python's safetensors.torch.load_file and checks it against
the expected.json written beside it by the C++ sample test, then rebuilds the model and the optimizer
from it in Python and takes a step.

    export FABRIC_ST_SAMPLE_DIR=$(mktemp -d)
    build/tests/fabric_tests '[.safetensors-sample]'      # writes fabric.safetensors and expected.json
    python3 tests/python/read_safetensors.py "$FABRIC_ST_SAMPLE_DIR"/fabric.safetensors \
        "$FABRIC_ST_SAMPLE_DIR"/expected.json

Checked: the file's keys are exactly the expected ones (the model's state_dict() names, the optimizer's
`optimizer.state.<i>.<name>`, fabric's own entries); every tensor's dtype, shape and values; the metadata
(type-tagged values, the optimizer's param_groups as JSON); Python's model.state_dict() of the same
architecture has the same model keys and loads strictly; torch.optim.Adam.load_state_dict accepts the
rebuilt optimizer state and steps. Exit status 0 when all holds, 1 otherwise, 2 for a bad command line.
"""
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

DTYPES = {
    "F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}


def main(path, expected_path):
    expected = json.load(open(expected_path))
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    problems = []
    want = expected["tensors"]
    if set(tensors) != set(want):
        problems.append(f"keys: missing {sorted(set(want) - set(tensors))}, unexpected {sorted(set(tensors) - set(want))}")
    for name, spec in want.items():
        t = tensors.get(name)
        if t is None:
            continue
        if t.dtype != DTYPES[spec["dtype"]]:
            problems.append(f"{name}: dtype {t.dtype}, expected {spec['dtype']}")
        if list(t.shape) != spec["shape"]:
            problems.append(f"{name}: shape {list(t.shape)}, expected {spec['shape']}")
        elif "values" in spec and t.to(torch.float64).flatten().tolist() != spec["values"]:
            problems.append(f"{name}: values differ")
    for key, value in expected["metadata"].items():
        if metadata.get(key) != value:
            problems.append(f"metadata {key}: {metadata.get(key)!r}, expected {value!r}")

    # The same architecture in Python: its state_dict() names are the file's model tensors.
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    names = list(model.state_dict())
    if sorted(names) != sorted(expected["model_keys"]):
        problems.append(f"model keys: Python has {names}, fabric wrote {expected['model_keys']}")
    try:
        model.load_state_dict({k: tensors[k] for k in names}, strict=True)
    except Exception as e:  # noqa: BLE001 - reported below
        problems.append(f"model.load_state_dict: {e}")
    # The optimizer, rebuilt from the flattened state and the param_groups metadata.
    groups = json.loads(metadata["optimizer.param_groups"])
    state = {}
    for key, t in tensors.items():
        if key.startswith("optimizer.state."):
            index, field = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(index), {})[field] = t
    optimizer = torch.optim.Adam(model.parameters())
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        if optimizer.param_groups[0]["lr"] != groups[0]["lr"]:
            problems.append("optimizer: lr not restored")
        model(torch.ones(8, 3)).pow(2).mean().backward()
        optimizer.step()
    except Exception as e:  # noqa: BLE001 - reported below
        problems.append(f"optimizer.load_state_dict/step: {e}")

    for p in problems:
        print("read_safetensors:", p, file=sys.stderr)
    print(f"read_safetensors: {len(tensors)} tensors, {len(metadata)} metadata entries, "
          f"{'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: read_safetensors.py FILE EXPECTED_JSON", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
