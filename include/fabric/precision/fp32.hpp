#pragma once
// fabric::FP32: full precision ("32-true"), Lightning's default.

#include "fabric/precision/precision.hpp"

#include <string_view>

namespace fabric {

/// Trains in float32: no conversion, no autocast, no loss scaling (all of PrecisionBase's defaults).
struct FP32 : PrecisionBase {
  static constexpr std::string_view name = "32-true";
};

}  // namespace fabric
