#pragma once
// The library's version, as macros and as a constexpr value: the one place it is written (the CMake
// project reads it from here). Torch-free.

#include <string_view>

#define FABRIC_VERSION_MAJOR 0
#define FABRIC_VERSION_MINOR 1
#define FABRIC_VERSION_PATCH 0
#define FABRIC_VERSION (FABRIC_VERSION_MAJOR * 10000 + FABRIC_VERSION_MINOR * 100 + FABRIC_VERSION_PATCH)

#define FABRIC_DETAIL_STRINGIFY(x) #x
#define FABRIC_DETAIL_VERSION_STRING(major, minor, patch) \
  FABRIC_DETAIL_STRINGIFY(major) "." FABRIC_DETAIL_STRINGIFY(minor) "." FABRIC_DETAIL_STRINGIFY(patch)

namespace fabric {

/// Returns the library version as "major.minor.patch".
constexpr std::string_view version() noexcept {
  return FABRIC_DETAIL_VERSION_STRING(FABRIC_VERSION_MAJOR, FABRIC_VERSION_MINOR, FABRIC_VERSION_PATCH);
}

}  // namespace fabric
