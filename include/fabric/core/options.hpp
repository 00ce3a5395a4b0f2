#pragma once
// Runtime settings: plain aggregates, used with designated initializers. Torch-free.

#include <cstddef>
#include <cstdio>
#include <limits>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace fabric {

class Logger;

/// Fabric's runtime settings: `fabric::Fabric<> fabric{{.devices = 1}}`.
struct Options {
  /// The value of `devices` that leaves the number to the launcher (the default).
  static constexpr int auto_devices = std::numeric_limits<int>::min();
  /// Processes (devices) per node. Left at `auto_devices`, a distributed strategy takes the number of processes
  /// per node that torchrun, fabric-run, srun, jsrun or mpirun started, and 1 when no launcher started this
  /// process; `Fabric::options().devices` tells the number chosen. A number given that disagrees with the
  /// launcher's is an error.
  int devices = auto_devices;
  /// Number of machines.
  int num_nodes = 1;
  /// Loggers that `log` and `log_dict` write to (on global rank zero).
  std::vector<std::shared_ptr<Logger>> loggers{};
};

/// Switches for `Fabric::setup` and `Fabric::setup_module`.
struct SetupOptions {
  /// Move parameters and buffers to the fabric's device.
  bool move_to_device = true;
};

/// Switches for `Fabric::setup_dataloaders`.
struct DataOptions {
  /// Yield batches already moved to the fabric's device.
  bool move_to_device = true;
  /// Shard the data across ranks (only distributed strategies do; a single device never does).
  bool use_distributed_sampler = true;
};

/// Options of the convenience loader `Fabric::dataloader(dataset, options)`.
struct LoaderOptions {
  /// Samples per batch.
  std::size_t batch_size = 1;
  /// Draw a new random order every epoch (seeded from the global seed).
  bool shuffle = false;
  /// Worker threads that prepare batches (0: in the calling thread).
  std::size_t num_workers = 0;
  /// Drop the last batch when it is smaller than batch_size.
  bool drop_last = false;
  /// Copy batches into pinned memory in the workers, so that their copy to a GPU is asynchronous
  /// (PyTorch's pin_memory; ignored unless the device is a GPU).
  bool pin_memory = false;
};

/// What `Fabric::clip_gradients` clips: exactly one of max_norm and clip_val.
struct ClipOptions {
  /// Rescale gradients so that their total norm is at most this.
  std::optional<double> max_norm{};
  /// Clamp every gradient element into [-clip_val, clip_val].
  std::optional<double> clip_val{};
  /// The p of the p-norm (infinity allowed) used with max_norm.
  double norm_type = 2.0;
  /// Throw when the total norm is NaN or infinite.
  bool error_if_nonfinite = true;
};

/// How `Fabric::print` writes, as Python's print(end=, file=, flush=): `fabric.print({.end = "\r"}, ...)`.
struct PrintOptions {
  /// Written after the text: a newline by default; "" or "\r" for a line that is redrawn.
  std::string_view end = "\n";
  /// The stream written to.
  std::FILE* file = stdout;
  /// Flush the stream after writing (so that it shows at once, and in order with stderr).
  bool flush = true;
};

/// The reduction of `Fabric::all_reduce`.
enum class ReduceOp { sum, mean, min, max };

}  // namespace fabric
