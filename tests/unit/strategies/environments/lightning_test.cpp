// fabric::LightningEnvironment from fake environments: Lightning's plugins/environments/test_lightning.py.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/environments/lightning.hpp>
#include <fabric/strategies/launchers/subprocess.hpp>

#include "unit/strategies/environments/fake_env.hpp"

#include <catch2/catch_test_macros.hpp>

using fabric_test::fake;
using fabric_test::Vars;

namespace {

fabric::Topology lightning(const Vars& vars, int devices = 1, int num_nodes = 1) {
  return fabric::LightningEnvironment{}.topology(fake(vars), devices, num_nodes);
}

}  // namespace

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_default_attributes
TEST_CASE("lightning: defaults when nothing is set", "[launch][lightning]") {
  const auto t = lightning({});
  CHECK(t.name == "lightning");
  CHECK_FALSE(t.creates_processes_externally);
  CHECK(t.main_address == "127.0.0.1");
  CHECK(t.main_port == 0);  // chosen by launch() (see test_random_main_port)
  CHECK(t.world_size == 1);
  CHECK(t.global_rank == 0);
  CHECK(t.local_rank == 0);
  CHECK(t.node_rank == 0);
}

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_attributes_from_environment_variables
TEST_CASE("lightning: MASTER_ADDR, MASTER_PORT, LOCAL_RANK and NODE_RANK from the environment", "[launch][lightning]") {
  const Vars vars{{"MASTER_ADDR", "1.2.3.4"}, {"MASTER_PORT", "500"}, {"LOCAL_RANK", "2"}, {"NODE_RANK", "3"}};
  const auto t = lightning(vars, 4, 5);
  CHECK(t.main_address == "1.2.3.4");
  CHECK(t.main_port == 500);
  CHECK(t.local_rank == 2);
  CHECK(t.node_rank == 3);
  // Lightning's strategy sets world size and global rank later (set_world_size, set_global_rank); fabric's
  // topology has them at once: devices * num_nodes, and node_rank * devices + local_rank.
  CHECK(t.world_size == 20);
  CHECK(t.global_rank == 14);
}

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_manual_user_launch
TEST_CASE("lightning: LOCAL_RANK means the processes were started outside", "[launch][lightning]") {
  CHECK_FALSE(lightning({}).creates_processes_externally);
  CHECK(lightning({{"LOCAL_RANK", "2"}}, 4).creates_processes_externally);
  CHECK_FALSE(
      lightning({{"NODE_RANK", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "9"}}, 1, 2).creates_processes_externally);
}

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_node_rank_from_group_rank
TEST_CASE("lightning: GROUP_RANK stands in for NODE_RANK", "[launch][lightning]") {
  const Vars vars{{"GROUP_RANK", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "9"}};
  CHECK(lightning(vars, 1, 2).node_rank == 1);
}

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_random_main_port
TEST_CASE("lightning: with no MASTER_PORT the launcher picks a free port, once", "[launch][lightning]") {
  // The environment leaves the port to launch() (0: not decided), which takes a free one and exports it to the
  // processes it starts; asking the environment again does not change its answer.
  CHECK(lightning({}).main_port == 0);
  CHECK(lightning({}).main_port == 0);
  const int port = fabric::detail::find_free_port();
  CHECK(port > 0);
  CHECK(port < 65536);
}

// Lightning: tests_fabric/plugins/environments/test_lightning.py::test_detect
TEST_CASE("lightning: always detected (the fallback)", "[launch][lightning]") {
  CHECK(fabric::LightningEnvironment::detect(fake({})));
  CHECK(fabric::detail::detect_environment(2, 1, fake({})).name == "lightning");
}

// Lightning left out: tests_fabric/plugins/environments/test_lightning.py::test_teardown - Lightning's environment unsets the WORLD_SIZE it exported; fabric's environments export nothing (they only read), and the variables launch() exports stay for the process's life because the launch happens once per process (a second Fabric reuses it, see launchers/subprocess_test.cpp)
