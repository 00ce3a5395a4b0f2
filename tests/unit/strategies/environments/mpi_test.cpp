// fabric::MPIEnvironment from fake environments: Lightning's plugins/environments/test_mpi.py, where mpi4py's
// communicators are replaced by the variables MPI launchers set.

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/environments/mpi.hpp>

#include "unit/strategies/environments/fake_env.hpp"

#include <catch2/catch_test_macros.hpp>

using fabric_test::fake;
using fabric_test::Vars;

// Lightning: tests_fabric/plugins/environments/test_mpi.py::test_detect
TEST_CASE("mpi: detected when mpirun started more than one process", "[launch][mpi]") {
  CHECK_FALSE(fabric::MPIEnvironment::detect(fake({})));
  CHECK_FALSE(fabric::MPIEnvironment::detect(fake({{"OMPI_COMM_WORLD_SIZE", "0"}})));
  CHECK_FALSE(fabric::MPIEnvironment::detect(fake({{"OMPI_COMM_WORLD_SIZE", "1"}})));
  CHECK(fabric::MPIEnvironment::detect(fake({{"OMPI_COMM_WORLD_SIZE", "2"}})));
  CHECK(fabric::MPIEnvironment::detect(fake({{"PMI_SIZE", "2"}})));
}

// Lightning: tests_fabric/plugins/environments/test_mpi.py::test_default_attributes
TEST_CASE("mpi: external processes; address 127.0.0.1 and a port from the job when nothing says otherwise",
          "[launch][mpi]") {
  const auto t =
      fabric::MPIEnvironment{}.topology(fake({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "0"}}), 2, 1);
  CHECK(t.creates_processes_externally);
  CHECK(t.main_address == "127.0.0.1");
  CHECK(t.main_port == 12910);
  CHECK(t.node_rank == 0);
}

// Lightning: tests_fabric/plugins/environments/test_mpi.py::test_init_local_comm
TEST_CASE("mpi: node rank and local rank of 4 processes on two hosts", "[launch][mpi]") {
  // Lightning groups mpi4py's ranks by host name; the launchers say the same through their variables.
  const auto on = [](int rank) {
    return fabric::MPIEnvironment{}.topology(fake({{"OMPI_COMM_WORLD_SIZE", "4"},
                                                   {"OMPI_COMM_WORLD_RANK", std::to_string(rank)},
                                                   {"OMPI_COMM_WORLD_LOCAL_RANK", std::to_string(rank % 2)},
                                                   {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                                   {"MASTER_ADDR", "host1"}}),
                                             2, 2);
  };
  CHECK(on(0).node_rank == 0);
  CHECK(on(1).node_rank == 0);
  CHECK(on(2).node_rank == 1);
  CHECK(on(3).node_rank == 1);
  CHECK(on(3).local_rank == 1);
}

// Lightning: tests_fabric/plugins/environments/test_mpi.py::test_world_comm
TEST_CASE("mpi: world size and global rank", "[launch][mpi]") {
  const auto t = fabric::MPIEnvironment{}.topology(
      fake({{"PMI_SIZE", "8"}, {"PMI_RANK", "3"}, {"MPI_LOCALNRANKS", "8"}, {"MPI_LOCALRANKID", "3"}}), 8, 1);
  CHECK(t.world_size == 8);
  CHECK(t.global_rank == 3);
  CHECK(t.local_rank == 3);
}

// Lightning left out: tests_fabric/plugins/environments/test_mpi.py::test_dependencies - the mpi4py import check; fabric reads the MPI launchers' variables and needs no Python module
// Lightning left out: tests_fabric/plugins/environments/test_mpi.py::test_setters - set_global_rank/set_world_size are Python no-ops that log at debug level; fabric's environments have no setters (a Topology is read once from the launcher)
