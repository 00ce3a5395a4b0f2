#!/usr/bin/env bash
# Starts N copies of a command as the N nodes of one job on this host, as `fabric run --num-nodes N` on each
# node would: NODE_RANK 0..N-1, one MASTER_ADDR and MASTER_PORT; each copy launches its --devices processes.
#     fake_nodes.sh N command args...
set -u
n=$1
shift
# shellcheck source=free_port.sh
source "$(dirname "$0")/free_port.sh"
port=$(free_port)
pids=()
for ((i = 0; i < n; i++)); do
  # NOTE: the nodes share the loopback, so Gloo is told to use it (it picks an interface by host name otherwise).
  NODE_RANK=$i MASTER_ADDR=127.0.0.1 MASTER_PORT=$port GLOO_SOCKET_IFNAME=lo "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
