// fabric::TorchElasticEnvironment from fake environments: Lightning's plugins/environments/test_torchelastic.py.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/environments/torchelastic.hpp>

#include "unit/strategies/environments/fake_env.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

using Catch::Matchers::ContainsSubstring;
using fabric_test::fake;
using fabric_test::Vars;
using fabric_test::with;
using fabric_test::without;

namespace {

const Vars torchrun{{"TORCHELASTIC_RUN_ID", "x"}, {"WORLD_SIZE", "2"}, {"RANK", "1"}, {"LOCAL_RANK", "1"}};

}  // namespace

// Lightning: tests_fabric/plugins/environments/test_torchelastic.py::test_default_attributes
TEST_CASE("torchelastic: external processes on 127.0.0.1:12910 by default; world size and local rank required",
          "[launch][torchelastic]") {
  const fabric::TorchElasticEnvironment env;
  const auto t = env.topology(fake(torchrun), 2, 1);
  CHECK(t.creates_processes_externally);
  CHECK(t.main_address == "127.0.0.1");
  CHECK(t.main_port == 12910);
  CHECK(t.node_rank == 0);
  // Lightning raises KeyError; fabric names the variable and the launcher.
  CHECK_THROWS_WITH(env.topology(fake(without(torchrun, "WORLD_SIZE")), 2, 1),
                    ContainsSubstring("WORLD_SIZE") && ContainsSubstring("torchrun"));
  CHECK_THROWS_WITH(env.topology(fake(without(torchrun, "LOCAL_RANK")), 2, 1), ContainsSubstring("LOCAL_RANK"));
}

// Lightning: tests_fabric/plugins/environments/test_torchelastic.py::test_attributes_from_environment_variables
TEST_CASE("torchelastic: the attributes come from torchrun's variables", "[launch][torchelastic]") {
  const Vars vars{{"MASTER_ADDR", "1.2.3.4"}, {"MASTER_PORT", "500"}, {"WORLD_SIZE", "20"}, {"RANK", "1"},
                  {"LOCAL_RANK", "2"},        {"GROUP_RANK", "3"}};
  const auto t = fabric::TorchElasticEnvironment{}.topology(fake(vars), 4, 5);
  CHECK(t.main_address == "1.2.3.4");
  CHECK(t.main_port == 500);
  CHECK(t.world_size == 20);
  CHECK(t.global_rank == 1);
  CHECK(t.local_rank == 2);
  CHECK(t.node_rank == 3);
  // Lightning's setters are no-ops that log; a fabric Topology is read from the launcher once, with no setters.
}

// Lightning: tests_fabric/plugins/environments/test_torchelastic.py::test_detect
TEST_CASE("torchelastic: detected by TORCHELASTIC_RUN_ID, even empty", "[launch][torchelastic]") {
  CHECK_FALSE(fabric::TorchElasticEnvironment::detect(fake({})));
  CHECK(fabric::TorchElasticEnvironment::detect(fake({{"TORCHELASTIC_RUN_ID", ""}})));
}

// Lightning: tests_fabric/plugins/environments/test_torchelastic.py::test_validate_user_settings
TEST_CASE("torchelastic: the world size must be devices * num_nodes", "[launch][torchelastic]") {
  const auto vars = with(torchrun, {{"WORLD_SIZE", "8"}, {"MASTER_ADDR", "h"}});
  const fabric::AnyEnvironment env(fabric::TorchElasticEnvironment{});
  CHECK(env.topology(fake(vars), 4, 2).world_size == 8);
  CHECK_THROWS_WITH(env.topology(fake(vars), 2, 2),
                    ContainsSubstring("devices * num_nodes = 2 * 2 = 4") && ContainsSubstring("found 8"));
}
