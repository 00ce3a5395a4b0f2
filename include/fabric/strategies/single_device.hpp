#pragma once
// fabric::SingleDevice: one process on one device, Lightning's "single_device" strategy.

#include "fabric/concepts.hpp"
#include "fabric/config.hpp"
#include "fabric/detail/guard.hpp"
#include "fabric/error.hpp"
#include "fabric/options.hpp"

#include <ATen/core/Tensor.h>

#include <string_view>

namespace fabric {

/// Trains in this process on one device; collectives are identities, barriers return at once.
class SingleDevice {
 public:
  using category = strategy_tag;
  static constexpr std::string_view name = "single_device";
  static constexpr bool is_distributed = false;

  /// Settings of the strategy (none yet).
  struct Options {};
  /// What the strategy keeps per set-up module (nothing).
  struct ModuleState {};

  SingleDevice() = default;
  explicit SingleDevice(Options /*options*/) noexcept {}

  /// Checks the combination with an accelerator and a precision at compile time (all combine).
  template <Accelerator A, Precision P>
  static constexpr void check() noexcept {}

  /// Validates the topology asked for in Fabric's options.
  void setup_environment(const fabric::Options& options) const {
    if (options.devices != 1 || options.num_nodes != 1) {
      detail::raise(
          "SingleDevice runs one process on one device: expected devices = 1 and num_nodes = 1, found devices = {} "
          "and num_nodes = {}; use a distributed strategy (fabric::DDP) for more",
          options.devices, options.num_nodes);
    }
  }

  int global_rank() const noexcept { return 0; }
  int local_rank() const noexcept { return 0; }
  int node_rank() const noexcept { return 0; }
  int world_size() const noexcept { return 1; }

  /// Waits for all processes (there is only this one).
  void barrier() const noexcept {}

  /// Prepares a module after it is on its device (nothing to do).
  template <class M>
  ModuleState setup_module(M& /*module*/) const noexcept {
    return {};
  }
  /// Runs before each wrapped forward.
  FABRIC_ALWAYS_INLINE void pre_forward(ModuleState& /*state*/) const noexcept {}
  /// Runs after each wrapped forward with its output.
  template <class Out>
  FABRIC_ALWAYS_INLINE void post_forward(ModuleState& /*state*/, const Out& /*output*/) const noexcept {}
  /// Returns the guard that skips gradient synchronisation (nothing to skip).
  NullGuard no_backward_sync(ModuleState& /*state*/, bool /*enabled*/) const noexcept { return {}; }

  /// Reduces a tensor across processes (identity: one process).
  const at::Tensor& all_reduce(const at::Tensor& tensor, ReduceOp /*op*/) const noexcept { return tensor; }
  /// Gathers a tensor from all processes (identity, no new dimension, as Lightning's single device).
  const at::Tensor& all_gather(const at::Tensor& tensor) const noexcept { return tensor; }
  /// Broadcasts a value from rank src (identity).
  template <class T>
  T broadcast(T value, int /*src*/) const {
    return value;
  }
  /// Combines a boolean decision across processes (identity).
  bool reduce_boolean_decision(bool decision, bool /*all*/) const noexcept { return decision; }
  /// Says whether setup_dataloaders shards data across ranks.
  bool shards_data() const noexcept { return false; }
};

}  // namespace fabric
