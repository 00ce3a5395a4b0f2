#pragma once
// fabric::Module: the typed wrapper that Fabric::setup returns for a module.

#include "fabric/core/config.hpp"

#include <torch/nn/module.h>

#include <memory>
#include <type_traits>
#include <utility>

namespace fabric {

/// A strategy that runs the module's forward itself (fabric::DP splits it across GPUs) instead of
/// letting the wrapper call `module->forward`.
template <class S, class M, class... Args>
concept RunsForward = requires(S& s, typename S::ModuleState& state, const std::shared_ptr<M>& module, Args&&... args) {
  s.forward(state, module, std::forward<Args>(args)...);
};

/// Wraps a set-up module: `->` and `*` reach the module, calling it runs forward through the
/// precision (input/output conversion, autocast) and the strategy (gradient sync bookkeeping).
/// Holds a pointer to the module and to its Fabric, nothing else; no virtual call per forward.
///
///     auto model = fabric.setup(net);
///     auto logits = model(images);   // net->forward(images) on the fabric's device and precision
template <class M, class F>
class Module {
 public:
  using module_type = M;
  using fabric_type = F;
  using state_type = typename F::strategy_type::ModuleState;

  Module(std::shared_ptr<M> module, F& fabric, state_type state)
      : module_(std::move(module)), fabric_(&fabric), state_(std::move(state)) {}

  /// Runs the module's forward under the fabric's precision and strategy.
  template <class... Args>
  FABRIC_ALWAYS_INLINE auto operator()(Args&&... args) {
    return forward(std::forward<Args>(args)...);
  }
  /// Runs the module's forward under the fabric's precision and strategy.
  template <class... Args>
  FABRIC_ALWAYS_INLINE auto forward(Args&&... args) {
    auto& precision = fabric_->precision();
    auto& strategy = fabric_->strategy();
    [[maybe_unused]] auto guard = precision.forward_context();
    strategy.pre_forward(state_);
    using S = typename F::strategy_type;
    if constexpr (RunsForward<S, M, decltype(precision.convert_input(std::forward<Args>(args)))...>) {
      // The strategy runs the module itself (DP: across GPUs).
      auto output = strategy.forward(state_, module_, precision.convert_input(std::forward<Args>(args))...);
      strategy.post_forward(state_, output);
      return precision.convert_output(std::move(output));
    } else if constexpr (std::is_void_v<decltype(module_->forward(
                             precision.convert_input(std::forward<Args>(args))...))>) {
      module_->forward(precision.convert_input(std::forward<Args>(args))...);
    } else {
      auto output = module_->forward(precision.convert_input(std::forward<Args>(args))...);
      strategy.post_forward(state_, output);
      return precision.convert_output(std::move(output));
    }
  }

  /// Reaches the wrapped module.
  M* operator->() const noexcept { return module_.get(); }
  /// Reaches the wrapped module.
  M& operator*() const noexcept { return *module_; }
  /// Returns the wrapped module (Lightning's `module.module`).
  M& module() const noexcept { return *module_; }
  /// Returns the shared pointer to the wrapped module.
  const std::shared_ptr<M>& ptr() const noexcept { return module_; }
  /// Returns the fabric this module was set up with.
  F& fabric() const noexcept { return *fabric_; }
  /// Returns the strategy's state for this module.
  state_type& strategy_state() noexcept { return state_; }

 private:
  std::shared_ptr<M> module_;
  F* fabric_;
  FABRIC_NO_UNIQUE_ADDRESS state_type state_;
};

namespace detail {
template <class T>
inline constexpr bool is_fabric_module_v = false;
template <class M, class F>
inline constexpr bool is_fabric_module_v<Module<M, F>> = true;
}  // namespace detail

}  // namespace fabric
