#pragma once
// fabric's multi-process training: everything of fabric/fabric.hpp, plus the parallel strategies (DDP
// over c10d), the launcher of `Fabric::launch` and the cluster environments (torchelastic, SLURM, LSF,
// MPI, Kubeflow, Lightning's own). Include it instead of fabric/fabric.hpp in the translation units
// that name fabric::DDP; it brings c10d, the Reducer and the POSIX process headers.
//
//     #include <fabric/distributed.hpp>
//     fabric::Fabric<fabric::Auto, fabric::DDP> fabric({.devices = 4});
//     fabric.launch();

#include "fabric/fabric.hpp"
#include "fabric/strategies/ddp.hpp"
#include "fabric/strategies/environments/detect.hpp"
#include "fabric/strategies/environments/environment.hpp"
#include "fabric/strategies/environments/kubeflow.hpp"
#include "fabric/strategies/environments/lightning.hpp"
#include "fabric/strategies/environments/lsf.hpp"
#include "fabric/strategies/environments/mpi.hpp"
#include "fabric/strategies/environments/slurm.hpp"
#include "fabric/strategies/environments/torchelastic.hpp"
#include "fabric/strategies/fsdp.hpp"
#include "fabric/strategies/launchers/process_set.hpp"
#include "fabric/strategies/launchers/subprocess.hpp"
#include "fabric/strategies/parallel.hpp"
