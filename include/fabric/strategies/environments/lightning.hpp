#pragma once
// fabric::LightningEnvironment: the default environment, where fabric.launch() starts the processes of
// each node itself (Lightning's LightningEnvironment). Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"

#include <string_view>

namespace fabric {

/// The environment of a job that no launcher started: the process that calls `fabric.launch()` is local
/// rank 0 and starts local ranks 1..devices-1; it is a started process when LOCAL_RANK is set. Reads
/// LOCAL_RANK, NODE_RANK (or GROUP_RANK), MASTER_ADDR and MASTER_PORT; the world size is devices *
/// num_nodes. Always detected: it is the fallback of every detection list.
struct LightningEnvironment {
  static constexpr std::string_view name = "lightning";

  /// Returns true: any process can be launched this way.
  static bool detect(const EnvLookup& /*env*/) noexcept { return true; }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int devices, int num_nodes) const {
    Topology e;
    e.name = name;
    auto local_rank = detail::env_int(env, "LOCAL_RANK");
    e.creates_processes_externally = local_rank.has_value();
    e.local_rank = local_rank.value_or(0);
    auto node = detail::env_int(env, "NODE_RANK");
    e.node_rank = node ? *node : detail::env_int(env, "GROUP_RANK").value_or(0);
    detail::require_main_address(env, e.name, num_nodes);
    e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
    e.main_port = detail::env_port(env, "MASTER_PORT").value_or(0);
    if (num_nodes > 1 && e.main_port == 0) {
      detail::raise(
          "expected MASTER_PORT to be set for a job on {} nodes, found it unset; export the same MASTER_PORT=<free "
          "port> on every node",
          num_nodes);
    }
    e.world_size = devices * num_nodes;
    e.global_rank = e.node_rank * devices + e.local_rank;
    return e;
  }
};

}  // namespace fabric
