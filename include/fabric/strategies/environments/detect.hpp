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
    }
  }

  /// Returns the name of the held environment ("auto" for detection).
  const std::string& name() const noexcept { return name_; }
  /// Says whether the held environment applies to this process.
  bool detect(const EnvLookup& env) const { return detect_(env); }
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
};

namespace detail {

/// Detects the environment in Lightning's order and validates it; env defaults to this process's.
inline Topology detect_environment(int devices, int num_nodes, const EnvLookup& env = {}) {
  return AnyEnvironment().topology(env ? env : EnvLookup(getenv_lookup), devices, num_nodes);
}

}  // namespace detail
}  // namespace fabric
