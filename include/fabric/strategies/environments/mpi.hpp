#pragma once
// fabric::MPIEnvironment: processes started by mpirun (OpenMPI, MPICH, Intel MPI). Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"

#include <optional>
#include <string_view>

namespace fabric {

/// The environment of mpirun (Lightning's MPIEnvironment, read from the variables MPI launchers set
/// instead of through mpi4py): OpenMPI's OMPI_COMM_WORLD_* or MPICH/Intel MPI's PMI_* and
/// MPI_LOCAL*; detected when mpirun started more than one process. The node rank is the global rank
/// divided by the processes per node; the port comes from the job id unless MASTER_PORT is set.
struct MPIEnvironment {
  static constexpr std::string_view name = "mpi";

  /// Returns true when mpirun started more than one process.
  static bool detect(const EnvLookup& env) {
    std::optional<int> size;
    if (env("OMPI_COMM_WORLD_SIZE")) {
      size = detail::env_int(env, "OMPI_COMM_WORLD_SIZE");
    } else if (env("PMI_SIZE")) {
      size = detail::env_int(env, "PMI_SIZE");
    }
    return size.value_or(0) > 1;
  }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int devices, int num_nodes) const {
    std::optional<int> size, rank, local_rank, local_size;
    if (env("OMPI_COMM_WORLD_SIZE")) {
      size = detail::env_int(env, "OMPI_COMM_WORLD_SIZE");
      rank = detail::env_required_int(env, "OMPI_COMM_WORLD_RANK", "mpirun");
      local_rank = detail::env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK");
      local_size = detail::env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE");
    } else {
      size = detail::env_int(env, "PMI_SIZE");
      rank = detail::env_required_int(env, "PMI_RANK", "mpirun");
      local_rank = detail::env_int(env, "MPI_LOCALRANKID");
      local_size = detail::env_int(env, "MPI_LOCALNRANKS");
    }
    Topology e;
    e.name = name;
    e.creates_processes_externally = true;
    e.world_size = size.value_or(1);
    e.global_rank = *rank;
    const int per_node = local_size.value_or(devices);
    if (per_node != devices) {
      detail::raise(
          "expected mpirun to start devices = {} processes per node, found a local size of {}; set "
          "Options{{.devices = {}}} or start {} per node (OpenMPI: mpirun --map-by ppr:{}:node, MPICH: -ppn {})",
          devices, per_node, per_node, devices, devices, devices);
    }
    e.local_rank = local_rank.value_or(e.global_rank % per_node);
    e.node_rank = e.global_rank / per_node;
    detail::require_main_address(env, e.name, num_nodes);
    e.main_address = env("MASTER_ADDR").value_or("127.0.0.1");
    if (auto port = detail::env_port(env, "MASTER_PORT")) {
      e.main_port = *port;
    } else {
      auto job = env("OMPI_MCA_ess_base_jobid");
      if (!job) job = env("PMIX_NAMESPACE");
      if (!job) job = env("PMI_JOBID");
      if (!job) job = env("PMIX_ID");
      e.main_port = job ? detail::port_from_job_id(*job) : 12910;
    }
    return e;
  }
};

}  // namespace fabric
