#pragma once
// A cluster environment written outside the library, as a user writes one, for the tests of the torch-free
// environments and for ddp_worker's --env scheduler (tests/dist/fake_scheduler.sh sets its variables):
// SCHED_RANK of SCHED_SIZE processes, SCHED_PER_NODE per node, meeting at SCHED_ADDR:SCHED_PORT.

// NOTE: with the single header (ddp_worker's build in CI) the environment concept comes from it, included
// before this file.
#if __has_include(<fabric/strategies/environments/environment.hpp>)
#include <fabric/strategies/environments/environment.hpp>
#endif

#include <string>
#include <string_view>

namespace fabric_test {

struct SchedulerEnvironment {
  static constexpr std::string_view name = "scheduler";
  /// The variable that holds the main node's address (a setting the environment object carries).
  std::string address_variable = "SCHED_ADDR";

  static bool detect(const fabric::EnvLookup& env) { return env("SCHED_RANK").has_value(); }
  fabric::Topology topology(const fabric::EnvLookup& env, int /*devices*/, int /*num_nodes*/) const {
    const int per_node = fabric::detail::env_required_int(env, "SCHED_PER_NODE", "the scheduler");
    fabric::Topology t;
    t.name = name;
    t.creates_processes_externally = true;
    t.world_size = fabric::detail::env_required_int(env, "SCHED_SIZE", "the scheduler");
    t.global_rank = fabric::detail::env_required_int(env, "SCHED_RANK", "the scheduler");
    t.local_rank = t.global_rank % per_node;
    t.node_rank = t.global_rank / per_node;
    t.main_address = env(address_variable).value_or("127.0.0.1");
    t.main_port = fabric::detail::env_port(env, "SCHED_PORT").value_or(4242);
    return t;
  }
};

}  // namespace fabric_test
