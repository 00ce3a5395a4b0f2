#pragma once
// The library's version, as macros and as a constexpr value. Torch-free.

#include <string_view>

#define FABRIC_VERSION_MAJOR 0
#define FABRIC_VERSION_MINOR 1
#define FABRIC_VERSION_PATCH 0
#define FABRIC_VERSION (FABRIC_VERSION_MAJOR * 10000 + FABRIC_VERSION_MINOR * 100 + FABRIC_VERSION_PATCH)

namespace fabric {

/// Returns the library version as "major.minor.patch".
constexpr std::string_view version() noexcept { return "0.1.0"; }

}  // namespace fabric
