#pragma once
// Cluster environments: where the processes of a job come from and who this process is. Torch-free (fmt, std,
// POSIX sockets).

#include "fabric/config.hpp"
#include "fabric/error.hpp"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fabric {

/// Describes where the processes of a job come from and who this process is.
struct ClusterEnvironment {
  /// The detected environment: "lightning", "torchelastic", "slurm" or "mpi".
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

namespace detail {

/// Looks up an environment variable; returns nothing when it is not set.
using EnvLookup = std::function<std::optional<std::string>(std::string_view)>;

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

/// Expands a SLURM host list such as `node[001-004,007],gpu5` into host names, in order.
inline std::vector<std::string> expand_slurm_nodelist(std::string_view list) {
  std::vector<std::string> hosts;
  // Split on the commas outside brackets.
  std::vector<std::string_view> items;
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || (list[i] == ',' && depth == 0)) {
      if (i > start) items.push_back(list.substr(start, i - start));
      start = i + 1;
    } else if (list[i] == '[') {
      ++depth;
    } else if (list[i] == ']') {
      if (--depth < 0) raise("expected balanced brackets in the SLURM node list, found {:?}", list);
    }
  }
  if (depth != 0) raise("expected balanced brackets in the SLURM node list, found {:?}", list);
  for (auto item : items) {
    auto open = item.find('[');
    if (open == std::string_view::npos) {
      hosts.emplace_back(item);
      continue;
    }
    auto close = item.find(']', open);
    auto prefix = item.substr(0, open);
    auto ranges = item.substr(open + 1, close - open - 1);
    // The suffix may hold more bracket groups (`rack[1-2]-n[1-2]`): expand it recursively.
    auto suffixes =
        close + 1 < item.size() ? expand_slurm_nodelist(item.substr(close + 1)) : std::vector<std::string>{""};
    std::size_t from = 0;
    while (from <= ranges.size()) {
      auto comma = ranges.find(',', from);
      if (comma == std::string_view::npos) comma = ranges.size();
      auto range = ranges.substr(from, comma - from);
      from = comma + 1;
      auto dash = range.find('-');
      auto low_text = range.substr(0, dash);
      auto high_text = dash == std::string_view::npos ? low_text : range.substr(dash + 1);
      auto low = parse_integer(low_text);
      auto high = parse_integer(high_text);
      if (!low || !high || *low > *high || *low < 0) {
        raise("expected ranges like 001-004 in the SLURM node list, found {:?} in {:?}", range, list);
      }
      for (long long n = *low; n <= *high; ++n) {
        // Zero padding follows the width of the lower bound, as SLURM writes it.
        auto number = fmt::format("{:0{}}", n, low_text.size());
        for (const auto& suffix : suffixes) hosts.push_back(fmt::format("{}{}{}", prefix, number, suffix));
      }
    }
  }
  return hosts;
}

/// Returns the first host of a SLURM host list (the main node), or nothing for an empty list.
inline std::optional<std::string> first_slurm_host(std::string_view list) {
  auto hosts = expand_slurm_nodelist(list);
  if (hosts.empty()) return std::nullopt;
  return hosts.front();
}

/// Derives a rendezvous port in 20000..39999 from a job id, the same on every process of the job (FNV-1a).
inline int port_from_job_id(std::string_view job_id) {
  std::uint64_t hash = 14695981039346656037ull;
  for (unsigned char c : job_id) hash = (hash ^ c) * 1099511628211ull;
  return 20000 + static_cast<int>(hash % 20000);
}

/// Checks the ranks and the world size against the Options; raises with the flags to change.
inline void validate_environment(const ClusterEnvironment& e, int devices, int num_nodes) {
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

/// Detects torchrun / torch elastic (TORCHELASTIC_RUN_ID set); reads WORLD_SIZE, RANK, LOCAL_RANK, GROUP_RANK.
inline std::optional<ClusterEnvironment> detect_torchelastic(int devices, int num_nodes, const EnvLookup& env) {
  if (!env("TORCHELASTIC_RUN_ID")) return std::nullopt;
  ClusterEnvironment e;
  e.name = "torchelastic";
  e.creates_processes_externally = true;
  e.world_size = env_required_int(env, "WORLD_SIZE", "torchrun");
  e.global_rank = env_required_int(env, "RANK", "torchrun");
  e.local_rank = env_required_int(env, "LOCAL_RANK", "torchrun");
  auto group = env_int(env, "GROUP_RANK");
  e.node_rank = group ? *group : env_int(env, "NODE_RANK").value_or(0);
  require_main_address(env, e.name, num_nodes);
  e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
  e.main_port = env_port(env, "MASTER_PORT").value_or(12910);
  e.store_hosted_by_launcher = env("TORCHELASTIC_USE_AGENT_STORE") == std::optional<std::string>("True");
  validate_environment(e, devices, num_nodes);
  return e;
}

/// Detects a SLURM task (SLURM_NTASKS set, SLURM_JOB_NAME not bash/interactive); address from SLURM_NODELIST.
inline std::optional<ClusterEnvironment> detect_slurm(int devices, int num_nodes, const EnvLookup& env) {
  if (!env("SLURM_NTASKS")) return std::nullopt;
  auto job_name = env("SLURM_JOB_NAME");
  if (job_name && (*job_name == "bash" || *job_name == "interactive")) return std::nullopt;
  ClusterEnvironment e;
  e.name = "slurm";
  e.creates_processes_externally = true;
  e.world_size = env_required_int(env, "SLURM_NTASKS", "srun");
  e.global_rank = env_required_int(env, "SLURM_PROCID", "srun");
  e.local_rank = env_required_int(env, "SLURM_LOCALID", "srun");
  e.node_rank = env_required_int(env, "SLURM_NODEID", "srun");
  if (auto per_node = env_int(env, "SLURM_NTASKS_PER_NODE"); per_node && *per_node != devices) {
    raise(
        "expected SLURM_NTASKS_PER_NODE to equal devices = {}, found {}; set `#SBATCH --ntasks-per-node={}` or "
        "Options{{.devices = {}}}",
        devices, *per_node, devices, *per_node);
  }
  if (auto nodes = env_int(env, "SLURM_NNODES"); nodes && *nodes != num_nodes) {
    raise(
        "expected SLURM_NNODES to equal num_nodes = {}, found {}; set `#SBATCH --nodes={}` or "
        "Options{{.num_nodes = {}}}",
        num_nodes, *nodes, num_nodes, *nodes);
  }
  if (auto address = env("MASTER_ADDR")) {
    e.main_address = *address;
  } else {
    auto list = env("SLURM_NODELIST");
    if (!list) list = env("SLURM_JOB_NODELIST");
    std::optional<std::string> host = list ? first_slurm_host(*list) : std::nullopt;
    if (!host && num_nodes > 1) require_main_address(env, e.name, num_nodes);
    e.main_address = host.value_or("127.0.0.1");
  }
  if (auto port = env_port(env, "MASTER_PORT")) {
    e.main_port = *port;
  } else if (auto job_id = env("SLURM_JOB_ID")) {
    auto digits = std::string_view(*job_id);
    if (digits.size() > 4) digits = digits.substr(digits.size() - 4);
    auto last = parse_integer(digits);
    if (!last || *last < 0) {
      raise("expected SLURM_JOB_ID to be a number, found {:?}; set MASTER_PORT to choose the port yourself", *job_id);
    }
    e.main_port = static_cast<int>(*last) + 15000;
  } else {
    e.main_port = 12910;
  }
  validate_environment(e, devices, num_nodes);
  return e;
}

/// Detects mpirun (OpenMPI OMPI_COMM_WORLD_*, MPICH/Intel PMI_* and MPI_LOCAL*) when it started more than one process.
inline std::optional<ClusterEnvironment> detect_mpi(int devices, int num_nodes, const EnvLookup& env) {
  std::optional<int> size, rank, local_rank, local_size;
  if (env("OMPI_COMM_WORLD_SIZE")) {
    size = env_int(env, "OMPI_COMM_WORLD_SIZE");
    rank = env_required_int(env, "OMPI_COMM_WORLD_RANK", "mpirun");
    local_rank = env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK");
    local_size = env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE");
  } else if (env("PMI_SIZE")) {
    size = env_int(env, "PMI_SIZE");
    if (size.value_or(0) > 1) rank = env_required_int(env, "PMI_RANK", "mpirun");
    local_rank = env_int(env, "MPI_LOCALRANKID");
    local_size = env_int(env, "MPI_LOCALNRANKS");
  }
  if (!size || *size <= 1) return std::nullopt;
  ClusterEnvironment e;
  e.name = "mpi";
  e.creates_processes_externally = true;
  e.world_size = *size;
  e.global_rank = *rank;
  int per_node = local_size.value_or(devices);
  if (per_node != devices) {
    raise(
        "expected mpirun to start devices = {} processes per node, found a local size of {}; set "
        "Options{{.devices = {}}} or start {} per node (OpenMPI: mpirun --map-by ppr:{}:node, MPICH: -ppn {})",
        devices, per_node, per_node, devices, devices, devices);
  }
  e.local_rank = local_rank.value_or(e.global_rank % per_node);
  e.node_rank = e.global_rank / per_node;
  require_main_address(env, e.name, num_nodes);
  e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
  if (auto port = env_port(env, "MASTER_PORT")) {
    e.main_port = *port;
  } else {
    auto job = env("OMPI_MCA_ess_base_jobid");
    if (!job) job = env("PMIX_NAMESPACE");
    if (!job) job = env("PMI_JOBID");
    if (!job) job = env("PMIX_ID");
    e.main_port = job ? port_from_job_id(*job) : 12910;
  }
  validate_environment(e, devices, num_nodes);
  return e;
}

/// Reads the default (Lightning) environment: this process launches the others unless LOCAL_RANK is set.
inline ClusterEnvironment detect_lightning(int devices, int num_nodes, const EnvLookup& env) {
  ClusterEnvironment e;
  e.name = "lightning";
  auto local_rank = env_int(env, "LOCAL_RANK");
  e.creates_processes_externally = local_rank.has_value();
  e.local_rank = local_rank.value_or(0);
  auto node = env_int(env, "NODE_RANK");
  e.node_rank = node ? *node : env_int(env, "GROUP_RANK").value_or(0);
  require_main_address(env, e.name, num_nodes);
  e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
  e.main_port = env_port(env, "MASTER_PORT").value_or(0);
  if (num_nodes > 1 && e.main_port == 0) {
    raise(
        "expected MASTER_PORT to be set for a job on {} nodes, found it unset; export the same MASTER_PORT=<free "
        "port> on every node",
        num_nodes);
  }
  e.world_size = devices * num_nodes;
  e.global_rank = e.node_rank * devices + e.local_rank;
  validate_environment(e, devices, num_nodes);
  return e;
}

/// Detects the environment in Lightning's order (torchelastic > SLURM > MPI > lightning) and validates it.
inline ClusterEnvironment detect_environment(int devices, int num_nodes, const EnvLookup& env = {}) {
  if (devices < 1) raise("expected devices >= 1, found {}; set Options{{.devices = N}} with N >= 1", devices);
  if (num_nodes < 1) raise("expected num_nodes >= 1, found {}; set Options{{.num_nodes = N}} with N >= 1", num_nodes);
  const EnvLookup& lookup = env ? env : EnvLookup(getenv_lookup);
  if (auto e = detect_torchelastic(devices, num_nodes, lookup)) return *e;
  if (auto e = detect_slurm(devices, num_nodes, lookup)) return *e;
  if (auto e = detect_mpi(devices, num_nodes, lookup)) return *e;
  return detect_lightning(devices, num_nodes, lookup);
}

/// Binds port 0 on 127.0.0.1 and returns the port the system chose (free at the time of the call).
inline int find_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    raise("expected to open a socket to find a free port, found error {}; set MASTER_PORT", std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = 0;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    int error = errno;
    ::close(fd);
    raise("expected to bind a free port on 127.0.0.1, found error {}; set MASTER_PORT", std::strerror(error));
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

}  // namespace detail
}  // namespace fabric
