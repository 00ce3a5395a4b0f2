#pragma once
// The Precision concept (everything Fabric and the strategies ask of a precision policy), the check that
// names what a policy lacks, and fabric::PrecisionBase, the defaults a precision derives from.

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/core/concepts.hpp"
#include "fabric/core/config.hpp"
#include "fabric/core/guard.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <concepts>
#include <string_view>
#include <type_traits>
#include <utility>

namespace fabric {
namespace detail {

/// The precision states the dtype of new parameters (`init_module`, `init_tensor`).
template <class P>
concept has_param_dtype = requires {
  { P::param_dtype() } -> std::convertible_to<c10::ScalarType>;
};
/// The precision checks its combination with an accelerator at compile time.
template <class P>
concept checks_combination = requires {
  P::template check<AcceleratorArchetype>();
};
/// The precision binds to the device Fabric chose.
template <class P>
concept binds_device = requires(P& p, const c10::Device& d) {
  p.setup_device(d);
};
/// The precision converts a module and the tensors that enter and leave its forward.
template <class P>
concept converts = requires(P& p, torch::nn::Module& m, const at::Tensor& t) {
  p.convert_module(m);
  p.convert_input(t);
  p.convert_output(t);
};
/// The precision gives the context forward (and `Fabric::autocast`) runs in.
template <class P>
concept has_forward_context = requires(P& p) {
  p.forward_context();
};
/// The precision runs backward, unscales gradients before clipping and steps optimizers.
template <class P>
concept runs_steps = requires(P& p, const at::Tensor& loss, torch::optim::Optimizer& o,
                              torch::optim::Optimizer::LossClosure closure) {
  p.backward(loss);
  p.unscale_gradients(o);
  { p.optimizer_step(o, std::move(closure)) } -> std::convertible_to<at::Tensor>;
};

/// The precision checks its combination with a strategy at compile time (optional: fabric::BF16Master
/// refuses FSDP and DP).
template <class P, class S>
concept checks_strategy = requires {
  P::template check_strategy<S>();
};

}  // namespace detail

/// A precision policy: it converts modules and data, gives forward its context and runs the
/// precision-dependent parts of the step (loss scaling, unscaling, the optimizer step). Derive from
/// fabric::PrecisionBase and override what differs.
template <class P>
concept Precision = PolicyOf<P, precision_tag> && std::move_constructible<P> && detail::has_param_dtype<P> &&
    detail::checks_combination<P> && detail::binds_device<P> && detail::converts<P> && detail::has_forward_context<P> &&
    detail::runs_steps<P>;

namespace detail {

/// Fails with one message naming the first member a precision policy lacks; true when it has all.
template <class P>
consteval bool check_precision() {
  if constexpr (!std::move_constructible<P>) {
    static_assert(dependent_false_v<P>, "fabric: a Precision must be move constructible");
  } else if constexpr (!has_param_dtype<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs `static constexpr c10::ScalarType param_dtype()`, the dtype of new "
                  "parameters; derive from fabric::PrecisionBase or add it");
  } else if constexpr (!checks_combination<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs `template <class A> static constexpr void check()`, its compile-time "
                  "check of the accelerator; derive from fabric::PrecisionBase or add it");
  } else if constexpr (!binds_device<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs `void setup_device(const c10::Device&)`; derive from "
                  "fabric::PrecisionBase or add it");
  } else if constexpr (!converts<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs convert_module(module), convert_input(x) and convert_output(x); derive "
                  "from fabric::PrecisionBase or add them");
  } else if constexpr (!has_forward_context<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs forward_context(), the guard forward runs under; derive from "
                  "fabric::PrecisionBase or add it");
  } else if constexpr (!runs_steps<P>) {
    static_assert(dependent_false_v<P>,
                  "fabric: a Precision needs backward(loss), unscale_gradients(optimizer) and "
                  "optimizer_step(optimizer, closure); derive from fabric::PrecisionBase or add them");
  }
  return Precision<P>;
}

/// Returns the dtype a precision computes in, as Lightning's `_plugin_to_compute_dtype`: the autocast
/// dtype of a mixed precision, the dtype of a true precision, else float32.
template <class P>
c10::ScalarType compute_dtype(const P& precision) {
  if constexpr (requires { precision.compute_dtype(); }) {
    return precision.compute_dtype();
  } else if constexpr (requires { P::param_dtype(); }) {
    return P::param_dtype();
  } else {
    return c10::ScalarType::Float;
  }
}

/// Returns data with every floating-point tensor cast to dtype (integer tensors untouched).
template <class T>
std::remove_cvref_t<T> cast_floating(T&& data, c10::ScalarType dtype) {
  auto cast = [dtype](at::Tensor t) {
    return t.defined() && t.is_floating_point() && t.scalar_type() != dtype ? t.to(dtype) : t;
  };
  return map_tensors(std::remove_cvref_t<T>(std::forward<T>(data)), cast);
}

}  // namespace detail

/// The defaults of a precision: float32 parameters, no conversion, no context, plain backward, the
/// fast optimizer step. A precision derives from it and overrides what differs (name it, and give
/// it `using category = precision_tag;` through this base).
///
///     struct Loud : fabric::PrecisionBase {
///       static constexpr std::string_view name = "loud";
///       void backward(const at::Tensor& loss) { fmt::print("backward\n"); loss.backward(); }
///     };
struct PrecisionBase {
  using category = precision_tag;
  /// Says whether the precision works in the module wrapper's forward (fabric::NeedsWrappedForward):
  /// no, float32 computes the same when a forward bypasses the wrapper.
  static constexpr bool needs_wrapped_forward = false;

  /// Returns the dtype of parameters and of what `init_module`/`init_tensor` create.
  static constexpr c10::ScalarType param_dtype() noexcept { return c10::ScalarType::Float; }
  /// Checks the combination with an accelerator at compile time (every accelerator runs float32).
  template <class A>
  static constexpr void check() noexcept {}
  /// Binds the precision to the fabric's device (called once by Fabric; nothing to do).
  void setup_device(const c10::Device& /*device*/) noexcept {}

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
  /// Returns the context forward and `Fabric::autocast` run in (none).
  NullGuard forward_context() const noexcept { return {}; }

  /// Runs backward on the loss.
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    loss.backward(std::forward<Args>(args)...);
  }
  /// Unscales gradients before clipping (nothing to do without loss scaling).
  template <class O>
  void unscale_gradients(O& /*optimizer*/) noexcept {}
  /// Steps the optimizer (fabric's multi-tensor step for LibTorch's Adam, AdamW and SGD).
  template <class O, class Closure>
  at::Tensor optimizer_step(O& optimizer, Closure&& closure) {
    return detail::optimizer_step(optimizer, std::forward<Closure>(closure));
  }
};

}  // namespace fabric
