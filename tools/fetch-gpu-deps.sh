#!/usr/bin/env bash
# Prepares .deps/ for the GPU machine (Ubuntu 24.04 with the PyTorch wheel, no network): the header-only
# libraries it lacks — range-v3, CLI11, nlohmann-json — unpacked from Debian's packages into .deps/root, which
# tools/gpu.sh puts on CMAKE_PREFIX_PATH; and the Fashion-MNIST files into .deps/fashion-mnist. Run it here,
# from anywhere in the repository, then carry ".deps" to the GPU machine.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
grep -qxF '/.deps/' .git/info/exclude 2>/dev/null || echo '/.deps/' >> .git/info/exclude
mkdir -p .deps/debs .deps/fashion-mnist
(cd .deps/debs && for pkg in librange-v3-dev libcli11-dev nlohmann-json3-dev; do
  ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get download "$pkg" 2>/dev/null
done)
for f in .deps/debs/*.deb; do dpkg -x "$f" .deps/root; done
# NOTE: the range-v3 package ships usr/include/std/iterator, which shadows g++ 13's <iterator>.
[ -e .deps/root/usr/include/std/iterator ] && mv .deps/root/usr/include/std/iterator .deps/iterator-aside
cp -n /usr/share/datasets/fashion-mnist/* .deps/fashion-mnist/ 2>/dev/null || true
echo "fetch-gpu-deps: .deps/root/usr (range-v3, CLI11, nlohmann-json) and .deps/fashion-mnist are ready"
