#!/usr/bin/env python3
"""Checks the overlay port's vcpkg.json (the fields vcpkg reads, the dependencies and the features that
forward to LibTorch's), its usage file, and that the fabric options its portfile passes exist in the
top-level CMakeLists.txt.

usage: check_vcpkg_manifest.py PORT_DIR SOURCE_DIR EXPECTED_VERSION
"""
import json
import re
import sys
from pathlib import Path

# The fields vcpkg.json may have (vcpkg rejects others, except those starting with "$").
KNOWN_FIELDS = {
    "name", "version", "version-semver", "version-date", "version-string", "port-version", "maintainers",
    "description", "homepage", "documentation", "license", "supports", "dependencies", "default-features",
    "features", "overrides", "builtin-baseline", "vcpkg-configuration",
}
DEPENDENCY_FIELDS = {"name", "host", "features", "default-features", "platform", "version>="}
# The libtorch port's features that fabric's features forward to (microsoft/vcpkg ports/libtorch/vcpkg.json).
FORWARDED = {"cuda": "cuda", "dist": "dist"}


def dependency_names(deps):
    return [d if isinstance(d, str) else d.get("name") for d in deps]


def main(port_dir, source_dir, expected_version):
    port_dir, source_dir = Path(port_dir), Path(source_dir)
    problems = []
    try:
        manifest = json.loads((port_dir / "vcpkg.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"vcpkg.json: not valid JSON: {error}")
        return 1

    unknown = {k for k in manifest if not k.startswith("$")} - KNOWN_FIELDS
    if unknown:
        problems.append(f"unknown fields {sorted(unknown)}")
    if manifest.get("name") != "fabric":
        problems.append(f"name is {manifest.get('name')!r}, not 'fabric'")
    if manifest.get("version") != expected_version:
        problems.append(f"version is {manifest.get('version')!r}, the project's is {expected_version!r}")
    for field in ("description", "homepage"):
        if not isinstance(manifest.get(field), str) or not manifest[field].strip():
            problems.append(f"{field} missing or empty")
    if "fabric" not in manifest.get("homepage", ""):
        problems.append("homepage does not point at the project")
    if "license" not in manifest or not (manifest["license"] is None or isinstance(manifest["license"], str)):
        problems.append("license must be an SPDX expression or null")

    deps = manifest.get("dependencies", [])
    for dep in deps:
        if isinstance(dep, dict) and set(dep) - DEPENDENCY_FIELDS:
            problems.append(f"dependency {dep.get('name')!r} has unknown fields {sorted(set(dep) - DEPENDENCY_FIELDS)}")
    names = dependency_names(deps)
    for name in ("fmt", "range-v3", "nlohmann-json", "libtorch", "vcpkg-cmake", "vcpkg-cmake-config"):
        if names.count(name) != 1:
            problems.append(f"dependency {name!r} listed {names.count(name)} times, expected once")
    for dep in deps:
        name = dep if isinstance(dep, str) else dep.get("name")
        host = isinstance(dep, dict) and dep.get("host", False)
        if name in ("vcpkg-cmake", "vcpkg-cmake-config") and not host:
            problems.append(f"{name} must be a host dependency")
        if name in ("fmt", "range-v3", "nlohmann-json", "libtorch") and host:
            problems.append(f"{name} must be a target dependency, not a host one")

    features = manifest.get("features", {})
    for feature, torch_feature in FORWARDED.items():
        spec = features.get(feature)
        if spec is None:
            problems.append(f"feature {feature!r} missing")
            continue
        if not spec.get("description"):
            problems.append(f"feature {feature!r} has no description")
        forwards = [d for d in spec.get("dependencies", [])
                    if isinstance(d, dict) and d.get("name") == "libtorch" and torch_feature in d.get("features", [])]
        if not forwards:
            problems.append(f"feature {feature!r} does not turn on libtorch[{torch_feature}]")
    if set(features) - set(FORWARDED):
        problems.append(f"unexpected features {sorted(set(features) - set(FORWARDED))}")

    usage = (port_dir / "usage").read_text(encoding="utf-8") if (port_dir / "usage").exists() else ""
    for text in ("find_package(fabric CONFIG REQUIRED)", "fabric::fabric"):
        if text not in usage:
            problems.append(f"usage does not say {text}")

    # The portfile's -DFABRIC_... options must be options of the top-level CMakeLists.txt.
    portfile = (port_dir / "portfile.cmake").read_text(encoding="utf-8")
    passed = set(re.findall(r"-D(FABRIC_[A-Z0-9_]+)=", portfile))
    declared = set(re.findall(r"option\(\s*(FABRIC_[A-Z0-9_]+)", (source_dir / "CMakeLists.txt").read_text(encoding="utf-8")))
    if not passed:
        problems.append("the portfile passes no FABRIC_ options")
    if passed - declared:
        problems.append(f"the portfile passes {sorted(passed - declared)}, which CMakeLists.txt does not declare")

    if problems:
        print("vcpkg.json / port problems:\n  " + "\n  ".join(problems))
        return 1
    print(f"vcpkg port: fabric {manifest['version']}, dependencies {names}, features "
          + ", ".join(f"{f} -> libtorch[{t}]" for f, t in FORWARDED.items())
          + f"; portfile options {sorted(passed)} all declared")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
