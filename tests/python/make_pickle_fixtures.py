#!/usr/bin/python3
"""Makes the torch.save fixtures of tests/unit/io/torch_pickle_test.cpp and the values they hold.

Run with Debian's Python (python3-torch 1.13) from the repository root:

    /usr/bin/python3 tests/python/make_pickle_fixtures.py tests/unit/io/fixtures

Each line of expected.txt is `file|path|kind|shape|values`: path walks the loaded value with '/'
(dictionary keys, list indices), kind is a dtype or int/float/str/bool/none, and values are exact
(float.hex for floating point). Lines of file `after_step3` give the parameters after one more
optimizer step on the input `x`, for the resume tests.
"""
import io
import os
import struct
import sys
import zipfile
from collections import OrderedDict

import torch

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/unit/io/fixtures"
os.makedirs(OUT, exist_ok=True)
lines = []


def fmt_float(x):
    return float(x).hex()


def emit(name, path, value):
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if value.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            vals = " ".join(fmt_float(v) for v in flat.double().tolist())
        elif value.dtype == torch.bool:
            vals = " ".join("1" if v else "0" for v in flat.tolist())
        else:
            vals = " ".join(str(v) for v in flat.tolist())
        dtype = str(value.dtype).replace("torch.", "")
        lines.append(f"{name}|{path}|{dtype}|{','.join(map(str, value.shape))}|{vals}")
    elif isinstance(value, bool):
        lines.append(f"{name}|{path}|bool||{int(value)}")
    elif isinstance(value, int):
        lines.append(f"{name}|{path}|int||{value}")
    elif isinstance(value, float):
        lines.append(f"{name}|{path}|float||{fmt_float(value)}")
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
    else:
        raise TypeError(type(value))


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    m.train()
    return m


X = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 10


def step(m, opt):
    opt.zero_grad()
    m(X).pow(2).sum().backward()
    opt.step()


def save(name, obj):
    torch.save(obj, os.path.join(OUT, name))


# A module's state_dict: an OrderedDict with _metadata, float and int64 (num_batches_tracked) tensors.
m = model()
sd = m.state_dict()
save("state_dict.pt", sd)
emit("state_dict.pt", "", dict(sd))

# Views sharing one storage: a transpose, a row at an offset, a column slice.
base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
views = {"base": base, "t": base.t(), "row": base[2], "cols": base[:, 1:3]}
save("views.pt", views)
emit("views.pt", "", views)

# Element types.
dtypes = {
    "bf16": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
    "f16": torch.tensor([0.5, 65504.0, -1.0], dtype=torch.float16),
    "f64": torch.tensor([1.0 / 3.0], dtype=torch.float64),
    "bool": torch.tensor([True, False, True]),
    "i64": torch.tensor([-(2**40), 7]),
    "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
}
save("dtypes.pt", dtypes)
emit("dtypes.pt", "", dtypes)

# Optimizers after two steps, alone and in Lightning's fabric.save layout; then a third step.
for opt_name, make in (
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
):
    m = model()
    opt = make(m.parameters())
    step(m, opt)
    step(m, opt)
    osd = opt.state_dict()
    save(f"{opt_name}.pt", osd)
    emit(f"{opt_name}.pt", "", osd)
    ckpt = {"model": m.state_dict(), "optimizer": osd, "step": 5, "name": "x", "nested": {"list": [1, 2.5, "a"]}}
    save(f"fabric_{opt_name}.ckpt", ckpt)
    emit(f"fabric_{opt_name}.ckpt", "", {k: v for k, v in ckpt.items() if k != "model"})
    step(m, opt)
    emit(f"after_step3_{opt_name}", "", dict(m.state_dict()))

# The legacy (non-zip) format.
torch.save({"w": torch.ones(2)}, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)


# Hostile and broken files, built from a valid one by replacing records.
def rewrite(src, dst, replace=None, drop=()):
    with zipfile.ZipFile(os.path.join(OUT, src)) as zin, zipfile.ZipFile(
        os.path.join(OUT, dst), "w", zipfile.ZIP_STORED
    ) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            if replace and info.filename.endswith("/data.pkl"):
                data = replace(data)
            zout.writestr(info.filename, data)


prefix = "state_dict"
rewrite("state_dict.pt", "hostile_os_system.pt", replace=lambda d: b"\x80\x02cos\nsystem\nX\x07\x00\x00\x00echo hiq\x00\x85R.")
rewrite("state_dict.pt", "hostile_eval.pt",
        replace=lambda d: b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x00'hi'\x85R.")
# A torch global that is not on the allow-list (torch.load would read another file).
rewrite("state_dict.pt", "hostile_torch_load.pt",
        replace=lambda d: b"\x80\x02ctorch.serialization\nload\nX\x04\x00\x00\x00/etc\x85R.")
# A memo bomb: 60 levels of a list holding the previous level twice (2**60 items when expanded).
bomb = bytearray(b"\x80\x02]q\x000")
for i in range(1, 61):
    bomb += b"]" + b"(" + b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"e" + b"q" + bytes([i]) + b"0"
bomb += b"h" + bytes([60]) + b"."
rewrite("state_dict.pt", "hostile_memo_bomb.pt", replace=lambda d: bytes(bomb))
# A memo lookup that was never stored, and a list appended to itself.
rewrite("state_dict.pt", "hostile_memo_missing.pt", replace=lambda d: b"\x80\x02h\x07.")
rewrite("state_dict.pt", "hostile_cycle.pt", replace=lambda d: b"\x80\x02]q\x00h\x00a.")
rewrite("state_dict.pt", "truncated_pickle.pt", replace=lambda d: d[: len(d) // 2])
rewrite("state_dict.pt", "missing_storage.pt", drop=(f"{prefix}/data/0",))
with open(os.path.join(OUT, "state_dict.pt"), "rb") as f:
    whole = f.read()
with open(os.path.join(OUT, "truncated_file.pt"), "wb") as f:
    f.write(whole[: len(whole) * 2 // 3])

with open(os.path.join(OUT, "expected.txt"), "w") as f:
    f.write(f"# made by tests/python/make_pickle_fixtures.py with torch {torch.__version__}\n")
    f.write("\n".join(lines) + "\n")
print(f"wrote {len(lines)} expected values to {OUT}/expected.txt")
