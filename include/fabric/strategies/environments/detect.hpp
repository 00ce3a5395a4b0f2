#pragma once
// Choosing the cluster environment: fabric::DetectEnvironment (detection over a list of environments, in
// order), fabric::AutoEnvironment (Lightning's list) and fabric::AnyEnvironment (any environment, as a
// strategy holds it). Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"
#include "fabric/strategies/environments/kubeflow.hpp"
#include "fabric/strategies/environments/lightning.hpp"
#include "fabric/strategies/environments/lsf.hpp"
#include "fabric/strategies/environments/mpi.hpp"
#include "fabric/strategies/environments/slurm.hpp"
#include "fabric/strategies/environments/torchelastic.hpp"

#include <concepts>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fabric {

/// Detects the environment of this process over a list: the first of Es whose detect() is true reads
/// the topology, and fabric::LightningEnvironment does when none is. Put your own environment first
/// to have it detected before the others:
///
///     fabric::DDP ddp({.cluster_environment = fabric::DetectEnvironment<MyScheduler, fabric::TorchElasticEnvironment,
///                                                                        fabric::SLURMEnvironment>{}});
template <class... Es>
struct DetectEnvironment {
  static_assert((detail::check_environment<Es>() && ...));
  static constexpr std::string_view name = "auto";

  /// The environments, in the order they are tried (they may carry settings).
  std::tuple<Es...> environments{};

  /// Returns true: one of the environments, or the Lightning one, always applies.
  static bool detect(const EnvLookup& /*env*/) noexcept { return true; }

  /// Reads the topology from the first environment detected (LightningEnvironment when none is).
  Topology topology(const EnvLookup& env, int devices, int num_nodes) const {
    std::optional<Topology> found;
    std::apply(
        [&](const auto&... e) {
          ((found = !found && e.detect(env) ? std::optional<Topology>(e.topology(env, devices, num_nodes)) : found),
           ...);
        },
        environments);
    return found ? *std::move(found) : LightningEnvironment{}.topology(env, devices, num_nodes);
  }
};

/// Lightning's detection order: torchelastic > SLURM > LSF > MPI > lightning. (Kubeflow is not
/// detected, as in Lightning; pass fabric::KubeflowEnvironment.)
using AutoEnvironment = DetectEnvironment<TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment>;

/// The number of processes per node that a launcher started, as `Options::auto_devices` takes it.
struct LauncherDevices {
  /// Processes on each node.
  int devices = 1;
  /// The launcher and the variable that says it, for messages: "torchrun (LOCAL_WORLD_SIZE)".
  std::string_view source;
};

namespace detail {

/// Reads the processes per node from SLURM_NTASKS_PER_NODE, else from SLURM_TASKS_PER_NODE when every node has
/// as many (`4`, `4(x2)`, `4,4`).
inline std::optional<int> slurm_tasks_per_node(const EnvLookup& env) {
  if (auto n = env_int(env, "SLURM_NTASKS_PER_NODE")) return n;
  const auto list = env("SLURM_TASKS_PER_NODE");
  if (!list) return std::nullopt;
  std::optional<long long> same;
  for (std::string_view rest = *list; !rest.empty();) {
    const auto comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    const auto count = parse_integer(item.substr(0, item.find('(')));
    if (!count || (same && *same != *count)) return std::nullopt;
    same = count;
  }
  if (!same || *same < 1 || *same > 0x7fffffff) return std::nullopt;
  return static_cast<int>(*same);
}

/// Returns the processes per node that E's launcher reports, when E is detected and its launcher reports them.
template <class E>
std::optional<LauncherDevices> launcher_devices_of(const E& e, const EnvLookup& env) {
  const auto from = [&](std::string_view variable, std::string_view source) -> std::optional<LauncherDevices> {
    if (auto n = env_int(env, variable); n && *n >= 1) return LauncherDevices{*n, source};
    return std::nullopt;
  };
  if (!e.detect(env)) return std::nullopt;
  if constexpr (std::same_as<E, TorchElasticEnvironment>) {
    return from("LOCAL_WORLD_SIZE", "torchrun or fabric-run (LOCAL_WORLD_SIZE)");
  } else if constexpr (std::same_as<E, SLURMEnvironment>) {
    if (auto n = slurm_tasks_per_node(env); n && *n >= 1) {
      return LauncherDevices{*n, "srun (SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE)"};
    }
    return std::nullopt;
  } else if constexpr (std::same_as<E, LSFEnvironment>) {
    return from("JSM_NAMESPACE_LOCAL_SIZE", "jsrun (JSM_NAMESPACE_LOCAL_SIZE)");
  } else if constexpr (std::same_as<E, MPIEnvironment>) {
    if (env("OMPI_COMM_WORLD_SIZE")) return from("OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun (OMPI_COMM_WORLD_LOCAL_SIZE)");
    return from("MPI_LOCALNRANKS", "mpirun (MPI_LOCALNRANKS)");
  } else if constexpr (requires { std::tuple_size<decltype(e.environments)>::value; }) {
    // NOTE: a detection list: the first environment detected decides, as in topology().
    std::optional<LauncherDevices> found;
    bool decided = false;
    std::apply(
        [&](const auto&... each) {
          ((decided = decided || (each.detect(env) ? (found = launcher_devices_of(each, env), true) : false)), ...);
        },
        e.environments);
    return found;
  } else {
    return std::nullopt;
  }
}

}  // namespace detail

/// Holds any cluster environment behind one type, as a parallel strategy keeps it (Lightning's
/// `plugins=[MyClusterEnvironment()]`); default: fabric::AutoEnvironment. What it reports is checked
/// against the Fabric's devices and num_nodes.
///
///     fabric::DDP ddp({.cluster_environment = fabric::KubeflowEnvironment{}});
class AnyEnvironment {
 public:
  /// Detects the environment in Lightning's order (fabric::AutoEnvironment).
  AnyEnvironment() : AnyEnvironment(AutoEnvironment{}) {}
  /// Holds a copy of an environment; a type that is not a ClusterEnvironment fails with a message
  /// naming what it lacks.
  template <class E>
  requires(!std::same_as<std::remove_cvref_t<E>, AnyEnvironment>) AnyEnvironment(E environment)  // NOLINT
      : name_(name_of<E>()) {
    if constexpr (detail::check_environment<E>()) {
      detect_ = [environment](const EnvLookup& env) { return environment.detect(env); };
      topology_ = [environment](const EnvLookup& env, int devices, int num_nodes) {
        return environment.topology(env, devices, num_nodes);
      };
      launcher_devices_ = [environment](const EnvLookup& env) { return detail::launcher_devices_of(environment, env); };
    }
  }

  /// Returns the name of the held environment ("auto" for detection).
  const std::string& name() const noexcept { return name_; }
  /// Says whether the held environment applies to this process.
  bool detect(const EnvLookup& env) const { return detect_(env); }
  /// Returns the processes per node that the launcher of this process started, when the held environment (or
  /// the first one a detection list detects) is torchrun's, SLURM's, LSF's or MPI's and its launcher says how many;
  /// env defaults to this process's variables.
  std::optional<LauncherDevices> launcher_devices(const EnvLookup& env = {}) const {
    return launcher_devices_(env ? env : EnvLookup(detail::getenv_lookup));
  }
  /// Reads this process's place in the job and checks it against devices and num_nodes.
  Topology topology(const EnvLookup& env, int devices, int num_nodes) const {
    if (devices < 1) detail::raise("expected devices >= 1, found {}; set Options{{.devices = N}} with N >= 1", devices);
    if (num_nodes < 1) {
      detail::raise("expected num_nodes >= 1, found {}; set Options{{.num_nodes = N}} with N >= 1", num_nodes);
    }
    Topology topology = topology_(env, devices, num_nodes);
    detail::validate_environment(topology, devices, num_nodes);
    return topology;
  }

 private:
  template <class E>
  static std::string name_of() {
    if constexpr (detail::environment_has_name<E>) {
      return std::string(E::name);
    } else {
      return "invalid";
    }
  }

  std::string name_;
  std::function<bool(const EnvLookup&)> detect_;
  std::function<Topology(const EnvLookup&, int, int)> topology_;
  std::function<std::optional<LauncherDevices>(const EnvLookup&)> launcher_devices_;
};

namespace detail {

/// Detects the environment in Lightning's order and validates it; env defaults to this process's.
inline Topology detect_environment(int devices, int num_nodes, const EnvLookup& env = {}) {
  return AnyEnvironment().topology(env ? env : EnvLookup(getenv_lookup), devices, num_nodes);
}

}  // namespace detail
}  // namespace fabric
