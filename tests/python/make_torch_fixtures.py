#!/usr/bin/env python3
"""Writes the small files of Python's torch.save that fabric's checkpoint tests read
(tests/unit/io/fixtures/). Run with a Python that has torch (Debian's /usr/bin/python3 has 1.13):

    /usr/bin/python3 tests/python/make_torch_fixtures.py tests/unit/io/fixtures
"""
import collections
import os
import struct
import sys

import torch


def to_zip64(data: bytes) -> bytes:
    """Rewrites a zip archive with the zip64 records torch writes for files over 4 GB: saturated 32-bit
    sizes and offsets in the central directory with zip64 extra fields, a zip64 end record and locator."""
    eocd = len(data) - 22
    assert struct.unpack_from("<I", data, eocd)[0] == 0x06054B50
    count, dir_size, dir_ofs = struct.unpack_from("<HII", data, eocd + 10)
    entries = b""
    p = dir_ofs
    for _ in range(count):
        fixed = bytearray(data[p : p + 46])
        packed, unpacked, name_len, extra_len, comment_len = struct.unpack_from("<IIHHH", fixed, 20)
        local = struct.unpack_from("<I", fixed, 42)[0]
        rest = data[p + 46 : p + 46 + name_len + extra_len + comment_len]
        struct.pack_into("<II", fixed, 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<I", fixed, 42, 0xFFFFFFFF)
        struct.pack_into("<H", fixed, 30, extra_len + 28)
        name, extra, comment = rest[:name_len], rest[name_len : name_len + extra_len], rest[name_len + extra_len :]
        extra += struct.pack("<HHQQQ", 1, 24, unpacked, packed, local)
        entries += bytes(fixed) + name + extra + comment
        p += 46 + name_len + extra_len + comment_len
    record = dir_ofs + len(entries)
    end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(entries), dir_ofs)
    locator = struct.pack("<IIQI", 0x07064B50, 0, record, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:dir_ofs] + entries + end64 + locator + end


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    # What `torch.save(model.state_dict(), path)` and Python Lightning write: a collections.OrderedDict,
    # which LibTorch's unpickler cannot read.
    state = linear.state_dict()
    assert isinstance(state, collections.OrderedDict)
    torch.save(state, os.path.join(out, "ordered_dict_state.pt"))
    # The same tensors as a plain dict, which LibTorch reads.
    plain = os.path.join(out, "plain_dict_state.pt")
    torch.save({"model": dict(state), "step": 5}, plain)
    # The same file in zip64 form (as torch writes files over 4 GB); torch.load reads it.
    zip64 = os.path.join(out, "zip64_plain_dict_state.pt")
    with open(plain, "rb") as f, open(zip64, "wb") as g:
        g.write(to_zip64(f.read()))
    again = torch.load(zip64)
    assert again["step"] == 5 and torch.equal(again["model"]["weight"], state["weight"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "unit", "io", "fixtures"))
