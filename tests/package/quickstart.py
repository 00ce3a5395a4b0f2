#!/usr/bin/env python3
"""Runs the README's quick start as a newcomer would: writes the files it shows and runs its commands.

The README marks each block with `<!-- quickstart: NAME -->` on the line before the fence. A NAME with a
dot is a file to write (train.cpp, CMakeLists.txt); any other NAME is a shell block, run with bash in the
work directory, where `fabric` is the source tree and HOME is the work directory's home/ (so `~/.local` is
fresh). The blocks run in the order given; the output must match every --expect.

    quickstart.py --readme README.md --source . --work /tmp/q --blocks train.cpp,single-header --expect accuracy
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys

MARKER = re.compile(r"^<!-- quickstart: (\S+) -->$")


def blocks(readme: pathlib.Path) -> dict:
    found = {}
    lines = readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            name = m.group(1)
            if i + 1 >= len(lines) or not lines[i + 1].startswith("```"):
                sys.exit(f"quickstart: expected a fenced block after the marker {name!r} in {readme}")
            end = i + 2
            while end < len(lines) and lines[end] != "```":
                end += 1
            if end >= len(lines):
                sys.exit(f"quickstart: the block {name!r} in {readme} is not closed")
            if name in found:
                sys.exit(f"quickstart: the block {name!r} appears twice in {readme}")
            found[name] = "\n".join(lines[i + 2 : end]) + "\n"
            i = end
        i += 1
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=pathlib.Path, required=True)
    parser.add_argument("--source", type=pathlib.Path, required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--blocks", required=True, help="comma-separated block names, in order")
    parser.add_argument("--expect", action="append", default=[], help="a regular expression the output must match")
    args = parser.parse_args()

    available = blocks(args.readme)
    wanted = args.blocks.split(",")
    missing = [name for name in wanted if name not in available]
    if missing:
        sys.exit(f"quickstart: expected the blocks {missing} in {args.readme}, found only {sorted(available)}")
    if args.work.exists():
        shutil.rmtree(args.work)
    home = args.work / "home"
    home.mkdir(parents=True)
    (args.work / "fabric").symlink_to(args.source.resolve())
    env = dict(os.environ, HOME=str(home))
    output = []
    for name in wanted:
        text = available[name]
        if "." in name:
            (args.work / name).write_text(text)
            print(f"quickstart: wrote {name}", flush=True)
            continue
        print(f"quickstart: running {name}:\n{text}", flush=True)
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=args.work, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(run.stdout, flush=True)
        output.append(run.stdout)
        if run.returncode != 0:
            print(f"quickstart: FAILED: the block {name!r} exited with {run.returncode}")
            return 1
    text = "".join(output)
    for pattern in args.expect:
        if not re.search(pattern, text):
            print(f"quickstart: FAILED: the output lacks /{pattern}/")
            return 1
    print("quickstart: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
