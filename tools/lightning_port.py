#!/usr/bin/env python3
"""Accounts for Lightning Fabric's own tests (issue 12: its test suite is fabric's contract).

Every test of the files in tests/lightning/tests_fabric.txt is either mirrored by a fabric test, named in a
comment next to it,

    // Lightning: tests_fabric/test_fabric.py::test_setup_twice_fails

or left out with the reason, in a comment in the test file closest to the subject:

    // Lightning left out: tests_fabric/test_fabric.py::test_setup_compiled_module - torch.compile is Python-only

  lightning_port.py                 prints the count per Lightning file (mirrored, left out, not yet accounted)
  lightning_port.py --list          also lists each test and where it is mirrored or why it is left out
  lightning_port.py --check         fails on a comment naming a test that Lightning does not have, and on a test
                                    that is neither mirrored nor left out
  lightning_port.py --update REPO   rewrites tests/lightning/tests_fabric.txt from a Lightning checkout
"""
import argparse
import ast
import collections
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "tests" / "lightning" / "tests_fabric.txt"
# The files issue 12 names (a folder stands for every test file under it).
SCOPE = [
    "test_fabric.py", "test_wrappers.py", "test_connector.py", "utilities/test_seed.py", "utilities/test_data.py",
    "utilities/test_apply_func.py", "utilities/test_throughput.py", "loggers/test_csv.py", "plugins/precision/",
    "strategies/test_ddp.py", "strategies/launchers/", "plugins/environments/",
    # issue 18 (FSDP, sharded checkpoints)
    "strategies/test_fsdp.py", "strategies/test_fsdp_integration.py", "utilities/test_consolidate_checkpoint.py",
]
MIRROR = re.compile(r"//\s*Lightning:\s*((?:tests_fabric/[\w/]+\.py::\w+[,\s]*)+)")
LEFT_OUT = re.compile(r"//\s*Lightning left out:\s*(tests_fabric/[\w/]+\.py::\w+)\s*[-\u2014:]+\s*(.+)")
NAME = re.compile(r"tests_fabric/[\w/]+\.py::\w+")


def update(repo: pathlib.Path) -> None:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "HEAD", "tests/tests_fabric"],
                           capture_output=True, text=True, check=True).stdout.split()
    lines = [f"# Lightning-AI/pytorch-lightning {commit}: the top-level tests of the files issues 12 and 18 name"]
    for path in sorted(files):
        rel = path.removeprefix("tests/tests_fabric/")
        if not rel.endswith(".py") or not any(rel == s or (s.endswith("/") and rel.startswith(s)) for s in SCOPE):
            continue
        source = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True,
                                check=True).stdout
        for node in ast.parse(source).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                lines.append(f"tests_fabric/{rel}::{node.name}")
    SNAPSHOT.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines) - 1} tests to {SNAPSHOT.relative_to(ROOT)}")


def scan():
    mirrored, left_out = collections.defaultdict(list), {}
    for path in sorted((ROOT / "tests").rglob("*")):
        if path.suffix not in {".cpp", ".hpp", ".py", ".sh", ".cmake", ".txt"} or path == SNAPSHOT:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if m := LEFT_OUT.search(line):
                left_out[m.group(1)] = (m.group(2).strip(), where)
            elif m := MIRROR.search(line):
                for name in NAME.findall(m.group(1)):
                    mirrored[name].append(where)
    return mirrored, left_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--update", type=pathlib.Path, metavar="REPO")
    args = parser.parse_args()
    if args.update:
        update(args.update)
        return 0
    tests = [line for line in SNAPSHOT.read_text().splitlines() if line and not line.startswith("#")]
    known = set(tests)
    scoped = {name.split("::")[0] for name in tests}  # names of other Lightning files are not checked
    mirrored, left_out = scan()
    problems = [f"{where}: names {name}, which Lightning's tests do not have"
                for name, places in mirrored.items() if name not in known and name.split("::")[0] in scoped
                 for where in places]
    problems += [f"{where}: leaves out {name}, which Lightning's tests do not have"
                 for name, (_, where) in left_out.items() if name not in known and name.split("::")[0] in scoped]
    problems += [f"{left_out[name][1]}: {name} is both mirrored ({mirrored[name][0]}) and left out"
                 for name in left_out if name in mirrored]
    per_file = collections.defaultdict(lambda: [0, 0, []])
    for name in tests:
        entry = per_file[name.split("::")[0]]
        if name in mirrored:
            entry[0] += 1
        elif name in left_out:
            entry[1] += 1
        else:
            entry[2].append(name)
    print(f"{'Lightning file':58} {'tests':>5} {'mirrored':>8} {'left out':>8} {'open':>5}")
    totals = [0, 0, 0, 0]
    for file, (m, l, rest) in per_file.items():
        n = m + l + len(rest)
        print(f"{file:58} {n:5} {m:8} {l:8} {len(rest):5}")
        for i, v in enumerate((n, m, l, len(rest))):
            totals[i] += v
    print(f"{'total':58} {totals[0]:5} {totals[1]:8} {totals[2]:8} {totals[3]:5}")
    if args.list:
        for name in tests:
            if name in mirrored:
                print(f"  mirrored  {name}  ({', '.join(mirrored[name])})")
            elif name in left_out:
                print(f"  left out  {name}  ({left_out[name][0]})")
            else:
                print(f"  open      {name}")
    if args.check:
        problems += [f"{name}: neither mirrored nor left out" for _, (_, _, rest) in per_file.items() for name in rest]
    for p in problems:
        print(f"lightning_port: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
