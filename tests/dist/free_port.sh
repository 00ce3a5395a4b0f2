# Sourced by the fake_*.sh launchers: prints a TCP port for a test's rendezvous store, below Linux's
# ephemeral range (32768-60999: the client sockets of concurrently running tests take ports there, and a
# store that binds one of them fails with "Address already in use") and, where /proc/net/tcp tells, not
# bound on this host now.
free_port() {
  local port hex try
  for ((try = 0; try < 50; try++)); do
    port=$((20000 + RANDOM % 9000))
    hex=$(printf ':%04X ' "$port")
    if ! grep -qs "$hex" /proc/net/tcp /proc/net/tcp6; then break; fi
  done
  echo "$port"
}
