#pragma once
// fabric::FP32: full precision ("32-true"), Lightning's default.

#include "fabric/concepts.hpp"
#include "fabric/config.hpp"
#include "fabric/detail/guard.hpp"
#include "fabric/optim/foreach_step.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string_view>
#include <type_traits>
#include <utility>

namespace fabric {

namespace detail {

/// The backward and optimizer step of every precision without loss scaling.
struct UnscaledSteps {
  /// Runs backward on the loss.
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    loss.backward(std::forward<Args>(args)...);
  }
  /// Unscales gradients before clipping (nothing to do).
  template <class O>
  void unscale_gradients(O& /*optimizer*/) noexcept {}
  /// Steps the optimizer.
  template <class O, class Closure>
  at::Tensor optimizer_step(O& optimizer, Closure&& closure) {
    return ::fabric::detail::optimizer_step(optimizer, std::forward<Closure>(closure));
  }
};

}  // namespace detail

/// Trains in float32: no conversion, no autocast, no loss scaling.
struct FP32 : detail::UnscaledSteps {
  using category = precision_tag;
  static constexpr std::string_view name = "32-true";

  /// Returns the dtype of parameters and of what `init_module`/`init_tensor` create.
  static constexpr c10::ScalarType param_dtype() noexcept { return c10::ScalarType::Float; }
  /// Checks the combination with an accelerator at compile time (every accelerator runs float32).
  template <Accelerator A>
  static constexpr void check() noexcept {}

  /// Converts a module's parameters to this precision (nothing to do).
  template <class M>
  void convert_module(M& /*module*/) noexcept {}
  /// Converts an input of the wrapped forward (passed through untouched).
  template <class T>
  FABRIC_ALWAYS_INLINE T&& convert_input(T&& x) noexcept {
    return std::forward<T>(x);
  }
  /// Converts an output of the wrapped forward (passed through untouched).
  template <class T>
  FABRIC_ALWAYS_INLINE std::decay_t<T> convert_output(T&& x) noexcept(
      std::is_nothrow_constructible_v<std::decay_t<T>, T&&>) {
    return std::forward<T>(x);
  }
  /// Returns the context forward and `Fabric::autocast` run in (none for float32).
  NullGuard forward_context() const noexcept { return {}; }
};

}  // namespace fabric
