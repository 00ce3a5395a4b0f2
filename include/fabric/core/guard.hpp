#pragma once
// Small RAII helpers shared by the policies. Torch-free.

namespace fabric {

/// A guard that does nothing: what policies return where Lightning returns a null context.
struct NullGuard {
  constexpr NullGuard() noexcept = default;
  NullGuard(const NullGuard&) = delete;
  NullGuard& operator=(const NullGuard&) = delete;
};

}  // namespace fabric
