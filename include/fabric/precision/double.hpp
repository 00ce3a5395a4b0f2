#pragma once
// fabric::FP64: float64 weights and compute ("64-true").

#include "fabric/precision/half.hpp"

#include <c10/core/ScalarType.h>

namespace fabric {

/// float64 everywhere ("64-true").
using FP64 = TruePrecision<c10::ScalarType::Double>;
}  // namespace fabric
