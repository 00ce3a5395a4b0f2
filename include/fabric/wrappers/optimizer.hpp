#pragma once
// fabric::Optimizer: the typed wrapper that Fabric::setup returns for an optimizer.

#include "fabric/core/hooks.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/detail/zero_grad.hpp"

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include <concepts>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

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
    at::Tensor loss = fabric_->strategy().optimizer_step(*optimizer_, fabric_->precision(), std::move(closure));
    fabric_->call(hooks::on_after_optimizer_step, *this);
    return loss;
  }
  /// Resets the gradients as the optimizer's own zero_grad does by default in this LibTorch (to
  /// zeros in 1.x, to undefined tensors in 2.x).
  void zero_grad() { zero_grad(detail::torch_zero_grad_sets_none); }
  /// Resets the gradients: to undefined tensors with set_to_none, else to zeros in place.
  void zero_grad(bool set_to_none) {
    for (auto& group : optimizer_->param_groups()) {
      for (auto& p : group.params()) detail::zero_grad(p, set_to_none);
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
