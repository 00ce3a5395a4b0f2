// Cluster environments written outside the library: passed to a strategy, or put first in a detection list.
// Lightning: tests_fabric/test_connector.py::test_custom_cluster_environment_in_slurm_environment

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>

#include "unit/strategies/environments/fake_env.hpp"
#include "unit/strategies/environments/scheduler.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <string>
#include <string_view>

using Catch::Matchers::ContainsSubstring;
using fabric_test::fake;
using fabric_test::Vars;
using fabric_test::with;

namespace {

using Scheduler = fabric_test::SchedulerEnvironment;

const Vars scheduled{{"SCHED_RANK", "3"}, {"SCHED_SIZE", "4"}, {"SCHED_PER_NODE", "2"}, {"SCHED_ADDR", "head"}};
const Vars slurm{{"SLURM_NTASKS", "2"},       {"SLURM_JOB_NAME", "SOME_NAME"}, {"SLURM_NODEID", "0"},
                 {"LOCAL_RANK", "0"},         {"SLURM_PROCID", "0"},           {"SLURM_LOCALID", "0"},
                 {"SLURM_NODELIST", "n[1-2]"}};

}  // namespace

TEST_CASE("a user's environment passed explicitly is used even where SLURM's variables are", "[launch][custom]") {
  const fabric::AnyEnvironment env(Scheduler{});
  CHECK(env.name() == "scheduler");
  CHECK(env.detect(fake(scheduled)));
  const auto t = env.topology(fake(with(scheduled, slurm)), 2, 2);
  CHECK(t.name == "scheduler");
  CHECK(t.world_size == 4);
  CHECK(t.global_rank == 3);
  CHECK(t.local_rank == 1);
  CHECK(t.node_rank == 1);
  CHECK(t.main_address == "head");
  CHECK(t.main_port == 4242);
  // Settings travel with the environment object.
  CHECK(fabric::AnyEnvironment(Scheduler{.address_variable = "OTHER"}).topology(fake(scheduled), 2, 2).main_address ==
        "127.0.0.1");
}

TEST_CASE("what a user's environment reports is checked against devices and num_nodes", "[launch][custom]") {
  const fabric::AnyEnvironment env(Scheduler{});
  CHECK_THROWS_WITH(env.topology(fake(scheduled), 4, 2),
                    ContainsSubstring("started by scheduler") && ContainsSubstring("devices * num_nodes = 4 * 2 = 8"));
  CHECK_THROWS_WITH(env.topology(fake(with(scheduled, {{"SCHED_PER_NODE", "4"}})), 2, 2),
                    ContainsSubstring("below devices = 2"));
  CHECK_THROWS_WITH(env.topology(fake(with(scheduled, {{"SCHED_SIZE", "x"}})), 2, 2),
                    ContainsSubstring("SCHED_SIZE") && ContainsSubstring("\"x\""));
  CHECK_THROWS_WITH(env.topology(fake(scheduled), 0, 2), ContainsSubstring("devices >= 1"));
}

TEST_CASE("a detection list tries a user's environment first, then the built-in ones", "[launch][custom]") {
  const fabric::AnyEnvironment env(
      fabric::DetectEnvironment<Scheduler, fabric::SLURMEnvironment, fabric::TorchElasticEnvironment>{});
  CHECK(env.name() == "auto");
  CHECK(env.topology(fake(with(scheduled, slurm)), 2, 2).name == "scheduler");
  CHECK(env.topology(fake(slurm), 1, 2).name == "slurm");
  CHECK(env.topology(fake({{"LOCAL_RANK", "1"}}), 2, 1).name == "lightning");
}

TEST_CASE("the default environment detects in Lightning's order", "[launch][custom]") {
  const fabric::AnyEnvironment env;
  CHECK(env.name() == "auto");
  CHECK(env.topology(fake(slurm), 1, 2).name == "slurm");
  CHECK(env.topology(fake(scheduled), 1, 1).name == "lightning");
}
