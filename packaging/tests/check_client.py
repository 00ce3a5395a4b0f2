#!/usr/bin/env python3
"""Checks the port or the recipe with the real client, where one is installed; prints 'SKIP: <why>'
(which CTest reports as skipped) where none is. Neither check downloads anything.

  check_client.py conan CONAN_DIR EXPECTED_VERSION        conan inspect (no remotes): name, version, type
  check_client.py vcpkg PORT_DIR WORK_DIR                 vcpkg format-manifest leaves vcpkg.json as it is

usage: check_client.py conan|vcpkg ...
"""
import difflib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def skip(reason):
    print(f"SKIP: {reason}")
    return 0


def conan(conan_dir, expected_version):
    exe = shutil.which("conan")
    if not exe:
        return skip("conan is not installed (Debian 12 does not package Conan 2; install it with "
                    "`pip install conan` where PyPI is reachable)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    if "version 2." not in version:
        return skip(f"this recipe is for Conan 2; found '{version}'")
    run = subprocess.run([exe, "inspect", conan_dir, "-nr", "-f", "json"], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        print(run.stdout + run.stderr)
        print("conan inspect failed")
        return 1
    fields = json.loads(run.stdout)
    expect = {"name": "fabric", "version": expected_version, "package_type": "header-library"}
    wrong = {k: fields.get(k) for k, v in expect.items() if fields.get(k) != v}
    if wrong:
        print(f"conan inspect: {wrong}, expected {expect}")
        return 1
    print(f"{version}: conan inspect reads fabric/{fields['version']} ({fields['package_type']})")
    return 0


def vcpkg(port_dir, work_dir):
    exe = shutil.which("vcpkg")
    if not exe and os.environ.get("VCPKG_ROOT"):
        candidate = Path(os.environ["VCPKG_ROOT"]) / "vcpkg"
        exe = str(candidate) if candidate.exists() else None
    if not exe:
        return skip("vcpkg is not installed (neither on PATH nor in $VCPKG_ROOT): it is not packaged in "
                    "Debian 12 and bootstrapping it downloads its binary")
    copy = Path(work_dir) / "format-manifest" / "vcpkg.json"
    copy.parent.mkdir(parents=True, exist_ok=True)
    original = (Path(port_dir) / "vcpkg.json").read_text(encoding="utf-8")
    copy.write_text(original, encoding="utf-8")
    run = subprocess.run([exe, "format-manifest", str(copy)], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        print(run.stdout + run.stderr)
        print("vcpkg format-manifest failed")
        return 1
    formatted = copy.read_text(encoding="utf-8")
    if formatted != original:
        print("".join(difflib.unified_diff(original.splitlines(True), formatted.splitlines(True),
                                           "vcpkg.json", "formatted by vcpkg")))
        print("vcpkg format-manifest would change vcpkg.json")
        return 1
    print("vcpkg format-manifest accepts vcpkg.json unchanged")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("conan", "vcpkg"):
        sys.exit(__doc__)
    sys.exit({"conan": conan, "vcpkg": vcpkg}[sys.argv[1]](*sys.argv[2:]))
