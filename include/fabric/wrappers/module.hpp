#pragma once
// fabric::Module: the typed wrapper that Fabric::setup returns for a module.

#include "fabric/core/config.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/detail/zero_grad.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/DefaultDtype.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include <atomic>
#include <concepts>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

/// A strategy that runs the module's forward itself (fabric::DP splits it across GPUs) instead of
/// letting the wrapper call `module->forward`.
template <class S, class M, class... Args>
concept RunsForward = requires(S& s, typename S::ModuleState& state, const std::shared_ptr<M>& module, Args&&... args) {
  s.forward(state, module, std::forward<Args>(args)...);
};

/// A policy whose work happens in the module wrapper's forward (autocast, input casts, DDP's Reducer
/// bookkeeping), so that a forward which bypasses the wrapper computes something else without a word:
/// with one, `Fabric::backward` rejects a loss that no wrapped forward produced. A policy says so with
/// `static constexpr bool needs_wrapped_forward = true;`; without the member it is false.
template <class P>
concept NeedsWrappedForward = requires {
  requires static_cast<bool>(P::needs_wrapped_forward);
};

/// A policy whose backward does more than `loss.backward()` (FP16Mixed's loss scaling, DDP's
/// synchronisation and its failure reports), so that `loss.backward()` on the output of a set-up module
/// must be `fabric.backward(loss)`: with one, the wrapper's forward hooks its outputs so that a
/// backward outside fabric's throws. A policy says so with `static constexpr bool
/// needs_fabric_backward = true;`; without the member it is false (no hook, no cost).
template <class P>
concept NeedsFabricBackward = requires {
  requires static_cast<bool>(P::needs_fabric_backward);
};

namespace detail {

/// The number of `Fabric::backward` calls running (in any thread): the autograd engine may call the
/// output hooks on a device thread, so a thread-local flag would not do (Lightning's is a global too).
inline std::atomic<int> fabric_backward_depth{0};

/// Marks a backward as fabric's while it lives.
class FabricBackwardScope {
 public:
  FabricBackwardScope() noexcept { fabric_backward_depth.fetch_add(1, std::memory_order_relaxed); }
  ~FabricBackwardScope() { fabric_backward_depth.fetch_sub(1, std::memory_order_relaxed); }
  FabricBackwardScope(const FabricBackwardScope&) = delete;
  FabricBackwardScope& operator=(const FabricBackwardScope&) = delete;
};

}  // namespace detail

/// Wraps a set-up module: `->` and `*` reach the module, calling it runs forward through the
/// precision (input/output conversion, autocast) and the strategy (gradient sync bookkeeping).
/// The members of LibTorch's module holder that training code calls (`train`, `eval`,
/// `parameters`, `zero_grad`, ...) work on the wrapper too. Holds a pointer to the module and to its
/// Fabric, nothing else; no virtual call per forward.
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
    if constexpr (F::checks_bypassed_forward) ++fabric_->wrapped_forwards_;
    [[maybe_unused]] auto guard = precision.forward_context();
    strategy.pre_forward(state_);
    using S = typename F::strategy_type;
    if constexpr (RunsForward<S, M, decltype(precision.convert_input(std::forward<Args>(args)))...>) {
      // The strategy runs the module itself (DP: across GPUs).
      return finish(strategy.forward(state_, module_, precision.convert_input(std::forward<Args>(args))...));
    } else if constexpr (std::is_void_v<decltype(module_->forward(
                             precision.convert_input(std::forward<Args>(args))...))>) {
      module_->forward(precision.convert_input(std::forward<Args>(args))...);
    } else {
      return finish(module_->forward(precision.convert_input(std::forward<Args>(args))...));
    }
  }

  /// Runs another method of the module (a `training_step`) as forward runs: under the precision's
  /// context with its input and output conversion, and inside the strategy's forward bookkeeping (DDP's
  /// Reducer), so that the method may call the module's own forward and submodules and its loss
  /// trains as one from forward would (Lightning's `mark_forward_method`). The method is a member
  /// pointer of the module's class (or of a base), or any callable taking the module first; the
  /// result is what it returns, with floating tensors converted as forward's output.
  ///
  ///     auto loss = model.call(&NetImpl::training_step, batch);
  ///     fabric.backward(loss);
  template <class Method, class... Args>
  FABRIC_ALWAYS_INLINE auto call(Method&& method, Args&&... args) {
    using S = typename F::strategy_type;
    static_assert(!std::is_member_object_pointer_v<std::remove_cvref_t<Method>>,
                  "fabric: model.call(method, args...) runs a method of the module; a data member is no method: "
                  "read it through model->member");
    static_assert(!RunsForward<S, M, at::Tensor>,
                  "fabric: model.call(method, args...) runs the method on this process's device, but this strategy "
                  "runs the module's forward itself (DP splits it across GPUs) and cannot run another method; call "
                  "the method from forward, or use fabric::DDP");
    auto& precision = fabric_->precision();
    using Invoked = std::is_invocable<Method, M&, decltype(precision.convert_input(std::forward<Args>(args)))...>;
    if constexpr (!Invoked::value) {
      static_assert(Invoked::value,
                    "fabric: model.call(method, args...) calls method on the module with args: pass a member "
                    "function pointer of the module's class (&NetImpl::training_step) or a callable taking the "
                    "module first, with arguments it accepts");
    } else {
      auto& strategy = fabric_->strategy();
      if constexpr (F::checks_bypassed_forward) ++fabric_->wrapped_forwards_;
      [[maybe_unused]] auto guard = precision.forward_context();
      strategy.pre_forward(state_);
      if constexpr (std::is_void_v<std::invoke_result_t<
                        Method, M&, decltype(precision.convert_input(std::forward<Args>(args)))...>>) {
        std::invoke(std::forward<Method>(method), *module_, precision.convert_input(std::forward<Args>(args))...);
      } else {
        return finish(
            std::invoke(std::forward<Method>(method), *module_, precision.convert_input(std::forward<Args>(args))...));
      }
    }
  }

  /// Runs backward on the loss through the fabric (`fabric.backward(loss, args...)`), so helper
  /// functions need not take the Fabric.
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    fabric_->backward(loss, std::forward<Args>(args)...);
  }

  /// Switches the module and its submodules to training mode (or to evaluation mode with false).
  void train(bool on = true) { module_->train(on); }
  /// Switches the module and its submodules to evaluation mode.
  void eval() { module_->eval(); }
  /// Returns true in training mode.
  bool is_training() const noexcept { return module_->is_training(); }
  /// Returns the module's parameters (and its submodules' with recurse).
  std::vector<at::Tensor> parameters(bool recurse = true) const { return module_->parameters(recurse); }
  /// Returns the module's parameters by name (and its submodules' with recurse).
  torch::OrderedDict<std::string, at::Tensor> named_parameters(bool recurse = true) const {
    return module_->named_parameters(recurse);
  }
  /// Returns the module's buffers (and its submodules' with recurse).
  std::vector<at::Tensor> buffers(bool recurse = true) const { return module_->buffers(recurse); }
  /// Resets the gradients of the module's parameters: to undefined tensors with set_to_none, else to
  /// zeros in place; the default is LibTorch's (false in 1.x, true in 2.x).
  void zero_grad(bool set_to_none = detail::torch_zero_grad_sets_none) {
    for (auto& p : module_->parameters(true)) detail::zero_grad(p, set_to_none);
  }
  /// Returns the device the module is on (that of its first parameter or buffer; the fabric's device
  /// for a module without tensors).
  c10::Device device() const {
    const auto params = module_->parameters(true);
    if (!params.empty()) return params.front().device();
    for (const auto& b : module_->buffers(true)) {
      if (b.defined()) return b.device();
    }
    return fabric_->device();
  }
  /// Returns the dtype of the module's floating-point parameters (of its first one; the default dtype
  /// for a module without floating parameters).
  c10::ScalarType dtype() const {
    for (const auto& p : module_->parameters(true)) {
      if (p.is_floating_point()) return p.scalar_type();
    }
    return c10::typeMetaToScalarType(c10::get_default_dtype());
  }

  /// Reaches the wrapped module.
  M* operator->() const noexcept { return module_.get(); }
  /// Reaches the wrapped module.
  M& operator*() const noexcept { return *module_; }
  /// Returns the wrapped module (Lightning's `module.module`).
  M& module() const noexcept { return *module_; }
  /// Returns the shared pointer to the wrapped module.
  const std::shared_ptr<M>& ptr() const noexcept { return module_; }
  /// Returns the fabric this module was set up with (for `fabric().autocast()`, `fabric().device()`, ...).
  F& fabric() const noexcept { return *fabric_; }
  /// Returns the strategy's state for this module.
  state_type& strategy_state() noexcept { return state_; }

 private:
  /// Ends a wrapped forward: the strategy sees the output, the precision converts it, and where a
  /// policy must run the backward (F::checks_fabric_backward) its tensors get the guard's hook.
  template <class Out>
  FABRIC_ALWAYS_INLINE auto finish(Out&& output) {
    fabric_->strategy().post_forward(state_, output);
    auto converted = fabric_->precision().convert_output(std::forward<Out>(output));
    if constexpr (F::checks_fabric_backward) hook_outputs(converted);
    return converted;
  }
  /// Hooks every output tensor that requires grad so that a backward through it outside
  /// `Fabric::backward` throws (the exception leaves `loss.backward()` as it is).
  template <class Out>
  static void hook_outputs(const Out& output) {
    detail::for_each_tensor(output, [](const at::Tensor& t) {
      if (!t.defined() || !t.requires_grad()) return;
      at::Tensor(t).register_hook([](const at::Tensor& /*grad*/) {
        if (detail::fabric_backward_depth.load(std::memory_order_relaxed) == 0) F::raise_raw_backward();
      });
    });
  }

  std::shared_ptr<M> module_;
  F* fabric_;
  FABRIC_NO_UNIQUE_ADDRESS state_type state_;
};

namespace detail {
template <class T>
inline constexpr bool is_fabric_module_v = false;
template <class M, class F>
inline constexpr bool is_fabric_module_v<Module<M, F>> = true;

/// The module class Net names: NetImpl for a TORCH_MODULE holder Net, Net itself otherwise.
template <class Net>
struct named_module {
  using type = Net;
};
template <class Net>
requires std::is_base_of_v<torch::detail::ModuleHolderIndicator, Net>
struct named_module<Net> {
  using type = typename Net::ContainedType;
};
}  // namespace detail

/// A set-up module wrapping Net (or a class derived from it), for the parameters of user functions;
/// Net may be the TORCH_MODULE holder `Net` or the `NetImpl`:
///
///     void train(fabric::ModelOf<Net> auto& model, fabric::OptimizerOf<torch::optim::Optimizer> auto& optimizer);
// NOTE: a concept rather than the wrapper type keeps the Fabric type out of the user's signature.
template <class W, class Net>
concept ModelOf = detail::is_fabric_module_v<std::remove_cvref_t<W>> &&
                  std::derived_from < typename std::remove_cvref_t<W>::module_type,
typename detail::named_module<Net>::type > ;

}  // namespace fabric
