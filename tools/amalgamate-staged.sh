#!/usr/bin/env bash
# Regenerates single_include/fabric/fabric.hpp from what is staged in git's index (not from the working
# tree), so that a commit's single header matches the commit even while other work is in progress.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git checkout-index -a --prefix="$tmp/"
python3 "$tmp/tools/amalgamate.py" --output single_include/fabric
