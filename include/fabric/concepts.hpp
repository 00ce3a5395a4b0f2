#pragma once
// The concepts that constrain Fabric's policy parameters. Torch-free: the policies' torch-bound
// members are checked where Fabric uses them.

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

/// An accelerator says whether it is usable here and how many devices it has; Fabric picks the device.
template <class T>
concept Accelerator = Policy<T> && std::derived_from<typename T::category, accelerator_tag> && requires {
  { T::is_available() } -> std::same_as<bool>;
  { T::device_count() } -> std::convertible_to<int>;
};

/// A strategy owns the process topology (ranks, world size), synchronisation and per-module state.
template <class T>
concept Strategy = Policy<T> && std::derived_from<typename T::category, strategy_tag> && std::move_constructible<T> &&
    requires(T& s, const T& cs) {
  typename T::ModuleState;
  { T::is_distributed } -> std::convertible_to<bool>;
  { cs.global_rank() } -> std::convertible_to<int>;
  { cs.local_rank() } -> std::convertible_to<int>;
  { cs.node_rank() } -> std::convertible_to<int>;
  { cs.world_size() } -> std::convertible_to<int>;
  s.barrier();
};

/// A precision converts modules and data and gives the context that forward runs in.
template <class T>
concept Precision = Policy<T> && std::derived_from<typename T::category, precision_tag> && std::move_constructible<T> &&
    requires(T& p) {
  p.forward_context();
};

/// A callback is any movable class; which hooks it implements is discovered at compile time.
template <class T>
concept Callback = std::is_class_v<T> && std::move_constructible<T>;

}  // namespace fabric
