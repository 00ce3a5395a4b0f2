#pragma once
// fabric: Lightning Fabric's way of training, for LibTorch. The umbrella header for one process: the
// Fabric class, every accelerator and precision, the one-process strategies (SingleDevice, DP),
// checkpoints, loggers and utilities. It includes no c10d, no Reducer and no POSIX process header;
// multi-process training (DDP, launchers, cluster environments) is in fabric/distributed.hpp.

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/accelerators/auto.hpp"
#include "fabric/accelerators/cpu.hpp"
#include "fabric/accelerators/cuda.hpp"
#include "fabric/callbacks/progress.hpp"
#include "fabric/core/concepts.hpp"
#include "fabric/core/config.hpp"
#include "fabric/core/error.hpp"
#include "fabric/core/guard.hpp"
#include "fabric/core/hooks.hpp"
#include "fabric/core/options.hpp"
#include "fabric/core/rank_zero.hpp"
#include "fabric/core/type_list.hpp"
#include "fabric/core/version.hpp"
#include "fabric/engine.hpp"
#include "fabric/fwd.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/io/native.hpp"
#include "fabric/io/safetensors.hpp"
#include "fabric/io/sharded.hpp"
#include "fabric/io/state.hpp"
#include "fabric/io/torch_archive.hpp"
#include "fabric/io/torch_pickle.hpp"
#include "fabric/loggers/csv.hpp"
#include "fabric/loggers/logger.hpp"
#include "fabric/loggers/tensorboard.hpp"
#include "fabric/nn/linear.hpp"
#include "fabric/nn/loss.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/precision/double.hpp"
#include "fabric/precision/fp32.hpp"
#include "fabric/precision/grad_scaler.hpp"
#include "fabric/precision/half.hpp"
#include "fabric/precision/mixed.hpp"
#include "fabric/precision/precision.hpp"
#include "fabric/strategies/dp.hpp"
#include "fabric/strategies/single_device.hpp"
#include "fabric/strategies/strategy.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/utils/clip.hpp"
#include "fabric/utils/seed.hpp"
#include "fabric/utils/throughput.hpp"
#include "fabric/wrappers/data_loader.hpp"
#include "fabric/wrappers/module.hpp"
#include "fabric/wrappers/optimizer.hpp"
#include "fabric/wrappers/unit.hpp"

// The multi-process half, for translation units that define FABRIC_DISTRIBUTED before including this
// header (as users of the single header do); otherwise include fabric/distributed.hpp.
#if defined(FABRIC_DISTRIBUTED)
#include "fabric/distributed.hpp"
#endif
