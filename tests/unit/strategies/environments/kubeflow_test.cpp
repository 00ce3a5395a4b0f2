// fabric::KubeflowEnvironment from fake environments: Lightning's plugins/environments/test_kubeflow.py and a
// test of its test_connector.py.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/environments/kubeflow.hpp>

#include "unit/strategies/environments/fake_env.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

using Catch::Matchers::ContainsSubstring;
using fabric_test::fake;
using fabric_test::Vars;
using fabric_test::without;

namespace {

const Vars pod{{"KUBERNETES_PORT", "tcp://127.0.0.1:443"},
               {"MASTER_ADDR", "1.2.3.4"},
               {"MASTER_PORT", "500"},
               {"WORLD_SIZE", "20"},
               {"RANK", "1"}};

}  // namespace

// Lightning: tests_fabric/plugins/environments/test_kubeflow.py::test_default_attributes
TEST_CASE("kubeflow: every variable the operator sets is required", "[launch][kubeflow]") {
  const fabric::KubeflowEnvironment kubeflow;
  for (const char* name : {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"}) {
    CAPTURE(name);
    CHECK_THROWS_WITH(kubeflow.topology(fake(without(pod, name)), 1, 20), ContainsSubstring(name));
  }
}

// Lightning: tests_fabric/plugins/environments/test_kubeflow.py::test_attributes_from_environment_variables
TEST_CASE("kubeflow: one process per pod; the node rank is the global rank", "[launch][kubeflow]") {
  const auto t = fabric::KubeflowEnvironment{}.topology(fake(pod), 1, 20);
  CHECK(t.name == "kubeflow");
  CHECK(t.creates_processes_externally);
  CHECK(t.main_address == "1.2.3.4");
  CHECK(t.main_port == 500);
  CHECK(t.world_size == 20);
  CHECK(t.global_rank == 1);
  CHECK(t.local_rank == 0);
  CHECK(t.node_rank == 1);
}

// Lightning: tests_fabric/plugins/environments/test_kubeflow.py::test_detect_kubeflow
// (Lightning refuses to detect it; fabric's detect() tells a PyTorchJob pod, and only a detection list that names
// Kubeflow uses it.)
TEST_CASE("kubeflow: not auto-detected, as in Lightning; detectable when listed", "[launch][kubeflow]") {
  CHECK(fabric::KubeflowEnvironment::detect(fake(pod)));
  CHECK_FALSE(fabric::KubeflowEnvironment::detect(fake(without(pod, "KUBERNETES_PORT"))));
  // Auto detection leaves the pod's variables to the Lightning environment (which starts the processes itself).
  CHECK(fabric::detail::detect_environment(1, 1, fake(without(without(pod, "WORLD_SIZE"), "RANK"))).name ==
        "lightning");
  const fabric::AnyEnvironment listed(fabric::DetectEnvironment<fabric::KubeflowEnvironment>{});
  CHECK(listed.topology(fake(pod), 1, 20).name == "kubeflow");
  CHECK(listed.topology(fake({}), 2, 1).name == "lightning");
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_cpu_kubeflow
// (fabric checks the world the pod reports against devices * num_nodes, where Lightning trusts it.)
TEST_CASE("kubeflow: passed explicitly it is used, and checked against devices and num_nodes", "[launch][kubeflow]") {
  const fabric::AnyEnvironment kubeflow(fabric::KubeflowEnvironment{});
  CHECK(kubeflow.name() == "kubeflow");
  const auto t = kubeflow.topology(fake(pod), 1, 20);
  CHECK(t.local_rank == 0);
  CHECK(t.node_rank == 1);
  CHECK_THROWS_WITH(kubeflow.topology(fake(pod), 2, 1), ContainsSubstring("kubeflow") &&
                                                            ContainsSubstring("devices * num_nodes = 2 * 1 = 2") &&
                                                            ContainsSubstring("found 20"));
}
