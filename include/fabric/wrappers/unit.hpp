#pragma once
// fabric::Unit and FABRIC_UNIT: the modules whose forward a strategy (FSDP) or activation checkpointing
// wraps. LibTorch's modules have no forward hooks, so a model marks its units with one line per unit type:
// `FABRIC_UNIT(Block);` in place of `TORCH_MODULE(Block);`. The holder's call runs the hooks installed on
// the module instance; with none installed anywhere it is exactly `Impl::forward` after one atomic load.

#include "fabric/core/error.hpp"
#include "fabric/detail/checkpoint.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// What runs around one unit's forward; installed on a module instance by a strategy (FSDP) and/or by
/// activation checkpointing.
class UnitHook {
 public:
  virtual ~UnitHook() = default;
  /// Before the unit's forward (and, idempotently, before activation checkpointing recomputes it in backward).
  virtual void pre_forward(torch::nn::Module& unit) = 0;
  /// After the unit's forward, with the tensors of its output that require grad (not called for the
  /// recomputation inside backward; detail::in_recompute() is true there). A hook may replace the tensors
  /// (by ones of the same shape, e.g. with a backward hook attached): the caller gets the replacements.
  virtual void post_forward(torch::nn::Module& unit, std::vector<at::Tensor>& outputs) = 0;
};

/// The number of units that have a hook or activation checkpointing: while it is zero a unit's call is
/// `Impl::forward` after this one load (a plain variable, so no static-initialisation guard either).
inline std::atomic<std::size_t> active_units{0};

/// What the registry knows of one unit instance.
struct UnitEntry {
  /// The module, to tell it from a later module allocated at the same address after it died.
  std::weak_ptr<torch::nn::Module> module;
  std::vector<std::shared_ptr<UnitHook>> hooks;
  /// Whether activation checkpointing is on for the unit.
  bool checkpoint = false;
  bool active() const noexcept { return !hooks.empty() || checkpoint; }
};

/// A snapshot of what runs around one call of a unit.
struct UnitCall {
  std::vector<std::shared_ptr<UnitHook>> hooks;
  bool checkpoint = false;
};

/// The units of the process, keyed by address; thread-safe. An entry goes when its module dies (the
/// deleter of a module a Unit constructed erases it; an entry of a module a Unit adopted is found
/// expired and dropped at the next look-up of its address or the next installation of a hook).
class UnitRegistry {
 public:
  /// Records module as a unit (again: a second holder of the same module keeps its hooks).
  void add(const std::shared_ptr<torch::nn::Module>& module) {
    if (!module) return;
    std::vector<std::shared_ptr<UnitHook>> dropped;
    std::unique_lock lock(mutex_);
    auto [it, inserted] = entries_.try_emplace(module.get());
    if (!inserted && live(it->second, module.get())) return;
    if (!inserted) dropped = drop_locked(it->second);
    it->second.module = module;
  }

  /// Forgets the module at address p if it is dead (called by the deleter of a module a Unit made).
  void erase_dead(const torch::nn::Module* p) noexcept {
    std::vector<std::shared_ptr<UnitHook>> dropped;
    std::unique_lock lock(mutex_);
    if (auto it = entries_.find(p); it != entries_.end() && it->second.module.expired()) {
      dropped = drop_locked(it->second);
      entries_.erase(it);
    }
  }

  /// Whether module is a live unit.
  bool contains(const torch::nn::Module& module) const {
    std::shared_lock lock(mutex_);
    auto it = entries_.find(&module);
    return it != entries_.end() && live(it->second, &module);
  }

  /// Applies fn to the live entry of module (under the lock) and returns true, or returns false.
  template <class F>
  bool update(const torch::nn::Module& module, F&& fn) {
    std::vector<std::shared_ptr<UnitHook>> dropped;
    std::unique_lock lock(mutex_);
    prune_locked(dropped);
    auto it = entries_.find(&module);
    if (it == entries_.end() || !live(it->second, &module)) return false;
    const bool was = it->second.active();
    fn(it->second);
    const bool now = it->second.active();
    if (was != now) now ? active_units.fetch_add(1) : active_units.fetch_sub(1);
    return true;
  }

  /// Removes hook from every unit (a strategy tearing down).
  void remove_everywhere(const UnitHook& hook) {
    std::vector<std::shared_ptr<UnitHook>> dropped;
    std::unique_lock lock(mutex_);
    for (auto& [p, entry] : entries_) {
      const bool was = entry.active();
      erase_hook(entry.hooks, hook, dropped);
      if (was && !entry.active()) active_units.fetch_sub(1);
    }
  }

  /// Returns what runs around a call of module (nothing when it has no entry).
  UnitCall call(const torch::nn::Module& module) const {
    std::shared_lock lock(mutex_);
    auto it = entries_.find(&module);
    if (it == entries_.end() || !live(it->second, &module)) return {};
    return {it->second.hooks, it->second.checkpoint};
  }

  /// The number of entries (for tests: dead modules leave none behind).
  std::size_t size() const {
    std::shared_lock lock(mutex_);
    return entries_.size();
  }

  static void erase_hook(std::vector<std::shared_ptr<UnitHook>>& hooks, const UnitHook& hook,
                         std::vector<std::shared_ptr<UnitHook>>& dropped) {
    auto it = std::find_if(hooks.begin(), hooks.end(), [&](const auto& h) { return h.get() == &hook; });
    if (it == hooks.end()) return;
    dropped.push_back(std::move(*it));
    hooks.erase(it);
  }

 private:
  static bool live(const UnitEntry& entry, const torch::nn::Module* p) {
    auto m = entry.module.lock();
    return m && m.get() == p;
  }
  // NOTE: hooks are destroyed after the lock is released (their destructors may do anything).
  std::vector<std::shared_ptr<UnitHook>> drop_locked(UnitEntry& entry) {
    if (entry.active()) active_units.fetch_sub(1);
    entry.checkpoint = false;
    return std::exchange(entry.hooks, {});
  }
  void prune_locked(std::vector<std::shared_ptr<UnitHook>>& dropped) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.module.expired()) {
        for (auto& h : drop_locked(it->second)) dropped.push_back(std::move(h));
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  mutable std::shared_mutex mutex_;
  std::unordered_map<const torch::nn::Module*, UnitEntry> entries_;
};

/// The registry of the process (one across translation units: an inline function's static).
inline UnitRegistry& unit_registry() {
  static UnitRegistry registry;
  return registry;
}

/// Installs a hook on one module instance (keyed by its address); pre_forward hooks run in installation order,
/// post_forward in reverse. remove_unit_hook removes one by identity.
inline void add_unit_hook(torch::nn::Module& unit, std::shared_ptr<UnitHook> hook) {
  if (!hook) raise("add_unit_hook: expected a hook, found a null pointer; pass std::make_shared<YourHook>(...)");
  if (!unit_registry().update(unit, [&](UnitEntry& e) { e.hooks.push_back(std::move(hook)); })) {
    raise(
        "add_unit_hook: expected a fabric unit, found a module of type {} that is not one (its forward could "
        "not run the hook); declare it with FABRIC_UNIT(Name) in place of TORCH_MODULE(Name)",
        unit.name());
  }
}

/// Removes the hook (by identity) from unit; nothing happens when it is not installed there.
inline void remove_unit_hook(torch::nn::Module& unit, const UnitHook& hook) {
  std::vector<std::shared_ptr<UnitHook>> dropped;
  unit_registry().update(unit, [&](UnitEntry& e) { UnitRegistry::erase_hook(e.hooks, hook, dropped); });
}

/// Removes the hook (by identity) from every unit it is installed on (a strategy tearing down).
inline void remove_unit_hook_everywhere(const UnitHook& hook) { unit_registry().remove_everywhere(hook); }

/// Whether `module` was created through fabric::Unit / FABRIC_UNIT (only then does its forward run the hooks).
inline bool is_unit(const torch::nn::Module& module) { return unit_registry().contains(module); }

/// Deletes a module a Unit constructed and forgets its entry.
struct UnitDeleter {
  template <class Impl>
  void operator()(Impl* p) const noexcept {
    const torch::nn::Module* base = p;
    delete p;
    unit_registry().erase_dead(base);
  }
};

/// Collects the tensors of a forward's output that require grad.
template <class R>
std::vector<at::Tensor> grad_outputs_of(const R& result) {
  std::vector<at::Tensor> out;
  for_each_tensor(result, [&](const at::Tensor& t) {
    if (t.defined() && t.requires_grad()) out.push_back(t);
  });
  return out;
}

/// Puts the hooks' replacements of the tensors that require grad back into the output.
template <class R>
R replace_grad_outputs(R result, const std::vector<at::Tensor>& replaced) {
  std::size_t i = 0;
  auto put = [&](at::Tensor t) {
    if (t.defined() && t.requires_grad() && i < replaced.size()) return replaced[i++];
    return t;
  };
  return map_tensors(std::move(result), put);
}

/// Runs a unit's forward with activation checkpointing; the recomputation runs the pre_forward hooks again.
template <class Impl, class... Args>
auto checkpoint_unit(const std::shared_ptr<Impl>& impl, const std::vector<std::shared_ptr<UnitHook>>& hooks,
                     Args&&... args) {
  std::vector<at::Tensor> parameters;
  for (auto& p : impl->parameters()) {
    if (p.requires_grad()) parameters.push_back(p);
  }
  auto fn = [impl, hooks](auto&... a) {
    if (in_recompute()) {
      for (const auto& h : hooks) h->pre_forward(*impl);
    }
    return impl->forward(a...);
  };
  return checkpoint_call(std::move(fn), std::move(parameters), std::forward<Args>(args)...);
}

/// Runs a unit's forward through its hooks and, when it is on, activation checkpointing: pre_forward hooks in
/// installation order, the forward, post_forward hooks in reverse (not while recomputing in backward).
template <class Impl, class... Args>
auto run_unit(const std::shared_ptr<Impl>& impl, Args&&... args) {
  using R = decltype(impl->forward(std::forward<Args>(args)...));
  UnitCall call = unit_registry().call(*impl);
  for (auto& h : call.hooks) h->pre_forward(*impl);
  const bool post = !call.hooks.empty() && !in_recompute();
  if constexpr (!std::is_void_v<R>) {
    std::remove_cvref_t<R> result = call.checkpoint && c10::GradMode::is_enabled() && !in_recompute()
                                        ? checkpoint_unit(impl, call.hooks, std::forward<Args>(args)...)
                                        : impl->forward(std::forward<Args>(args)...);
    if (post) {
      std::vector<at::Tensor> outs = grad_outputs_of(result);
      const std::size_t n = outs.size();
      for (auto it = call.hooks.rbegin(); it != call.hooks.rend(); ++it) (*it)->post_forward(*impl, outs);
      if (outs.size() != n) {
        raise(
            "a unit hook's post_forward changed the number of output tensors from {} to {}; replace tensors, "
            "never add or remove them",
            n, outs.size());
      }
      result = replace_grad_outputs(std::move(result), outs);
    }
    return result;
  } else {
    impl->forward(std::forward<Args>(args)...);
    if (post) {
      std::vector<at::Tensor> outs;
      for (auto it = call.hooks.rbegin(); it != call.hooks.rend(); ++it) (*it)->post_forward(*impl, outs);
    }
  }
}

}  // namespace detail

/// A ModuleHolder (as TORCH_MODULE makes) whose call runs the unit's hooks and, when switched on, activation
/// checkpointing around Impl::forward; otherwise exactly Impl::forward. Declare one with FABRIC_UNIT(Name).
///
/// ```cpp
/// class BlockImpl : public torch::nn::Module { ... at::Tensor forward(at::Tensor x); };
/// FABRIC_UNIT(Block);   // in place of TORCH_MODULE(Block);
/// ```
/// As in Python, where `block.forward(x)` skips the module's hooks, `block->forward(x)` skips them:
/// call the holder, `block(x)`.
template <class Impl>
class Unit : public torch::nn::ModuleHolder<Impl> {
  using Base = torch::nn::ModuleHolder<Impl>;

 public:
  /// Constructs Impl with its default constructor (as TORCH_MODULE's holders do).
  Unit() requires std::is_default_constructible_v<Impl> : Base(make()) {}

  /// The empty holder.
  Unit(std::nullptr_t) : Base(nullptr) {}  // NOLINT(google-explicit-constructor): as ModuleHolder's

  /// Constructs Impl from the arguments.
  template <class Head, class... Tail>
  requires(!(sizeof...(Tail) == 0 &&
             (std::is_same_v<std::remove_cvref_t<Head>, std::shared_ptr<Impl>> ||
              std::is_base_of_v<Base, std::remove_cvref_t<Head>> ||
              std::is_same_v<std::remove_cvref_t<Head>, std::nullptr_t>))) explicit Unit(Head&& head, Tail&&... tail)
      : Base(make(std::forward<Head>(head), std::forward<Tail>(tail)...)) {}

  /// Adopts a module (the same module under several holders shares its hooks).
  Unit(std::shared_ptr<Impl> module) : Base(std::move(module)) {  // NOLINT(google-explicit-constructor)
    detail::unit_registry().add(this->ptr());
  }

  /// Calls the unit: its hooks, then Impl::forward (or the checkpointed forward).
  template <class... Args>
  auto operator()(Args&&... args) {
    if (detail::active_units.load(std::memory_order_acquire) == 0) [[likely]] {
      return this->get()->forward(std::forward<Args>(args)...);
    }
    TORCH_CHECK(!this->is_empty(), "Accessing empty ModuleHolder");
    return detail::run_unit(this->ptr(), std::forward<Args>(args)...);
  }

 private:
  template <class... A>
  static std::shared_ptr<Impl> make(A&&... a) {
    std::shared_ptr<Impl> p(new Impl(std::forward<A>(a)...), detail::UnitDeleter{});
    detail::unit_registry().add(p);
    return p;
  }
};

/// A set of module types, Lightning's `auto_wrap_policy={Block}` / `activation_checkpointing_policy={Block}`:
/// fabric::module_types<BlockImpl>(); matches(m) is true when m is of one of them (or derives from one, as
/// Python's isinstance).
class ModuleTypes {
 public:
  ModuleTypes() = default;

  /// Whether m is of one of the types.
  bool matches(const torch::nn::Module& m) const {
    return std::any_of(tests_.begin(), tests_.end(), [&](const auto& t) { return t(m); });
  }
  /// Whether the set has no type.
  bool empty() const noexcept { return tests_.empty(); }
  /// The number of types.
  std::size_t size() const noexcept { return tests_.size(); }

  /// Adds the module type M.
  template <class M>
  void add() {
    static_assert(std::is_base_of_v<torch::nn::Module, M>,
                  "fabric: module_types<M...>() takes module classes (BlockImpl), not holders (Block); "
                  "write module_types<BlockImpl>()");
    tests_.emplace_back([](const torch::nn::Module& m) { return dynamic_cast<const M*>(&m) != nullptr; });
  }

 private:
  std::vector<std::function<bool(const torch::nn::Module&)>> tests_;
};

/// Returns the set of the module types M... (the Impl classes: fabric::module_types<BlockImpl>()).
template <class... M>
ModuleTypes module_types() {
  ModuleTypes types;
  (types.template add<M>(), ...);
  return types;
}

namespace detail {

/// One module a policy selected: its path in the model ("h.0") and the module.
struct PolicyUnit {
  std::string path;
  std::shared_ptr<torch::nn::Module> module;
};

/// Returns the modules of root (root included) that types matches, in the order of named_modules; refuses
/// (fabric::Error from `who`) a matching module that is not a unit and a unit that a torch::nn::Sequential
/// holds (Sequential calls its modules' forward, not their holders, so the unit would run unhooked).
inline std::vector<PolicyUnit> policy_units(torch::nn::Module& root, const ModuleTypes& types, std::string_view who) {
  std::vector<PolicyUnit> found;
  if (types.empty()) return found;
  auto modules = root.named_modules("", /*include_self=*/true);
  for (const auto& item : modules) {
    const std::string& path = item.key();
    const auto& m = item.value();
    if (!types.matches(*m)) continue;
    const std::string shown = path.empty() ? std::string("(the model itself)") : path;
    if (!is_unit(*m)) {
      raise(
          "{}: the module `{}` ({}) matches the policy but is not a fabric unit, so its forward cannot be "
          "wrapped; declare its type with FABRIC_UNIT(Name) in place of TORCH_MODULE(Name)",
          who, shown, m->name());
    }
    if (auto dot = path.rfind('.'); !path.empty()) {
      const std::string parent = dot == std::string::npos ? std::string() : path.substr(0, dot);
      const auto* p = parent.empty() ? &root : modules[parent].get();
      if (dynamic_cast<const torch::nn::SequentialImpl*>(p) != nullptr) {
        raise(
            "{}: the unit `{}` ({}) is held by a torch::nn::Sequential, which calls its modules' forward "
            "directly and would run it unhooked; hold the units in a torch::nn::ModuleList and call them "
            "from your forward (`for (auto& b : blocks) x = b(x);`)",
            who, shown, m->name());
      }
    }
    found.push_back({path, m});
  }
  return found;
}

}  // namespace detail
}  // namespace fabric

/// Declares the holder `Name` of the unit module `Name##Impl`, in place of TORCH_MODULE(Name): its call
/// runs the hooks a strategy (FSDP) installs and activation checkpointing.
#define FABRIC_UNIT(Name)                          \
  class Name : public ::fabric::Unit<Name##Impl> { \
   public:                                         \
    using ::fabric::Unit<Name##Impl>::Unit;        \
    using ::fabric::Unit<Name##Impl>::get;         \
  }
