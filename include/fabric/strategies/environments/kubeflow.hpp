#pragma once
// fabric::KubeflowEnvironment: one process per pod of a Kubeflow PyTorchJob. Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"

#include <string_view>

namespace fabric {

/// The environment of Kubeflow's PyTorchJob operator (Lightning's KubeflowEnvironment): every pod runs
/// one process, so the local rank is 0 and the node rank is the global rank; reads MASTER_ADDR,
/// MASTER_PORT, WORLD_SIZE and RANK, which the operator sets. As in Lightning (since 2.1) it is not
/// auto-detected, since any pod may carry such variables: pass it,
/// `fabric::DDP({.cluster_environment = fabric::KubeflowEnvironment{}})`, or list it in a
/// fabric::DetectEnvironment. detect() tells the variables of a PyTorchJob pod (KUBERNETES_PORT,
/// MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK), the rule Lightning auto-detected it by before.
struct KubeflowEnvironment {
  static constexpr std::string_view name = "kubeflow";

  /// Returns true when the variables of a PyTorchJob pod are set.
  static bool detect(const EnvLookup& env) {
    return env("KUBERNETES_PORT") && env("MASTER_ADDR") && env("MASTER_PORT") && env("WORLD_SIZE") && env("RANK");
  }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int /*devices*/, int /*num_nodes*/) const {
    Topology e;
    e.name = name;
    e.creates_processes_externally = true;
    e.world_size = detail::env_required_int(env, "WORLD_SIZE", "the PyTorchJob operator");
    e.global_rank = detail::env_required_int(env, "RANK", "the PyTorchJob operator");
    e.local_rank = 0;
    e.node_rank = e.global_rank;
    auto address = env("MASTER_ADDR");
    if (!address || address->empty()) {
      detail::raise(
          "expected MASTER_ADDR to be set by the PyTorchJob operator (kubeflow), found it {}; run in a PyTorchJob "
          "or use another environment",
          address ? "empty" : "unset");
    }
    e.main_address = *address;
    auto port = detail::env_port(env, "MASTER_PORT");
    if (!port) {
      detail::raise(
          "expected MASTER_PORT to be set by the PyTorchJob operator (kubeflow), found it unset; run in a "
          "PyTorchJob or use another environment");
    }
    e.main_port = *port;
    return e;
  }
};

}  // namespace fabric
