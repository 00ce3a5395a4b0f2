#pragma once
// fabric::TorchElasticEnvironment: processes started by torchrun (torch elastic) or fabric-run. Torch-free.

#include "fabric/strategies/environments/environment.hpp"

#include <optional>
#include <string>
#include <string_view>

namespace fabric {

/// The environment of torchrun and fabric-run (Lightning's TorchElasticEnvironment): detected by
/// TORCHELASTIC_RUN_ID; reads WORLD_SIZE, RANK, LOCAL_RANK, GROUP_RANK (or NODE_RANK), MASTER_ADDR,
/// MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE (torchrun's agent then serves the rendezvous store).
struct TorchElasticEnvironment {
  static constexpr std::string_view name = "torchelastic";

  /// Returns true when torchrun (or fabric-run) started this process.
  static bool detect(const EnvLookup& env) { return env("TORCHELASTIC_RUN_ID").has_value(); }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int /*devices*/, int num_nodes) const {
    Topology e;
    e.name = name;
    e.creates_processes_externally = true;
    e.world_size = detail::env_required_int(env, "WORLD_SIZE", "torchrun");
    e.global_rank = detail::env_required_int(env, "RANK", "torchrun");
    e.local_rank = detail::env_required_int(env, "LOCAL_RANK", "torchrun");
    auto group = detail::env_int(env, "GROUP_RANK");
    e.node_rank = group ? *group : detail::env_int(env, "NODE_RANK").value_or(0);
    detail::require_main_address(env, e.name, num_nodes);
    e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
    e.main_port = detail::env_port(env, "MASTER_PORT").value_or(12910);
    e.store_hosted_by_launcher = env("TORCHELASTIC_USE_AGENT_STORE") == std::optional<std::string>("True");
    return e;
  }
};

}  // namespace fabric
