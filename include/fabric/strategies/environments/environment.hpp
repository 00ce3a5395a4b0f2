#pragma once
// Cluster environments: where the processes of a job come from and who this process is. The
// ClusterEnvironment concept, fabric::Topology (what an environment reports) and the helpers every
// environment reads variables with. Torch-free (fmt, std).

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <concepts>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace fabric {

/// Where this process sits in its job, as a cluster environment reports it.
struct Topology {
  /// The environment that reported it: "lightning", "torchelastic", "slurm", "lsf", "mpi", "kubeflow", ...
  std::string name = "lightning";
  /// Whether a launcher outside this process (torchrun, srun, mpirun, a parent fabric) started the processes.
  bool creates_processes_externally = false;
  /// Processes in the whole job.
  int world_size = 1;
  /// This process's rank among all processes of the job.
  int global_rank = 0;
  /// This process's rank among the processes of its node.
  int local_rank = 0;
  /// This node's rank among the nodes of the job.
  int node_rank = 0;
  /// Address of the rank-zero node, where the process group meets.
  std::string main_address = "127.0.0.1";
  /// Port of the rendezvous on the main address; 0 means not decided yet (chosen by the launcher).
  int main_port = 0;
  /// Whether the launcher already serves the rendezvous store at main_address:main_port (torchrun's agent store,
  /// TORCHELASTIC_USE_AGENT_STORE=True): then every rank, rank zero included, connects to it as a client.
  bool store_hosted_by_launcher = false;
};

/// Looks up an environment variable; returns nothing when it is not set. Environments read through
/// one, so that tests can give them a fake environment.
using EnvLookup = std::function<std::optional<std::string>(std::string_view)>;

namespace detail {

/// The environment names a Lightning-style name (reported in Topology::name and in messages).
template <class E>
concept environment_has_name = requires {
  { E::name } -> std::convertible_to<std::string_view>;
};
/// The environment says whether the variables of this process are its launcher's.
template <class E>
concept environment_detects = requires(const E& e, const EnvLookup& env) {
  { e.detect(env) } -> std::same_as<bool>;
};
/// The environment reads this process's place in the job, given the devices per node and the nodes.
template <class E>
concept environment_reads_topology = requires(const E& e, const EnvLookup& env, int devices, int num_nodes) {
  { e.topology(env, devices, num_nodes) } -> std::same_as<Topology>;
};

}  // namespace detail

/// A cluster environment (Lightning's ClusterEnvironment): it detects its launcher from the
/// variables of this process and reads the ranks, the world size and the rendezvous address from
/// them. fabric checks what it reports against the Fabric's devices and num_nodes.
///
///     struct MyScheduler {
///       static constexpr std::string_view name = "my_scheduler";
///       static bool detect(const fabric::EnvLookup& env) { return env("MY_RANK").has_value(); }
///       fabric::Topology topology(const fabric::EnvLookup& env, int devices, int num_nodes) const;
///     };
template <class E>
concept ClusterEnvironment = std::copy_constructible<E> && detail::environment_has_name<E> &&
    detail::environment_detects<E> && detail::environment_reads_topology<E>;

namespace detail {

/// Fails with one message naming the first member a cluster environment lacks; true when it has all.
template <class E>
consteval bool check_environment() {
  if constexpr (!std::copy_constructible<E>) {
    static_assert(dependent_false_v<E>, "fabric: a ClusterEnvironment must be copy constructible");
  } else if constexpr (!environment_has_name<E>) {
    static_assert(dependent_false_v<E>,
                  "fabric: a ClusterEnvironment needs `static constexpr std::string_view name`; add the name "
                  "reported in messages");
  } else if constexpr (!environment_detects<E>) {
    static_assert(dependent_false_v<E>,
                  "fabric: a ClusterEnvironment needs `bool detect(const fabric::EnvLookup&) const` (or static), "
                  "which says whether this process was started by its launcher; add it");
  } else if constexpr (!environment_reads_topology<E>) {
    static_assert(dependent_false_v<E>,
                  "fabric: a ClusterEnvironment needs `fabric::Topology topology(const fabric::EnvLookup&, int "
                  "devices, int num_nodes) const`, which reads this process's ranks; add it");
  }
  return ClusterEnvironment<E>;
}

/// The lookup environments read through (fabric::EnvLookup).
using EnvLookup = ::fabric::EnvLookup;

/// Reads a variable of this process's environment with getenv.
inline std::optional<std::string> getenv_lookup(std::string_view name) {
  const char* value = std::getenv(std::string(name).c_str());
  if (value == nullptr) return std::nullopt;
  return std::string(value);
}

/// Parses the whole of `text` as a base-10 integer; returns nothing on any other text.
inline std::optional<long long> parse_integer(std::string_view text) {
  long long value = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first != last && *first == '+') ++first;
  auto [end, error] = std::from_chars(first, last, value);
  if (error != std::errc{} || end != last || first == last) return std::nullopt;
  return value;
}

/// Reads a non-negative integer variable; raises naming the variable and its text when it is not one.
inline std::optional<int> env_int(const EnvLookup& env, std::string_view name) {
  auto text = env(name);
  if (!text) return std::nullopt;
  auto value = parse_integer(*text);
  if (!value) {
    raise("expected the environment variable {} to be an integer, found {:?}; set it to a whole number or unset it",
          name, *text);
  }
  if (*value < 0 || *value > 0x7fffffff) {
    raise(
        "expected the environment variable {} to be a non-negative integer, found {}; fix the launcher or job "
        "script that sets it",
        name, *value);
  }
  return static_cast<int>(*value);
}

/// Reads an integer variable that a launcher must have set; raises when it is missing.
inline int env_required_int(const EnvLookup& env, std::string_view name, std::string_view launcher) {
  auto value = env_int(env, name);
  if (!value) {
    raise(
        "expected the environment variable {} to be set by {}, found it unset; start the job with {} or unset the "
        "variables that made fabric detect it",
        name, launcher, launcher);
  }
  return *value;
}

/// Reads a port variable; raises when it is not in 1..65535.
inline std::optional<int> env_port(const EnvLookup& env, std::string_view name) {
  auto text = env(name);
  if (!text) return std::nullopt;
  auto value = parse_integer(*text);
  if (!value) {
    raise("expected the environment variable {} to be a port number, found {:?}; set it to a port in 1..65535", name,
          *text);
  }
  if (*value < 1 || *value > 65535) {
    raise("expected the environment variable {} to be a port in 1..65535, found {}; choose a free port in that range",
          name, *value);
  }
  return static_cast<int>(*value);
}

/// Derives a rendezvous port in 20000..39999 from a job id, the same on every process of the job (FNV-1a).
inline int port_from_job_id(std::string_view job_id) {
  std::uint64_t hash = 14695981039346656037ull;
  for (unsigned char c : job_id) hash = (hash ^ c) * 1099511628211ull;
  return 20000 + static_cast<int>(hash % 20000);
}

/// Checks the ranks and the world size against the Options; raises with the flags to change.
inline void validate_environment(const Topology& e, int devices, int num_nodes) {
  if (e.world_size != devices * num_nodes) {
    raise(
        "expected the world size started by {} to equal devices * num_nodes = {} * {} = {}, found {}; make them "
        "match: change Options::devices / Options::num_nodes, or the launcher's flags (fabric-run --devices / "
        "--num-nodes, torchrun --nproc-per-node / --nnodes, srun --ntasks-per-node / --nodes, mpirun -np)",
        e.name, devices, num_nodes, devices * num_nodes, e.world_size);
  }
  if (e.local_rank >= devices) {
    raise(
        "expected the local rank to be below devices = {}, found local rank {} ({}); set Options::devices to the "
        "number of processes per node",
        devices, e.local_rank, e.name);
  }
  if (e.node_rank >= num_nodes) {
    raise(
        "expected the node rank to be below num_nodes = {}, found node rank {} ({}); set Options::num_nodes to the "
        "number of machines, or fix NODE_RANK",
        num_nodes, e.node_rank, e.name);
  }
  if (e.global_rank >= e.world_size) {
    raise(
        "expected the global rank to be below the world size {}, found rank {} ({}); fix the launcher's rank "
        "variables",
        e.world_size, e.global_rank, e.name);
  }
  if (e.main_port != 0 && (e.main_port < 1 || e.main_port > 65535)) {
    raise("expected a main port in 1..65535, found {}; set MASTER_PORT to a free port", e.main_port);
  }
}

/// Raises when a multi-node job has no MASTER_ADDR: every node would look for rank zero on itself.
inline void require_main_address(const EnvLookup& env, std::string_view environment, int num_nodes) {
  if (num_nodes > 1 && !env("MASTER_ADDR")) {
    raise(
        "expected MASTER_ADDR to be set for a job on {} nodes ({}), found it unset; export MASTER_ADDR=<host of "
        "node rank 0> on every node",
        num_nodes, environment);
  }
}

}  // namespace detail
}  // namespace fabric
