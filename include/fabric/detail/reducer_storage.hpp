#pragma once
// The bytes fabric reserves for a c10d::Reducer where it declares the class itself
// (fabric/detail/reducer_compat.hpp); tests/static/reducer_layout.cpp checks that LibTorch's object fits.

#include <cstddef>

namespace fabric::detail {

/// Storage of the declared c10d::Reducer; LibTorch 1.13's object takes 912 bytes on x86-64.
inline constexpr std::size_t reducer_storage_bytes = 4096;

}  // namespace fabric::detail
