#pragma once
// What tells fabric's policy slots apart, torch-free: the category tags and the Policy concept. The
// complete concepts, which name every member the core calls, live beside each slot:
// accelerators/accelerator.hpp, strategies/strategy.hpp, precision/precision.hpp,
// io/checkpoint_io.hpp, strategies/environments/environment.hpp, loggers/logger.hpp.

#include <concepts>
#include <string_view>
#include <type_traits>

namespace fabric {

/// Marks a type as an accelerator policy (`using category = accelerator_tag;`).
struct accelerator_tag {};
/// Marks a type as a strategy policy (`using category = strategy_tag;`).
struct strategy_tag {};
/// Marks a type as a precision policy (`using category = precision_tag;`).
struct precision_tag {};

/// A policy names its category and a Lightning-style name, so Fabric can tell the three slots apart.
template <class T>
concept Policy = requires {
  typename T::category;
  { T::name } -> std::convertible_to<std::string_view>;
};

/// True when T is a policy of the slot marked by Tag (its category derives from the tag).
template <class T, class Tag>
concept PolicyOf = Policy<T> && std::derived_from<typename T::category, Tag>;

/// A callback is any movable class; which hooks it implements is discovered at compile time.
template <class T>
concept Callback = std::is_class_v<T> && std::move_constructible<T>;

/// The strategy makes the context under which `Fabric::init_module` creates modules (Lightning's
/// `Strategy.module_init_context`), e.g. to create them sharded or on another device; without it the
/// context is the precision's dtype.
template <class S, class P>
concept ProvidesModuleInitContext = requires(const S& s, const P& p) {
  s.module_init_context(p);
};

/// The strategy makes the context under which `Fabric::init_tensor` creates tensors (Lightning's
/// `Strategy.tensor_init_context`); without it the context is the precision's dtype.
template <class S, class P>
concept ProvidesTensorInitContext = requires(const S& s, const P& p) {
  s.tensor_init_context(p);
};

/// The strategy's cluster environment can tell how many processes per node the launcher started (the parallel
/// strategies: `parallel_options().cluster_environment.launcher_devices()`), which `Options::auto_devices` takes.
template <class S>
concept ReportsLauncherDevices = requires(const S& s) {
  s.parallel_options().cluster_environment.launcher_devices();
};

namespace detail {

/// False for every type; lets a static_assert in a discarded branch fire only when instantiated.
template <class...>
inline constexpr bool dependent_false_v = false;

}  // namespace detail
}  // namespace fabric
