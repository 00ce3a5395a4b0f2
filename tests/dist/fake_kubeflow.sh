#!/usr/bin/env bash
# Starts N copies of a command as the pods of a Kubeflow PyTorchJob would run them: one process per pod, with
# KUBERNETES_PORT, MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK set by the operator.
#     fake_kubeflow.sh N command args...
set -u
n=$1
shift
# shellcheck source=free_port.sh
source "$(dirname "$0")/free_port.sh"
port=$(free_port)
pids=()
for ((i = 0; i < n; i++)); do
  # NOTE: each pod is a node of its own, so Gloo picks its interface by name here (the pods share a loopback).
  KUBERNETES_PORT=tcp://10.0.0.1:443 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=$n RANK=$i \
    GLOO_SOCKET_IFNAME=lo "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
