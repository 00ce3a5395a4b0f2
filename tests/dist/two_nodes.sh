#!/usr/bin/env bash
# Runs a job on two simulated machines: two Linux network namespaces joined by a veth pair, each "node" with
# its own interface and address, and one launcher per node started inside its namespace, as on two hosts.
#     two_nodes.sh [--fail-within S] [--expect REGEX]... [--partition] LAUNCHER -- WORKER ARGS...
# LAUNCHER is one of
#     fabric-run PATH   fabric-run --num-nodes 2 --node-rank R --main-address A --main-port P --devices 2
#     torchrun PATH     torchrun --nnodes 2 --node_rank R --nproc_per_node 2 --rdzv_backend static
#                       --master_addr A --master_port P (TorchElastic's agent on node 0 serves the store)
#     slurm             this script plays srun on each node: SLURM_* variables of two nodes of two tasks
#                       (MASTER_ADDR is node 0's address; the port comes from SLURM_JOB_ID)
# WORKER ARGS are run on each node under its launcher with `--tag T` appended (T names this run's processes),
# GLOO_SOCKET_IFNAME set to the node's interface and OMP_NUM_THREADS=1.
#
# Without --fail-within: passes when both nodes exit 0. With --fail-within S: passes when both nodes exit
# non-zero within S seconds of the start. Either way every --expect REGEX must match the output (each line is
# prefixed with "[nodeR] "), and no process may be left in the namespaces (or anywhere with the tag) once the
# launchers have ended. The namespaces are deleted at exit, whatever happens.
# --partition: once node 1's processes hold their Gloo connections to node 0 (and a second more, so that
# training runs), node 1's interface goes down: it vanishes from the network without closing its connections
# (no FIN, no RST), as a machine that loses power or its link; only the timeouts can stop the job then.
# Exits 77 (the tests' SKIP_RETURN_CODE) when network namespaces cannot be made here (root or CAP_NET_ADMIN and
# CAP_SYS_ADMIN are needed), saying why.
set -u

nodes=2
per_node=2

# --slurm-node R MAIN JOB -- COMMAND...: srun's part on node R (run inside its namespace): starts the node's
# tasks with SLURM's variables and, as srun without --kill-on-bad-exit, waits for all of them.
if [ "${1:-}" = "--slurm-node" ]; then
  node=$2 main=$3 job=$4
  shift 5
  pids=()
  for ((local = 0; local < per_node; local++)); do
    SLURM_NTASKS=$((nodes * per_node)) SLURM_NTASKS_PER_NODE=$per_node SLURM_NNODES=$nodes \
      SLURM_PROCID=$((node * per_node + local)) SLURM_LOCALID=$local SLURM_NODEID=$node \
      SLURM_NODELIST="fabric-node[0-$((nodes - 1))]" SLURM_JOB_ID=$job SLURM_JOB_NAME=fabric-test \
      MASTER_ADDR=$main "$@" &
    pids+=($!)
  done
  code=0
  for pid in "${pids[@]}"; do wait "$pid" || code=$?; done
  exit $code
fi

usage() {
  echo "usage: two_nodes.sh [--fail-within S] [--expect REGEX]... [--partition] fabric-run PATH|torchrun PATH|slurm" \
    "-- WORKER ARGS..." >&2
  exit 2
}
fail_within=""
expects=()
partition=false
while [ $# -gt 0 ]; do
  case $1 in
  --fail-within) fail_within=$2 && shift 2 ;;
  --expect) expects+=("$2") && shift 2 ;;
  --partition) partition=true && shift ;;
  *) break ;;
  esac
done
[ $# -ge 1 ] || usage
launcher=$1
launcher_path=""
case $launcher in
fabric-run | torchrun)
  [ $# -ge 2 ] || usage
  launcher_path=$2
  shift 2
  ;;
slurm) shift ;;
*) usage ;;
esac
[ "${1:-}" = "--" ] || usage
shift
[ $# -ge 1 ] || usage
worker=("$@")

self=$(readlink -f "$0")
run_id="$$-$RANDOM"
tag="fabric-two-nodes-$run_id"
subnet=$((1 + (RANDOM + $$) % 250))
port=29500  # NOTE: the namespaces have their own port spaces: no clash with the host or with concurrent runs
namespaces=()
addresses=()
ifnames=()
running=()  # the nodes' pids (each its process group) not yet reaped
timer=""
logs_shown=false
tmp=$(mktemp -d "${FABRIC_TEST_TMP:-${TMPDIR:-/tmp}}/two_nodes.XXXXXX") || exit 1

now_ms() { echo $(($(date +%s%N) / 1000000)); }

show_logs() {
  $logs_shown && return
  logs_shown=true
  for ((r = 0; r < nodes; r++)); do
    [ -f "$tmp/node$r.log" ] && sed "s/^/[node$r] /" "$tmp/node$r.log"
  done
}

# Kills what is left (each launcher's process group, then whatever is still in the namespaces), deletes the
# namespaces and the temporary directory. Runs at every exit.
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  [ -n "$timer" ] && kill "$timer" 2>/dev/null
  show_logs
  for pid in "${running[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
  [ ${#running[@]} -eq 0 ] || { wait "${running[@]}"; } 2>/dev/null
  for ns in "${namespaces[@]}"; do
    local left
    left=$(ip netns pids "$ns" 2>/dev/null)
    # shellcheck disable=SC2086 # one pid per word
    [ -z "$left" ] || kill -KILL $left 2>/dev/null
    ip netns del "$ns" 2>/dev/null || echo "two_nodes: could not delete the network namespace $ns"
  done
  rm -rf "$tmp"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

skip() {
  echo "two_nodes: SKIPPED: $*"
  exit 77
}
fail() {
  show_logs
  echo "two_nodes: FAILED: $*"
  exit 1
}

# The two hosts: namespaces fabric-node0-ID and fabric-node1-ID, a veth pair fab0 <-> fab1 made directly inside
# them (no name in the host's namespace), 10.77.SUBNET.1 and .2, loopback up in each.
command -v ip >/dev/null || skip "no \`ip\` command here (Debian's iproute2; tools/install-deps.sh installs it)"
for ((r = 0; r < nodes; r++)); do
  ns="fabric-node$r-$run_id"
  if ! out=$(ip netns add "$ns" 2>&1); then
    skip "cannot create a network namespace here (\`ip netns add $ns\`: $out); it needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN"
  fi
  namespaces+=("$ns")
  addresses+=("10.77.$subnet.$((r + 1))")
  ifnames+=("fab$r")
done
out=$(ip link add "${ifnames[0]}" netns "${namespaces[0]}" type veth peer name "${ifnames[1]}" netns "${namespaces[1]}" 2>&1) ||
  skip "cannot create a veth pair between the namespaces (\`ip link add ... type veth\`: $out)"
for ((r = 0; r < nodes; r++)); do
  ns=${namespaces[r]}
  out=$({ ip -n "$ns" link set lo up && ip -n "$ns" addr add "${addresses[r]}/24" dev "${ifnames[r]}" &&
    ip -n "$ns" link set "${ifnames[r]}" up; } 2>&1) || fail "cannot configure the namespace $ns: $out"
  out=$(ip netns exec "$ns" true 2>&1) || skip "cannot run a process in a network namespace (\`ip netns exec\`: $out)"
done
main=${addresses[0]}
echo "two_nodes: node 0 = $main (${ifnames[0]} in ${namespaces[0]}), node 1 = ${addresses[1]} (${ifnames[1]} in" \
  "${namespaces[1]}); $launcher, $per_node processes per node"

job=$((1000 + RANDOM % 8000))
node_command() {
  local r=$1
  case $launcher in
  fabric-run)
    cmd=("$launcher_path" --num-nodes "$nodes" --node-rank "$r" --main-address "$main" --main-port "$port"
      --devices "$per_node" -- "${worker[@]}" --tag "$tag")
    ;;
  torchrun)
    cmd=("$launcher_path" --nnodes "$nodes" --node_rank "$r" --nproc_per_node "$per_node" --rdzv_backend static
      --master_addr "$main" --master_port "$port" --redirects 1 --tee 1 --log_dir "$tmp/torchrun-node$r"
      --no_python "${worker[@]}" --tag "$tag")
    ;;
  slurm) cmd=("$self" --slurm-node "$r" "$main" "$job" -- "${worker[@]}" --tag "$tag") ;;
  esac
}
# The rendezvous store's port on node 0: fabric's SLURM environment takes the job id's last 4 digits + 15000.
store_port=$port
[ "$launcher" != slurm ] || store_port=$((15000 + job))

# Node 1's established connections to node 0 other than those to the store: its Gloo pairs with node 0's ranks.
pairs_to_node0() {
  ip netns exec "${namespaces[1]}" ss -Htn state established dst "$main" and not dport = ":$store_port" | wc -l
}

# Each node in a session of its own (setsid: its pid is its process group), inside its namespace.
declare -A node_of
start_ms=$(now_ms)
for ((r = 0; r < nodes; r++)); do
  node_command "$r"
  setsid ip netns exec "${namespaces[r]}" env GLOO_SOCKET_IFNAME="${ifnames[r]}" OMP_NUM_THREADS=1 "${cmd[@]}" \
    >"$tmp/node$r.log" 2>&1 </dev/null &
  running+=($!)
  node_of[$!]=$r
done

cut_ms=""
if $partition; then
  for ((i = 0; i < 300; i++)); do
    [ "$(pairs_to_node0)" -ge $((per_node * per_node)) ] && break
    for pid in "${running[@]}"; do kill -0 "$pid" 2>/dev/null || fail "node ${node_of[$pid]} ended before the partition"; done
    sleep 0.1
  done
  [ "$(pairs_to_node0)" -ge $((per_node * per_node)) ] || fail "node 1's processes did not connect to node 0's"
  sleep 1
  ip -n "${namespaces[1]}" link set "${ifnames[1]}" down || fail "cannot take ${ifnames[1]} down"
  cut_ms=$(($(now_ms) - start_ms))
  echo "two_nodes: node 1's link went down after $cut_ms ms"
fi

# Wait for both nodes, or for the limit: the failure's limit, else well below CTest's TIMEOUT of 180 s so that
# this script (and its cleanup) always ends first.
limit=${fail_within:-120}
sleep "$limit" &
timer=$!
codes=()
elapsed=()
hung=false
for ((n = 0; n < nodes; n++)); do
  done_pid=""
  wait -n -p done_pid "${running[@]}" "$timer"
  code=$?
  if [ "$done_pid" = "$timer" ]; then
    hung=true
    break
  fi
  [ -n "$done_pid" ] || fail "wait failed with code $code"
  r=${node_of[$done_pid]}
  for i in "${!running[@]}"; do [ "${running[i]}" != "$done_pid" ] || unset "running[i]"; done
  codes[r]=$code
  elapsed[r]=$(($(now_ms) - start_ms))
done
kill "$timer" 2>/dev/null
timer=""
show_logs
for ((r = 0; r < nodes; r++)); do
  if [ -n "${codes[r]:-}" ]; then
    echo "two_nodes: node $r exited with code ${codes[r]} after ${elapsed[r]} ms${cut_ms:+ ($((elapsed[r] - cut_ms)) ms after the partition)}"
  else
    echo "two_nodes: node $r was still running after $limit s"
  fi
done
if $hung; then
  ps -o pid,args -p "$(for ns in "${namespaces[@]}"; do ip netns pids "$ns"; done | paste -sd,)" 2>/dev/null
  fail "a node did not end within $limit s"
fi
output=$(for ((r = 0; r < nodes; r++)); do sed "s/^/[node$r] /" "$tmp/node$r.log"; done)

# Nothing may outlive the launchers (the kernel may take a moment to reap what they killed).
left=""
for ((i = 0; i < 20; i++)); do
  left=$(for ns in "${namespaces[@]}"; do ip netns pids "$ns"; done; pgrep -f -- "$tag")
  [ -z "$left" ] && break
  sleep 0.1
done
if [ -n "$left" ]; then
  ps -o pid,args -p "$(paste -sd, <<<"$left")" 2>/dev/null
  fail "processes were left behind after the launchers ended"
fi

for ((r = 0; r < nodes; r++)); do
  if [ -n "$fail_within" ]; then
    [ "${codes[r]}" -ne 0 ] || fail "node $r succeeded, but the job must fail"
  else
    [ "${codes[r]}" -eq 0 ] || fail "node $r exited with code ${codes[r]}"
  fi
done
for regex in "${expects[@]}"; do
  grep -qE -- "$regex" <<<"$output" || fail "the output lacks /$regex/"
done
echo "two_nodes: ok"
