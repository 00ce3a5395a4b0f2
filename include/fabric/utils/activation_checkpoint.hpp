#pragma once
// Activation checkpointing, the C++ torch.utils.checkpoint: fabric::activation_checkpoint(fn, args...) for one
// call, fabric::apply_activation_checkpointing(model, fabric::module_types<BlockImpl>()) for every unit of a
// type (Lightning's `activation_checkpointing_policy={Block}`). The forward keeps no activations of the
// checkpointed code; the backward recomputes them, with the random number generators (CPU and the devices'
// generators) and autocast as they were in the forward, so dropout draws the same masks.

#include "fabric/core/error.hpp"
#include "fabric/detail/checkpoint.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/wrappers/unit.hpp"

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstddef>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// A set-up module (the fabric::Module that Fabric::setup returns): it gives its module with module().
template <class W>
concept SetUpModuleLike = requires(W& w) {
  requires std::is_base_of_v<torch::nn::Module, std::remove_cvref_t<decltype(w.module())>>;
};

/// Returns the module a ModuleLike (holder, shared_ptr or module object) or a set-up module names.
template <class M>
torch::nn::Module& module_of(M& m) {
  using T = std::remove_cvref_t<M>;
  if constexpr (std::is_base_of_v<torch::nn::Module, T>) {
    return m;
  } else if constexpr (SetUpModuleLike<T> && !ModuleLike<T>) {
    return m.module();
  } else {
    if (!m) raise("expected a module, found an empty holder or a null pointer; construct the module first");
    return *m;
  }
}

}  // namespace detail

/// Calls fn(args...) without keeping its activations: the backward runs fn again (with the random number
/// generators and autocast as in the forward) and differentiates that. The tensors among args (also inside
/// vectors, tuples, optionals, maps) are its inputs; a tensor fn reads that needs a gradient must be one of
/// them (a captured one is refused in backward). With a module in place of fn, its forward is called and its
/// parameters are inputs too:
///
/// ```cpp
/// at::Tensor y = fabric::activation_checkpoint([](const at::Tensor& x) { return torch::gelu(x).sin(); }, x);
/// at::Tensor z = fabric::activation_checkpoint(mlp, y);   // mlp->forward(y), mlp's parameters as inputs
/// ```
/// Without grad mode, or when no input needs a gradient, it is a plain call. Any strategy (single device,
/// DDP) trains through it: the parameters' gradients arrive as from the plain forward, once each.
template <class Fn, class... Args>
auto activation_checkpoint(Fn&& fn, Args&&... args) {
  if constexpr (ModuleLike<Fn>) {
    auto& module = detail::module_of(fn);
    std::vector<at::Tensor> parameters;
    for (auto& p : module.parameters()) {
      if (p.requires_grad()) parameters.push_back(p);
    }
    using T = std::remove_cvref_t<Fn>;
    if constexpr (std::is_base_of_v<torch::nn::Module, T>) {
      static_assert(!std::is_base_of_v<torch::nn::Module, T>,
                    "fabric: activation_checkpoint(module, ...) needs the module's holder or shared_ptr (it is "
                    "kept for the backward); pass the holder (mlp), not the module object (*mlp)");
    } else {
      auto ptr = [&] {
        if constexpr (detail::is_module_holder_v<T>) {
          return fn.ptr();
        } else {
          return fn;
        }
      }();
      auto call = [ptr](auto&... a) { return ptr->forward(a...); };
      return detail::checkpoint_call(std::move(call), std::move(parameters), std::forward<Args>(args)...);
    }
  } else {
    return detail::checkpoint_call(std::forward<Fn>(fn), {}, std::forward<Args>(args)...);
  }
}

/// Switches activation checkpointing on for every unit of model (a module, or the module Fabric::setup
/// returned; model included) whose type is one of types,
/// Lightning's `activation_checkpointing_policy={Block}`: each call of such a unit then keeps only its inputs
/// and recomputes its forward in backward. Returns the number of units. A matching module that is not a
/// fabric unit (declared with TORCH_MODULE, not FABRIC_UNIT) is refused, as is a policy that matches nothing.
///
/// ```cpp
/// fabric::apply_activation_checkpointing(model, fabric::module_types<BlockImpl>());
/// ```
template <class M>
requires ModuleLike<M> || detail::SetUpModuleLike<M> std::size_t apply_activation_checkpointing(
    M&& model, const ModuleTypes& types) {
  if (types.empty()) {
    detail::raise(
        "apply_activation_checkpointing: expected at least one module type, found none; pass "
        "fabric::module_types<BlockImpl>()");
  }
  auto units = detail::policy_units(detail::module_of(model), types, "apply_activation_checkpointing");
  if (units.empty()) {
    detail::raise(
        "apply_activation_checkpointing: no module of the model matches the {} module type(s) given; "
        "pass the types of its blocks (the Impl classes: fabric::module_types<BlockImpl>())",
        types.size());
  }
  for (auto& u : units) detail::unit_registry().update(*u.module, [](detail::UnitEntry& e) { e.checkpoint = true; });
  return units.size();
}

/// Switches activation checkpointing off for every unit of model; returns the number of units it was on for.
template <class M>
requires ModuleLike<M> || detail::SetUpModuleLike<M> std::size_t remove_activation_checkpointing(M&& model) {
  std::size_t n = 0;
  for (const auto& m : detail::module_of(model).modules(/*include_self=*/true)) {
    detail::unit_registry().update(*m, [&](detail::UnitEntry& e) {
      n += e.checkpoint ? 1 : 0;
      e.checkpoint = false;
    });
  }
  return n;
}

}  // namespace fabric
