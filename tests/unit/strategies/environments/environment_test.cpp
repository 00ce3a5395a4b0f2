// Cluster-environment detection from fake environments: each environment, the precedence, the validation errors
// and SLURM host lists.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>

#include "unit/strategies/environments/fake_env.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <map>
#include <optional>
#include <string>
#include <string_view>

using Catch::Matchers::ContainsSubstring;
using fabric::Topology;
using fabric::detail::detect_environment;
using fabric::detail::EnvLookup;
using fabric_test::fake;
using fabric_test::Vars;
using fabric_test::with;
using fabric_test::without;

namespace {

Topology detect(const Vars& vars, int devices = 1, int num_nodes = 1) {
  return detect_environment(devices, num_nodes, fake(vars));
}

const Vars torchelastic{
    {"TORCHELASTIC_RUN_ID", "abc"}, {"WORLD_SIZE", "8"},     {"RANK", "5"}, {"LOCAL_RANK", "1"}, {"GROUP_RANK", "1"},
    {"MASTER_ADDR", "10.0.0.1"},    {"MASTER_PORT", "29500"}};
const Vars slurm{{"SLURM_NTASKS", "8"},
                 {"SLURM_PROCID", "6"},
                 {"SLURM_LOCALID", "2"},
                 {"SLURM_NODEID", "1"},
                 {"SLURM_NODELIST", "gpu[07-08]"},
                 {"SLURM_JOB_ID", "1234567"},
                 {"SLURM_JOB_NAME", "train"},
                 {"SLURM_NTASKS_PER_NODE", "4"},
                 {"SLURM_NNODES", "2"}};
const Vars openmpi{
    {"OMPI_COMM_WORLD_SIZE", "4"},       {"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
    {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}, {"MASTER_ADDR", "head"},       {"OMPI_MCA_ess_base_jobid", "42"}};

}  // namespace

TEST_CASE("lightning environment: defaults when nothing is set", "[launch]") {
  auto e = detect({}, 4, 1);
  CHECK(e.name == "lightning");
  CHECK_FALSE(e.creates_processes_externally);
  CHECK(e.world_size == 4);
  CHECK(e.global_rank == 0);
  CHECK(e.local_rank == 0);
  CHECK(e.node_rank == 0);
  CHECK(e.main_address == "127.0.0.1");
  CHECK(e.main_port == 0);
}

TEST_CASE("lightning environment: a launched child reads LOCAL_RANK, NODE_RANK, MASTER_*", "[launch]") {
  auto e = detect({{"LOCAL_RANK", "2"}, {"NODE_RANK", "1"}, {"MASTER_ADDR", "h0"}, {"MASTER_PORT", "1234"}}, 3, 2);
  CHECK(e.name == "lightning");
  CHECK(e.creates_processes_externally);
  CHECK(e.local_rank == 2);
  CHECK(e.node_rank == 1);
  CHECK(e.world_size == 6);
  CHECK(e.global_rank == 5);
  CHECK(e.main_address == "h0");
  CHECK(e.main_port == 1234);
}

TEST_CASE("lightning environment: GROUP_RANK is the fallback of NODE_RANK", "[launch]") {
  const Vars vars{{"GROUP_RANK", "1"}, {"MASTER_ADDR", "h0"}, {"MASTER_PORT", "1234"}};
  CHECK(detect(vars, 2, 2).node_rank == 1);
  CHECK(detect(with(vars, {{"NODE_RANK", "0"}}), 2, 2).node_rank == 0);
}

TEST_CASE("torchelastic environment", "[launch]") {
  auto e = detect(torchelastic, 4, 2);
  CHECK(e.name == "torchelastic");
  CHECK(e.creates_processes_externally);
  CHECK(e.world_size == 8);
  CHECK(e.global_rank == 5);
  CHECK(e.local_rank == 1);
  CHECK(e.node_rank == 1);
  CHECK(e.main_address == "10.0.0.1");
  CHECK(e.main_port == 29500);
  CHECK_FALSE(e.store_hosted_by_launcher);
  CHECK(detect(with(torchelastic, {{"TORCHELASTIC_USE_AGENT_STORE", "True"}}), 4, 2).store_hosted_by_launcher);
  CHECK_FALSE(detect(with(torchelastic, {{"TORCHELASTIC_USE_AGENT_STORE", "False"}}), 4, 2).store_hosted_by_launcher);
  auto single = detect({{"TORCHELASTIC_RUN_ID", "x"}, {"WORLD_SIZE", "2"}, {"RANK", "1"}, {"LOCAL_RANK", "1"}}, 2);
  CHECK(single.main_address == "127.0.0.1");
  CHECK(single.main_port == 12910);
}

TEST_CASE("slurm environment", "[launch]") {
  auto e = detect(slurm, 4, 2);
  CHECK(e.name == "slurm");
  CHECK(e.creates_processes_externally);
  CHECK(e.world_size == 8);
  CHECK(e.global_rank == 6);
  CHECK(e.local_rank == 2);
  CHECK(e.node_rank == 1);
  CHECK(e.main_address == "gpu07");
  CHECK(e.main_port == 4567 + 15000);
  SECTION("MASTER_ADDR and MASTER_PORT win") {
    auto m = detect(with(slurm, {{"MASTER_ADDR", "ib-gpu07"}, {"MASTER_PORT", "3333"}}), 4, 2);
    CHECK(m.main_address == "ib-gpu07");
    CHECK(m.main_port == 3333);
  }
  SECTION("no job id: port 12910") { CHECK(detect(without(slurm, "SLURM_JOB_ID"), 4, 2).main_port == 12910); }
  SECTION("short job id") { CHECK(detect(with(slurm, {{"SLURM_JOB_ID", "77"}}), 4, 2).main_port == 15077); }
  SECTION("SLURM_JOB_NODELIST when SLURM_NODELIST is missing") {
    auto vars = with(without(slurm, "SLURM_NODELIST"), {{"SLURM_JOB_NODELIST", "a1,a2"}});
    CHECK(detect(vars, 4, 2).main_address == "a1");
  }
  SECTION("interactive jobs are not slurm") {
    CHECK(detect(with(slurm, {{"SLURM_JOB_NAME", "bash"}}), 1, 1).name == "lightning");
    CHECK(detect(with(slurm, {{"SLURM_JOB_NAME", "interactive"}}), 1, 1).name == "lightning");
  }
}

TEST_CASE("mpi environment: OpenMPI", "[launch]") {
  auto e = detect(openmpi, 2, 2);
  CHECK(e.name == "mpi");
  CHECK(e.creates_processes_externally);
  CHECK(e.world_size == 4);
  CHECK(e.global_rank == 3);
  CHECK(e.local_rank == 1);
  CHECK(e.node_rank == 1);
  CHECK(e.main_address == "head");
  CHECK(e.main_port == fabric::detail::port_from_job_id("42"));
  CHECK(e.main_port >= 20000);
  CHECK(e.main_port < 40000);
  CHECK(fabric::detail::port_from_job_id("42") != fabric::detail::port_from_job_id("43"));
  CHECK(detect(with(openmpi, {{"MASTER_PORT", "2222"}}), 2, 2).main_port == 2222);
}

TEST_CASE("mpi environment: MPICH / Intel MPI", "[launch]") {
  auto e = detect({{"PMI_SIZE", "3"},
                   {"PMI_RANK", "2"},
                   {"MPI_LOCALRANKID", "2"},
                   {"MPI_LOCALNRANKS", "3"},
                   {"PMIX_NAMESPACE", "job7"}},
                  3, 1);
  CHECK(e.name == "mpi");
  CHECK(e.global_rank == 2);
  CHECK(e.local_rank == 2);
  CHECK(e.node_rank == 0);
  CHECK(e.main_address == "127.0.0.1");
  CHECK(e.main_port == fabric::detail::port_from_job_id("job7"));
  SECTION("no local rank: rank modulo devices") {
    auto f = detect({{"PMI_SIZE", "4"}, {"PMI_RANK", "3"}, {"MASTER_ADDR", "h"}}, 2, 2);
    CHECK(f.local_rank == 1);
    CHECK(f.node_rank == 1);
    CHECK(f.main_port == 12910);
  }
}

TEST_CASE("mpi environment: a single process is not mpi", "[launch]") {
  CHECK(detect({{"OMPI_COMM_WORLD_SIZE", "1"}, {"OMPI_COMM_WORLD_RANK", "0"}}, 1, 1).name == "lightning");
  CHECK(detect({{"PMI_SIZE", "1"}}, 1, 1).name == "lightning");
}

TEST_CASE("precedence: torchelastic > slurm > mpi > lightning", "[launch]") {
  const Vars lightning{{"LOCAL_RANK", "1"}};
  const Vars mpi_for_8{{"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_RANK", "0"}, {"MASTER_ADDR", "h"}};
  auto all = with(with(with(torchelastic, slurm), mpi_for_8), lightning);
  // SLURM_PROCID and RANK differ, so the winner is visible in the rank too.
  CHECK(detect(all, 4, 2).name == "torchelastic");
  CHECK(detect(all, 4, 2).global_rank == 5);
  auto no_elastic = without(all, "TORCHELASTIC_RUN_ID");
  CHECK(detect(no_elastic, 4, 2).name == "slurm");
  CHECK(detect(no_elastic, 4, 2).global_rank == 6);
  auto no_slurm = without(no_elastic, "SLURM_NTASKS");
  CHECK(detect(no_slurm, 4, 2).name == "mpi");
  CHECK(detect(no_slurm, 4, 2).global_rank == 0);
  auto only_lightning = with(lightning, {{"MASTER_ADDR", "h"}, {"MASTER_PORT", "5"}});
  CHECK(detect(only_lightning, 4, 2).name == "lightning");
}

TEST_CASE("validation: non-numeric values name the variable and the text", "[launch]") {
  CHECK_THROWS_WITH(detect({{"LOCAL_RANK", "one"}}, 2),
                    ContainsSubstring("LOCAL_RANK") && ContainsSubstring("\"one\"") && ContainsSubstring("integer"));
  CHECK_THROWS_WITH(detect(with(torchelastic, {{"WORLD_SIZE", "8x"}}), 4, 2),
                    ContainsSubstring("WORLD_SIZE") && ContainsSubstring("\"8x\""));
  CHECK_THROWS_WITH(detect(with(slurm, {{"SLURM_PROCID", ""}}), 4, 2), ContainsSubstring("SLURM_PROCID"));
  CHECK_THROWS_WITH(detect({{"MASTER_PORT", "http"}}, 1),
                    ContainsSubstring("MASTER_PORT") && ContainsSubstring("\"http\"") && ContainsSubstring("1..65535"));
  CHECK_THROWS_AS(detect({{"LOCAL_RANK", "1.5"}}, 2), fabric::Error);
}

TEST_CASE("validation: negative values", "[launch]") {
  CHECK_THROWS_WITH(detect({{"NODE_RANK", "-1"}}, 1),
                    ContainsSubstring("NODE_RANK") && ContainsSubstring("non-negative"));
  CHECK_THROWS_WITH(detect(with(torchelastic, {{"RANK", "-3"}}), 4, 2),
                    ContainsSubstring("RANK") && ContainsSubstring("-3"));
  CHECK_THROWS_WITH(detect_environment(0, 1, fake({})), ContainsSubstring("devices >= 1") && ContainsSubstring("0"));
  CHECK_THROWS_WITH(detect_environment(1, -2, fake({})), ContainsSubstring("num_nodes >= 1"));
}

TEST_CASE("validation: ranks out of range", "[launch]") {
  CHECK_THROWS_WITH(detect(with(torchelastic, {{"RANK", "8"}}), 4, 2),
                    ContainsSubstring("below the world size 8") && ContainsSubstring("rank 8"));
  CHECK_THROWS_WITH(detect({{"LOCAL_RANK", "4"}}, 4), ContainsSubstring("below devices = 4") &&
                                                          ContainsSubstring("local rank 4") &&
                                                          ContainsSubstring("Options::devices"));
  CHECK_THROWS_WITH(detect({{"NODE_RANK", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "9"}}, 1, 2),
                    ContainsSubstring("below num_nodes = 2") && ContainsSubstring("node rank 2"));
}

// Lightning: tests_fabric/strategies/launchers/test_subprocess_script.py::test_validate_cluster_environment_user_settings
TEST_CASE("validation: the launcher's world size must be devices * num_nodes", "[launch]") {
  CHECK_THROWS_WITH(detect(torchelastic, 2, 2), ContainsSubstring("devices * num_nodes = 2 * 2 = 4") &&
                                                    ContainsSubstring("found 8") && ContainsSubstring("torchelastic") &&
                                                    ContainsSubstring("--nproc-per-node"));
  CHECK_THROWS_WITH(detect(without(openmpi, "OMPI_COMM_WORLD_LOCAL_SIZE"), 3, 1),
                    ContainsSubstring("= 3") && ContainsSubstring("found 4") && ContainsSubstring("mpi"));
}

TEST_CASE("validation: SLURM tasks per node and nodes must match the options", "[launch]") {
  CHECK_THROWS_WITH(detect(slurm, 2, 4), ContainsSubstring("SLURM_NTASKS_PER_NODE") &&
                                             ContainsSubstring("devices = 2") && ContainsSubstring("found 4") &&
                                             ContainsSubstring("--ntasks-per-node"));
  CHECK_THROWS_WITH(detect(without(slurm, "SLURM_NTASKS_PER_NODE"), 4, 1),
                    ContainsSubstring("SLURM_NNODES") && ContainsSubstring("--nodes"));
}

TEST_CASE("validation: ports outside 1..65535", "[launch]") {
  CHECK_THROWS_WITH(detect({{"MASTER_PORT", "0"}}), ContainsSubstring("1..65535") && ContainsSubstring("found 0"));
  CHECK_THROWS_WITH(detect({{"MASTER_PORT", "70000"}}), ContainsSubstring("found 70000"));
  CHECK_THROWS_WITH(detect(with(slurm, {{"MASTER_PORT", "65536"}}), 4, 2), ContainsSubstring("MASTER_PORT"));
  CHECK(detect({{"MASTER_PORT", "65535"}}).main_port == 65535);
}

TEST_CASE("validation: several nodes need MASTER_ADDR", "[launch]") {
  CHECK_THROWS_WITH(detect({{"MASTER_PORT", "1234"}}, 1, 2),
                    ContainsSubstring("MASTER_ADDR") && ContainsSubstring("2 nodes"));
  CHECK_THROWS_WITH(detect(without(torchelastic, "MASTER_ADDR"), 4, 2),
                    ContainsSubstring("MASTER_ADDR") && ContainsSubstring("torchelastic"));
  CHECK_THROWS_WITH(detect(without(openmpi, "MASTER_ADDR"), 2, 2),
                    ContainsSubstring("MASTER_ADDR") && ContainsSubstring("mpi"));
  CHECK_THROWS_WITH(detect({{"MASTER_ADDR", "h"}}, 1, 2), ContainsSubstring("MASTER_PORT"));
  // One node: the address defaults to this machine.
  auto one_node = with(without(openmpi, "MASTER_ADDR"), {{"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
  CHECK(detect(one_node, 4, 1).main_address == "127.0.0.1");
}

TEST_CASE("slurm node lists", "[launch]") {
  using fabric::detail::expand_slurm_nodelist;
  using V = std::vector<std::string>;
  CHECK(expand_slurm_nodelist("node1") == V{"node1"});
  CHECK(expand_slurm_nodelist("a,b,c") == V{"a", "b", "c"});
  CHECK(expand_slurm_nodelist("node[001-004,007],gpu5") ==
        V{"node001", "node002", "node003", "node004", "node007", "gpu5"});
  CHECK(expand_slurm_nodelist("n[8-10]") == V{"n8", "n9", "n10"});
  CHECK(expand_slurm_nodelist("r[1-2]-n[01-02]") == V{"r1-n01", "r1-n02", "r2-n01", "r2-n02"});
  CHECK(expand_slurm_nodelist("x[3]y") == V{"x3y"});
  CHECK(fabric::detail::first_slurm_host("node[009-012]").value() == "node009");
  CHECK_FALSE(fabric::detail::first_slurm_host("").has_value());
  CHECK_THROWS_WITH(expand_slurm_nodelist("node[1-"), ContainsSubstring("brackets"));
  CHECK_THROWS_WITH(expand_slurm_nodelist("node[4-2]"), ContainsSubstring("4-2"));
  CHECK_THROWS_WITH(expand_slurm_nodelist("node[a-b]"), ContainsSubstring("a-b"));
}

TEST_CASE("validation: mpirun's processes per node must be devices", "[launch]") {
  CHECK_THROWS_WITH(detect(openmpi, 4, 1), ContainsSubstring("devices = 4") && ContainsSubstring("local size of 2") &&
                                               ContainsSubstring("ppr:4:node"));
}

// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_default_attributes - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_attributes_from_environment_variables - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_detect - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_world_size_from_xla_runtime_greater_2_1 - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_global_rank_from_xla_runtime_greater_2_1 - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_local_rank_from_xla_runtime_greater_2_1 - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
// Lightning left out: tests_fabric/plugins/environments/test_xla.py::test_setters_readonly_when_xla_runtime_greater_2_1 - XLA/TPU (Python's torch_xla runtime), which LibTorch and fabric do not have
