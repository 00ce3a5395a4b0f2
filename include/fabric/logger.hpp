#pragma once
// fabric::Logger, the interface the loggers passed in Options implement. Torch-free.

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace fabric {

/// Metrics as logged: name to value.
using Metrics = std::map<std::string, double>;

/// Receives metrics from `Fabric::log` and `Fabric::log_dict` on global rank zero.
class Logger {
 public:
  virtual ~Logger() = default;
  /// Returns the experiment name.
  virtual std::string name() const = 0;
  /// Returns the experiment version (e.g. "0" for version_0).
  virtual std::string version() const = 0;
  /// Returns the directory that holds all experiments.
  virtual std::filesystem::path root_dir() const = 0;
  /// Returns the directory this run writes into.
  virtual std::filesystem::path log_dir() const = 0;
  /// Records metrics at a step; without a step the logger counts its own.
  virtual void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) = 0;
  /// Records hyper-parameters.
  virtual void log_hyperparams(const std::map<std::string, std::string>& params) = 0;
  /// Writes what is buffered.
  virtual void save() = 0;
  /// Writes what is buffered and closes the run ("success", "failed", ...).
  virtual void finalize(std::string_view status) = 0;
};

}  // namespace fabric
