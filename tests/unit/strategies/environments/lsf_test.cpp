// fabric::LSFEnvironment from fake environments and rank files: Lightning's plugins/environments/test_lsf.py.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/environments/lsf.hpp>

#include "unit/strategies/environments/fake_env.hpp"
#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fstream>
#include <string>
#include <tuple>
#include <type_traits>

using Catch::Matchers::ContainsSubstring;
using fabric_test::fake;
using fabric_test::Vars;
using fabric_test::with;
using fabric_test::without;

namespace {

/// Writes Lightning's test rank file: the launch node, then four compute hosts.
std::string make_rankfile(const fabric_test::TempDir& dir) {
  const auto path = dir / "lsb_djob_rankfile";
  std::ofstream(path) << "batch\n10.10.10.0\n10.10.10.1\n10.10.10.2\n10.10.10.3";
  return path.string();
}

Vars jsrun(const std::string& rankfile) {
  return {{"LSB_DJOB_RANKFILE", rankfile},
          {"LSB_JOBID", "1234"},
          {"JSM_NAMESPACE_SIZE", "4"},
          {"JSM_NAMESPACE_RANK", "3"},
          {"JSM_NAMESPACE_LOCAL_RANK", "1"}};
}

}  // namespace

// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_missing_lsb_djob_rankfile
// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_empty_lsb_djob_rankfile
TEST_CASE("lsf: a missing or empty LSB_DJOB_RANKFILE is an error naming it", "[launch][lsf]") {
  const fabric::LSFEnvironment lsf{.hostname = "10.10.10.2"};
  CHECK_THROWS_WITH(lsf.topology(fake({{"LSB_JOBID", "1234"},
                                       {"JSM_NAMESPACE_SIZE", "4"},
                                       {"JSM_NAMESPACE_RANK", "3"},
                                       {"JSM_NAMESPACE_LOCAL_RANK", "1"}}),
                                 1, 4),
                    ContainsSubstring("LSB_DJOB_RANKFILE") && ContainsSubstring("unset"));
  fabric_test::TempDir dir("lsf");
  CHECK_THROWS_WITH(lsf.topology(fake(with(jsrun(make_rankfile(dir)), {{"LSB_DJOB_RANKFILE", ""}})), 1, 4),
                    ContainsSubstring("LSB_DJOB_RANKFILE") && ContainsSubstring("empty"));
  CHECK_THROWS_WITH(
      lsf.topology(fake(with(jsrun(make_rankfile(dir)), {{"LSB_DJOB_RANKFILE", (dir / "none").string()}})), 1, 4),
      ContainsSubstring("no readable file"));
}

// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_missing_lsb_job_id
TEST_CASE("lsf: without MASTER_PORT the port needs LSB_JOBID", "[launch][lsf]") {
  fabric_test::TempDir dir("lsf");
  const fabric::LSFEnvironment lsf{.hostname = "10.10.10.2"};
  CHECK_THROWS_WITH(lsf.topology(fake(without(jsrun(make_rankfile(dir)), "LSB_JOBID")), 1, 4),
                    ContainsSubstring("LSB_JOBID"));
  CHECK_THROWS_WITH(lsf.topology(fake(with(jsrun(make_rankfile(dir)), {{"LSB_JOBID", "job"}})), 1, 4),
                    ContainsSubstring("LSB_JOBID") && ContainsSubstring("\"job\""));
}

// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_manual_main_port_and_address
// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_attributes_from_environment_variables
// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_node_rank
TEST_CASE("lsf: ranks, main address and port come from jsrun's variables and the rank file", "[launch][lsf]") {
  fabric_test::TempDir dir("lsf");
  const auto vars = jsrun(make_rankfile(dir));
  const fabric::LSFEnvironment lsf{.hostname = "10.10.10.2"};
  const auto t = lsf.topology(fake(vars), 1, 4);
  CHECK(t.name == "lsf");
  CHECK(t.creates_processes_externally);
  CHECK(t.main_address == "10.10.10.0");
  CHECK(t.main_port == 10234);
  CHECK(t.world_size == 4);
  CHECK(t.global_rank == 3);
  CHECK(t.local_rank == 1);
  CHECK(t.node_rank == 2);
  CHECK(lsf.topology(fake(with(vars, {{"MASTER_PORT", "4321"}})), 1, 4).main_port == 4321);
  CHECK_THROWS_WITH(fabric::LSFEnvironment{.hostname = "elsewhere"}.topology(fake(vars), 1, 4),
                    ContainsSubstring("elsewhere") && ContainsSubstring("10.10.10.0, 10.10.10.1"));
}

// Lightning: tests_fabric/plugins/environments/test_lsf.py::test_detect
TEST_CASE("lsf: detected by LSB_JOBID, LSB_DJOB_RANKFILE and jsrun's namespace variables", "[launch][lsf]") {
  CHECK_FALSE(fabric::LSFEnvironment::detect(fake({})));
  CHECK(fabric::LSFEnvironment::detect(fake(
      {{"LSB_DJOB_RANKFILE", ""}, {"LSB_JOBID", ""}, {"JSM_NAMESPACE_SIZE", ""}, {"JSM_NAMESPACE_LOCAL_RANK", ""}})));
  CHECK_FALSE(fabric::LSFEnvironment::detect(fake({{"LSB_JOBID", "1"}, {"JSM_NAMESPACE_SIZE", "4"}})));
}

TEST_CASE("lsf: detected after SLURM and before MPI, and checked against the options", "[launch][lsf]") {
  static_assert(std::is_same_v<fabric::AutoEnvironment,
                               fabric::DetectEnvironment<fabric::TorchElasticEnvironment, fabric::SLURMEnvironment,
                                                         fabric::LSFEnvironment, fabric::MPIEnvironment>>);
  fabric_test::TempDir dir("lsf");
  // One process on each of the four hosts; this one is rank 3 on the last host.
  const auto vars = with(jsrun(make_rankfile(dir)), {{"JSM_NAMESPACE_LOCAL_RANK", "0"}});
  using Order = fabric::DetectEnvironment<fabric::SLURMEnvironment, fabric::LSFEnvironment, fabric::MPIEnvironment>;
  const fabric::AnyEnvironment env(Order{std::tuple{
      fabric::SLURMEnvironment{}, fabric::LSFEnvironment{.hostname = "10.10.10.3"}, fabric::MPIEnvironment{}}});
  const Vars mpi{{"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_RANK", "0"}, {"MASTER_ADDR", "head"}};
  const Vars slurm{{"SLURM_NTASKS", "4"}, {"SLURM_PROCID", "0"},       {"SLURM_LOCALID", "0"},
                   {"SLURM_NODEID", "0"}, {"SLURM_JOB_NAME", "train"}, {"SLURM_NODELIST", "n[1-4]"}};
  const auto t = env.topology(fake(with(vars, mpi)), 1, 4);
  CHECK(t.name == "lsf");
  CHECK(t.node_rank == 3);
  CHECK(t.global_rank == 3);
  CHECK(env.topology(fake(with(with(vars, mpi), slurm)), 1, 4).name == "slurm");
  CHECK(env.topology(fake(mpi), 1, 4).name == "mpi");
  CHECK_THROWS_WITH(env.topology(fake(vars), 2, 1),
                    ContainsSubstring("devices * num_nodes = 2 * 1 = 2") && ContainsSubstring("found 4"));
  CHECK_THROWS_WITH(env.topology(fake(vars), 2, 2), ContainsSubstring("below num_nodes = 2"));
}
