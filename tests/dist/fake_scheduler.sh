#!/usr/bin/env bash
# Starts N copies of a command with the variables of a scheduler that fabric does not know (SCHED_RANK,
# SCHED_SIZE, SCHED_PER_NODE, SCHED_ADDR, SCHED_PORT), for ddp_worker's --env scheduler, an environment
# written outside the library.
#     fake_scheduler.sh N command args...
set -u
n=$1
shift
# shellcheck source=free_port.sh
source "$(dirname "$0")/free_port.sh"
port=$(free_port)
pids=()
for ((i = 0; i < n; i++)); do
  SCHED_RANK=$i SCHED_SIZE=$n SCHED_PER_NODE=$n SCHED_ADDR=127.0.0.1 SCHED_PORT=$port "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
