#pragma once
// fabric::SingleDevice: one process on one device, Lightning's "single_device" strategy.

#include "fabric/strategies/strategy.hpp"

#include <string_view>
#include <utility>

namespace fabric {

/// Trains in this process on one device; collectives are identities, barriers return at once. All of
/// it is fabric::StrategyBase's defaults: derive from SingleDevice to change one step.
///
///     fabric::Fabric<fabric::CPU, fabric::SingleDevice> fabric;
class SingleDevice : public StrategyBase {
 public:
  static constexpr std::string_view name = "single_device";

  /// Settings of the strategy (the checkpoint format).
  using Options = StrategyOptions;

  SingleDevice() = default;
  /// Creates the strategy with settings, e.g. `SingleDevice({.checkpoint_io = MyFormat{}})`.
  explicit SingleDevice(Options options) : StrategyBase(std::move(options)) {}
};

}  // namespace fabric
