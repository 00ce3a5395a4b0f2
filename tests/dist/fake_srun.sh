#!/usr/bin/env bash
# Starts N copies of a command with the variables SLURM's srun sets for one node, as srun would.
#     fake_srun.sh N command args...
set -u
n=$1
shift
job=$((1000 + RANDOM % 8000))
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_NTASKS=$n SLURM_NTASKS_PER_NODE=$n SLURM_NNODES=1 SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 \
    SLURM_NODELIST=localhost SLURM_JOB_ID=$job SLURM_JOB_NAME=fabric-test "$@" &
  pids+=($!)
done
code=0
for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
exit $code
