#pragma once
// What Fabric::setup checks and how it takes ownership of what it is given: the argument checks (compile
// time and run time) and the conversions of modules, optimizers and loaders into shared pointers.

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/wrappers/data_loader.hpp"
#include "fabric/wrappers/module.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>

namespace fabric::detail {

template <class T>
inline constexpr bool is_shared_ptr_v = false;
template <class T>
inline constexpr bool is_shared_ptr_v<std::shared_ptr<T>> = true;
template <class T>
inline constexpr bool is_unique_ptr_v = false;
template <class T, class D>
inline constexpr bool is_unique_ptr_v<std::unique_ptr<T, D>> = true;

/// The module class behind whatever the user passed to setup.
template <class T>
struct module_class {
  using type = T;
};
template <class T>
requires is_module_holder_v<T>
struct module_class<T> {
  using type = typename T::ContainedType;
};
template <class T>
struct module_class<std::shared_ptr<T>> {
  using type = T;
};

/// The object behind a smart pointer (or the type itself).
template <class T>
struct pointee {
  using type = T;
};
template <class T>
struct pointee<std::shared_ptr<T>> {
  using type = T;
};
template <class T, class D>
struct pointee<std::unique_ptr<T, D>> {
  using type = T;
};

/// Takes shared ownership of what can be shared, refers to lvalue objects without owning them, and
/// moves rvalue objects into a new shared object.
template <class T, class Arg>
std::shared_ptr<T> share(Arg&& arg) {
  using U = std::remove_cvref_t<Arg>;
  if constexpr (is_module_holder_v<U>) {
    return arg.ptr();
  } else if constexpr (is_shared_ptr_v<U>) {
    return arg;
  } else if constexpr (is_unique_ptr_v<U>) {
    return std::shared_ptr<T>(std::move(arg));
  } else if constexpr (std::is_lvalue_reference_v<Arg>) {
    return std::shared_ptr<T>(std::shared_ptr<void>{}, &arg);
  } else {
    return std::make_shared<T>(std::forward<Arg>(arg));
  }
}

/// Returns how long a set-up module or optimizer counts as set up: as long as the object lives where a
/// shared_ptr owns it (its own, or, for a module kept by reference, the one shared_from_this sees),
/// otherwise as long as some copy of its wrapper does, through a control block of its own given to ptr.
/// NOTE: an address alone is not enough: a new object built where a destroyed one lived would pass for it.
template <class T>
std::weak_ptr<const void> track_set_up(std::shared_ptr<T>& ptr) {
  if (ptr.use_count() > 0) return ptr;
  if constexpr (std::is_base_of_v<torch::nn::Module, T>) {
    if (auto owner = static_cast<torch::nn::Module&>(*ptr).weak_from_this(); !owner.expired()) return owner;
  }
  ptr = std::shared_ptr<T>(std::make_shared<char>(), ptr.get());
  return ptr;
}

/// Rejects, at compile time, what setup cannot take as a module; returns true (in a static_assert, so that
/// its message comes before any error of setup's instantiation).
template <class M>
constexpr bool check_module_arg() {
  using U = std::remove_cvref_t<M>;
  static_assert(!is_fabric_module_v<U>,
                "fabric: this module is already set up; use the wrapper setup() returned, or set up the original "
                "module in a new Fabric");
  static_assert(ModuleLike<M>,
                "fabric: setup takes a torch::nn::Module: a TORCH_MODULE holder, a std::shared_ptr to a module, "
                "or a module object");
  static_assert(is_module_holder_v<U> || is_module_ptr_v<U> || std::is_lvalue_reference_v<M>,
                "fabric: setup cannot keep a temporary module object alive; pass a TORCH_MODULE holder, a "
                "std::shared_ptr or a named module variable");
  return true;
}

/// Rejects, at compile time, what setup cannot take as an optimizer; returns true (as check_module_arg).
template <class O>
constexpr bool check_optimizer_arg() {
  using U = std::remove_cvref_t<O>;
  static_assert(!is_fabric_optimizer_v<U>,
                "fabric: this optimizer is already set up; use the wrapper setup() returned");
  static_assert(std::is_base_of_v<torch::optim::Optimizer, typename pointee<U>::type>,
                "fabric: setup takes torch::optim optimizers after the module: an optimizer object, a "
                "std::shared_ptr or a std::unique_ptr to one");
  return true;
}

/// Rejects, at compile time, what setup_dataloaders cannot take; returns true (in a static_assert, so that
/// its message comes before any error of the wrapper's instantiation).
template <class L>
constexpr bool check_loader_arg() {
  using U = std::remove_cvref_t<L>;
  static_assert(!is_fabric_loader_v<U>,
                "fabric: this data loader is already set up; iterate the wrapper setup_dataloaders() returned");
  using Loader = typename pointee<U>::type;
  static_assert(
      requires(Loader & l) {
        l.begin();
        l.end();
      },
      "fabric: setup_dataloaders takes LibTorch data loaders (from torch::data::make_data_loader) or ranges of "
      "batches; pass the loader, not its dataset, or build one with fabric.make_data_loader(dataset, options)");
  return true;
}

/// Returns the optimizer an argument of setup holds.
template <class O>
torch::optim::Optimizer& optimizer_ref(O& o) {
  if constexpr (is_shared_ptr_v<std::remove_cvref_t<O>> || is_unique_ptr_v<std::remove_cvref_t<O>>) {
    return *o;
  } else {
    return o;
  }
}

/// Raises unless some parameter of the optimizer belongs to the module.
inline void check_belongs(const torch::nn::Module& module, const torch::optim::Optimizer& optimizer) {
  std::unordered_set<const void*> own;
  for (const auto& p : module.parameters()) own.insert(p.unsafeGetTensorImpl());
  std::size_t total = 0;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      ++total;
      if (own.contains(p.unsafeGetTensorImpl())) return;
    }
  }
  raise(
      "expected an optimizer over the module's parameters, found one whose {} parameter{} belong to "
      "another module; build the optimizer from this module's parameters()",
      total, total == 1 ? " does not" : "s do not");
}

/// Raises when an optimizer refers to parameters on the meta device (Lightning's check in setup_optimizers).
inline void check_not_meta(const torch::optim::Optimizer& optimizer, std::string_view what) {
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      if (p.defined() && p.is_meta()) {
        raise(
            "{}: expected an optimizer over parameters that hold data, found one with references to the model's "
            "meta-device parameters; materializing them is not supported: build the module on a real device (or "
            "set it up first), then create the optimizer from its parameters and call "
            "fabric.setup_optimizers(optimizer)",
            what);
      }
    }
  }
}

/// Warns, as Lightning's setup does, when the module's parameters are on different devices before setup
/// moves all of them to the fabric's device.
inline void warn_mixed_devices(const torch::nn::Module& module) {
  const auto params = module.named_parameters(true);
  if (params.is_empty()) return;
  const auto& initial = params[0];
  std::size_t count = 0;
  const torch::OrderedDict<std::string, at::Tensor>::Item* first = nullptr;
  for (const auto& item : params) {
    if (item.value().device() != initial.value().device()) {
      ++count;
      if (first == nullptr) first = &item;
    }
  }
  if (count > 0) {
    TORCH_WARN("fabric: the model passed to setup() has ", count, " parameters on different devices (for example '",
               first->key(), "' on ", first->value().device(), " and '", initial.key(), "' on ",
               initial.value().device(),
               "); since move_to_device is on, all parameters will be moved to the fabric's device; pass "
               "{.move_to_device = false} to setup() if this is not desired");
  }
}

}  // namespace fabric::detail
