#pragma once
// A compile-time list of types, used for callbacks and policy lists. Torch-free.

#include <cstddef>
#include <type_traits>

namespace fabric {

/// Holds a pack of types at compile time.
template <class... Ts>
struct TypeList {
  static constexpr std::size_t size = sizeof...(Ts);
};

/// True when T is one of Ts.
template <class T, class List>
inline constexpr bool contains_v = false;
template <class T, class... Ts>
inline constexpr bool contains_v<T, TypeList<Ts...>> = (std::is_same_v<T, Ts> || ...);

/// Calls f.template operator()<T>() for every T of the list, in order.
template <class... Ts, class F>
constexpr void for_each_type(TypeList<Ts...>, F&& f) {
  (f.template operator()<Ts>(), ...);
}

namespace detail {
template <class T, class... Ts>
constexpr std::size_t count_of() noexcept {
  return (std::size_t{std::is_same_v<T, Ts>} + ... + 0);
}
}  // namespace detail

/// True when no type appears twice in the list.
template <class List>
inline constexpr bool is_unique_v = false;
template <class... Ts>
inline constexpr bool is_unique_v<TypeList<Ts...>> = ((detail::count_of<Ts, Ts...>() == 1) && ...);

}  // namespace fabric
