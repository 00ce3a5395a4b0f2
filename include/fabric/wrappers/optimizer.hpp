#pragma once
// fabric::Optimizer: the typed wrapper that Fabric::setup returns for an optimizer.

#include "fabric/core/hooks.hpp"
#include "fabric/core/options.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/detail/zero_grad.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>

#include <concepts>
#include <cstdint>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

/// A policy whose optimizer step does more than the optimizer's own (FP16Mixed's gradient scaler:
/// unscaling, the inf/NaN check, the scale update), so that a step of the LibTorch optimizer behind a
/// set-up optimizer would skip it: with one, `Fabric::backward` checks that no such step ran. A policy
/// says so with `static constexpr bool needs_fabric_step = true;`; without the member it is false.
template <class P>
concept NeedsFabricStep = requires {
  requires static_cast<bool>(P::needs_fabric_step);
};

// Optional precision hooks. Each is found on its own, and a precision without it gets fabric's default, so
// a precision overrides one step without taking on the others (fabric::BF16Master, whose optimizers step
// float32 copies of the module's parameters, has all four).

/// A precision that rewrites each optimizer `Fabric::setup` wraps (BF16Master puts its float32 masters in
/// the param groups): `setup_optimizer(optimizer)` runs before the strategy sets the optimizer up. Without
/// it the optimizer is set up as it is.
template <class P>
concept SetsUpOptimizers = requires(P& p, torch::optim::Optimizer& o) {
  p.setup_optimizer(o);
};

/// A precision that resets the gradients itself (they are not on the optimizer's tensors): the optimizer
/// wrapper's zero_grad calls `zero_grad(optimizer, set_to_none)`. Without it the wrapper resets the
/// gradients of the optimizer's parameters.
template <class P>
concept ZeroesGradients = requires(P& p, torch::optim::Optimizer& o, bool set_to_none) {
  p.zero_grad(o, set_to_none);
};

/// A precision that clips the gradients itself: the strategies' clip_gradients call
/// `clip_gradients(optimizer, options, device)` and return its total norm. Without it they unscale the
/// gradients through the precision and clip the optimizer's (fabric::clip_gradients).
template <class P>
concept ClipsGradients = requires(P& p, torch::optim::Optimizer& o, const ClipOptions& c, const c10::Device& d) {
  { p.clip_gradients(o, c, d) } -> std::same_as<std::optional<at::Tensor>>;
};

/// A precision that changes what checkpoints hold (BF16Master's hold the masters): Fabric's save, load and
/// load_raw run inside `checkpoint_scope(loads, fn)`, which calls fn and returns what it returns. Without
/// it they run as they are.
template <class P>
concept ScopesCheckpoints = requires(P& p, void (*fn)()) {
  p.checkpoint_scope(true, fn);
};

namespace detail {

/// Returns what a step of the optimizer changes and the step check watches: the sum of its parameters'
/// version counters (bumped by in-place updates: Adam, AdamW, RMSprop, Adagrad, fabric's own step), the
/// number of its per-parameter states (created at the first step) and the version counters of SGD's
/// momentum buffers. Each only grows, so the sum changes when any does.
/// NOTE: LibTorch's SGD writes the parameters through `.data()`, which has a counter of its own: without
/// momentum its steps change none of these.
inline std::int64_t step_fingerprint(const torch::optim::Optimizer& optimizer) {
  std::int64_t sum = 0;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) sum += p.defined() ? p._version() : 0;
  }
  const auto& state = optimizer.state();
  sum += static_cast<std::int64_t>(state.size());
  for (const auto& entry : state) {
    if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(entry.second.get())) {
      if (sgd->momentum_buffer().defined()) sum += sgd->momentum_buffer()._version();
    }
  }
  return sum;
}

}  // namespace detail

/// Wraps a set-up optimizer: `step` goes through the strategy and the precision (loss scaling,
/// skipped steps) and then calls the `on_after_optimizer_step` hook; `->` and `*` reach the optimizer
/// itself.
template <class O, class F>
class Optimizer {
 public:
  using optimizer_type = O;
  using fabric_type = F;

  Optimizer(std::shared_ptr<O> optimizer, F& fabric) : optimizer_(std::move(optimizer)), fabric_(&fabric) {}

  /// Performs one optimisation step and returns what the optimizer's step returns.
  at::Tensor step(torch::optim::Optimizer::LossClosure closure = nullptr) {
    at::Tensor loss;
    if constexpr (F::checks_optimizer_step) {
      // NOTE: the step check at backward knows this step ran (and skips the backwards of its closure).
      ++fabric_->optimizer_steps_running_;
      struct Done {
        F& fabric;
        ~Done() {
          --fabric.optimizer_steps_running_;
          fabric.stepped_since_backward_ = true;
        }
      } done{*fabric_};
      loss = fabric_->strategy().optimizer_step(*optimizer_, fabric_->precision(), std::move(closure));
    } else {
      loss = fabric_->strategy().optimizer_step(*optimizer_, fabric_->precision(), std::move(closure));
    }
    fabric_->call(hooks::on_after_optimizer_step, *this);
    return loss;
  }
  /// Resets the gradients as the optimizer's own zero_grad does by default in this LibTorch (to
  /// zeros in 1.x, to undefined tensors in 2.x).
  void zero_grad() { zero_grad(detail::torch_zero_grad_sets_none); }
  /// Resets the gradients: to undefined tensors with set_to_none, else to zeros in place.
  void zero_grad(bool set_to_none) {
    if constexpr (ZeroesGradients<typename F::precision_type>) {
      fabric_->precision().zero_grad(*optimizer_, set_to_none);
    } else {
      for (auto& group : optimizer_->param_groups()) {
        for (auto& p : group.params()) detail::zero_grad(p, set_to_none);
      }
    }
  }
  /// Returns the optimizer's parameter groups.
  std::vector<torch::optim::OptimizerParamGroup>& param_groups() noexcept { return optimizer_->param_groups(); }
  /// Returns the optimizer's per-parameter state.
  auto& state() noexcept { return optimizer_->state(); }

  /// Reaches the wrapped optimizer.
  O* operator->() const noexcept { return optimizer_.get(); }
  /// Reaches the wrapped optimizer.
  O& operator*() const noexcept { return *optimizer_; }
  /// Returns the wrapped optimizer (Lightning's `optimizer.optimizer`).
  O& optimizer() const noexcept { return *optimizer_; }
  /// Returns the shared pointer to the wrapped optimizer.
  const std::shared_ptr<O>& ptr() const noexcept { return optimizer_; }

 private:
  std::shared_ptr<O> optimizer_;
  F* fabric_;
};

namespace detail {
template <class T>
inline constexpr bool is_fabric_optimizer_v = false;
template <class O, class F>
inline constexpr bool is_fabric_optimizer_v<Optimizer<O, F>> = true;
}  // namespace detail

/// A set-up optimizer whose optimizer is Opt or derives from it, for the parameters of user functions
/// (`fabric::OptimizerOf<torch::optim::Optimizer> auto&` takes any):
///
///     void step(fabric::OptimizerOf<torch::optim::AdamW> auto& optimizer);
// NOTE: a concept rather than the wrapper type keeps the Fabric type out of the user's signature.
template <class W, class Opt>
concept OptimizerOf = detail::is_fabric_optimizer_v<std::remove_cvref_t<W>> &&
    std::derived_from<typename std::remove_cvref_t<W>::optimizer_type, Opt>;

}  // namespace fabric
