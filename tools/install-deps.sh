#!/usr/bin/env bash
# Installs what fabric needs on Debian 12 (bookworm), only what is missing. Idempotent.
#     tools/install-deps.sh [example|all]
set -euo pipefail

# What each command needs: `example` (tools/example.sh: build and train the Fashion-MNIST example), or all
# of it (tools/test.sh: the tests also need Catch2, Python's torchrun, mpirun, ip, and clang with its libFuzzer).
example=(build-essential cmake ninja-build
         libtorch-dev libgloo-dev libfmt-dev librange-v3-dev nlohmann-json3-dev libcli11-dev zlib1g-dev
         dataset-fashion-mnist)
case "${1:-all}" in
  example)
    need=("${example[@]}")
    backports=()
    ;;
  all)
    need=("${example[@]}" pkg-config git nlohmann-json3-dev python3-torch openmpi-bin iproute2 clang-19 libclang-rt-19-dev)
    backports=(catch2)
    ;;
  *)
    echo "install-deps.sh: expected 'example' or 'all' (the default), found '$1'" >&2
    exit 2
    ;;
esac

missing=()
for p in "${need[@]}" "${backports[@]+"${backports[@]}"}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "fabric: all dependencies already installed"
  exit 0
fi
echo "fabric: installing ${missing[*]}"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive

if [ ${#backports[@]} -gt 0 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "fabric: adding the bookworm-backports suite (for Catch2 v3)"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' |
    $sudo tee /etc/apt/sources.list.d/fabric-backports.sources >/dev/null
fi
$sudo apt-get update -qq
regular=()
for p in "${missing[@]}"; do [[ " ${backports[*]} " == *" $p "* ]] || regular+=("$p"); done
[ ${#regular[@]} -eq 0 ] || $sudo apt-get install -y -qq --no-install-recommends "${regular[@]}"
for p in "${backports[@]}"; do
  [[ " ${missing[*]} " == *" $p "* ]] && $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports "$p"
done
echo "fabric: dependencies installed"
