#pragma once
// Applying functions to nested data: fabric::to_device (tensors, modules and nested standard containers
// to a device), map_tensors and for_each_tensor, and the module traits the wrappers use.

#include "fabric/core/error.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>
#include <torch/data/example.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

template <class T>
inline constexpr bool is_module_holder_v = std::is_base_of_v<torch::detail::ModuleHolderIndicator, T>;
template <class T>
inline constexpr bool is_module_ptr_v = false;
template <class M>
inline constexpr bool is_module_ptr_v<std::shared_ptr<M>> = std::is_base_of_v<torch::nn::Module, M>;

}  // namespace detail

/// A module a user passes around: a TORCH_MODULE holder, a shared_ptr to a module, or a module object.
template <class T>
concept ModuleLike = detail::is_module_holder_v<std::remove_cvref_t<T>> ||
    detail::is_module_ptr_v<std::remove_cvref_t<T>> || std::is_base_of_v<torch::nn::Module, std::remove_cvref_t<T>>;

namespace detail {

template <class T>
struct MapTensors;

/// Applies fn to every tensor inside value (tensors, Example, and nestings of vector, array, tuple,
/// pair, map, unordered_map, optional) and returns the result; the result has the input's type and
/// everything that is not a tensor is kept as it is.
/// A value of another type gets `fn.object(value)` where fn has it (to_device gives an object with
/// `to(device)` a chance to move itself).
template <class T, class F>
T map_tensors(T value, F& fn) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return fn(std::move(value));
  } else if constexpr (requires { MapTensors<T>::apply(value, fn); }) {
    MapTensors<T>::apply(value, fn);
    return value;
  } else if constexpr (requires { fn.object(std::move(value)); }) {
    return fn.object(std::move(value));
  } else {
    return value;
  }
}

template <class E, class A>
struct MapTensors<std::vector<E, A>> {
  template <class F>
  static void apply(std::vector<E, A>& v, F& fn) {
    for (auto& e : v) e = map_tensors(std::move(e), fn);
  }
};
template <class E, std::size_t N>
struct MapTensors<std::array<E, N>> {
  template <class F>
  static void apply(std::array<E, N>& v, F& fn) {
    for (auto& e : v) e = map_tensors(std::move(e), fn);
  }
};
template <class... Ts>
struct MapTensors<std::tuple<Ts...>> {
  template <class F>
  static void apply(std::tuple<Ts...>& t, F& fn) {
    std::apply([&](auto&... e) { ((e = map_tensors(std::move(e), fn)), ...); }, t);
  }
};
template <class A, class B>
struct MapTensors<std::pair<A, B>> {
  template <class F>
  static void apply(std::pair<A, B>& p, F& fn) {
    p.first = map_tensors(std::move(p.first), fn);
    p.second = map_tensors(std::move(p.second), fn);
  }
};
template <class K, class V, class C, class A>
struct MapTensors<std::map<K, V, C, A>> {
  template <class F>
  static void apply(std::map<K, V, C, A>& m, F& fn) {
    for (auto& [k, v] : m) v = map_tensors(std::move(v), fn);
  }
};
template <class K, class V, class H, class E, class A>
struct MapTensors<std::unordered_map<K, V, H, E, A>> {
  template <class F>
  static void apply(std::unordered_map<K, V, H, E, A>& m, F& fn) {
    for (auto& [k, v] : m) v = map_tensors(std::move(v), fn);
  }
};
template <class T>
struct MapTensors<std::optional<T>> {
  template <class F>
  static void apply(std::optional<T>& o, F& fn) {
    if (o) *o = map_tensors(std::move(*o), fn);
  }
};
template <class D, class T>
struct MapTensors<torch::data::Example<D, T>> {
  template <class F>
  static void apply(torch::data::Example<D, T>& e, F& fn) {
    e.data = map_tensors(std::move(e.data), fn);
    if constexpr (!std::is_same_v<T, torch::data::example::NoTarget>) e.target = map_tensors(std::move(e.target), fn);
  }
};

/// A type that moves itself: it has `to(device)`, returning the moved object or moving in place (Lightning's
/// `_TransferableDataType`).
template <class T>
concept Transferable = !std::is_same_v<T, at::Tensor> && requires(T & v, const c10::Device& d) {
  v.to(d);
};

/// Moves tensors, and objects that have `to(device)`, to a device.
struct MoveTo {
  c10::Device device;
  bool non_blocking;
  at::Tensor operator()(at::Tensor t) const {
    return t.defined() && t.device() != device ? t.to(device, non_blocking) : t;
  }
  /// Returns what `to(device)` returned when that is the object's type, else the object moved in place
  /// (a `to` that returns nothing, or something else, as Lightning keeps the object then).
  template <Transferable T>
  T object(T value) const {
    if constexpr (std::is_convertible_v<decltype(value.to(device)), T>) {
      return value.to(device);
    } else {
      (void)value.to(device);
      return value;
    }
  }
};

/// Moves every tensor inside value to the device.
template <class T>
T move_data(T value, const c10::Device& device, bool non_blocking) {
  MoveTo move{device, non_blocking};
  return map_tensors(std::move(value), move);
}

/// Moves every tensor of a batch to the device; to a CUDA device, tensors in pinned (page-locked)
/// memory are copied asynchronously (non_blocking), as PyTorch's loaders with pin_memory do.
/// NOTE: the copy is ordered on the current stream before the ops that use it, and the pinned
/// allocator keeps the source alive until the copy is done, so this is safe without a sync.
template <class T>
T move_batch(T value, const c10::Device& device) {
  const bool cuda = device.is_cuda();
  auto move = [&](at::Tensor t) {
    if (!t.defined() || t.device() == device) return t;
    return t.to(device, /*non_blocking=*/cuda && t.is_pinned());
  };
  return map_tensors(std::move(value), move);
}

/// Returns value with every CPU tensor in pinned memory (needs a LibTorch with CUDA).
template <class T>
T pin_memory(T value) {
  auto pin = [](at::Tensor t) { return t.defined() && t.is_cpu() && !t.is_pinned() ? t.pin_memory() : t; };
  return map_tensors(std::move(value), pin);
}

template <class M>
torch::nn::Module& module_ref(M& m) {
  if constexpr (is_module_holder_v<std::remove_cv_t<M>> || is_module_ptr_v<std::remove_cv_t<M>>) {
    return *m;
  } else {
    return m;
  }
}

/// Calls fn on every tensor in a (nested) value, as map_tensors visits them.
template <class T, class F>
void for_each_tensor(const T& value, F&& fn) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    fn(value);
  } else {
    auto visit = [&](at::Tensor t) {
      fn(t);
      return t;
    };
    (void)map_tensors(T(value), visit);
  }
}

template <class T>
struct ToScalars {
  static T apply(const T& value) { return value; }
};
template <>
struct ToScalars<at::Tensor> {
  static double apply(const at::Tensor& t) {
    if (t.numel() != 1) {
      raise(
          "convert_tensors_to_scalars: the tensor of shape {} does not contain a single element; expected one "
          "element, found {}; reduce it first (mean, sum)",
          fmt::format("[{}]", fmt::join(t.sizes(), ", ")), t.numel());
    }
    return t.item<double>();
  }
};
template <class E, class A>
struct ToScalars<std::vector<E, A>> {
  static auto apply(const std::vector<E, A>& v) {
    std::vector<decltype(ToScalars<E>::apply(std::declval<const E&>()))> out;
    out.reserve(v.size());
    for (const auto& e : v) out.push_back(ToScalars<E>::apply(e));
    return out;
  }
};
template <class E, std::size_t N>
struct ToScalars<std::array<E, N>> {
  static auto apply(const std::array<E, N>& v) {
    return [&]<std::size_t... I>(std::index_sequence<I...>) { return std::array{ToScalars<E>::apply(v[I])...}; }
    (std::make_index_sequence<N>{});
  }
};
template <class... Ts>
struct ToScalars<std::tuple<Ts...>> {
  static auto apply(const std::tuple<Ts...>& t) {
    return std::apply([](const auto&... e) { return std::tuple{ToScalars<Ts>::apply(e)...}; }, t);
  }
};
template <class A, class B>
struct ToScalars<std::pair<A, B>> {
  static auto apply(const std::pair<A, B>& p) {
    return std::pair{ToScalars<A>::apply(p.first), ToScalars<B>::apply(p.second)};
  }
};
template <class K, class V, class C, class A>
struct ToScalars<std::map<K, V, C, A>> {
  static auto apply(const std::map<K, V, C, A>& m) {
    std::map<K, decltype(ToScalars<V>::apply(std::declval<const V&>())), C> out;
    for (const auto& [k, v] : m) out.emplace(k, ToScalars<V>::apply(v));
    return out;
  }
};
template <class K, class V, class H, class E, class A>
struct ToScalars<std::unordered_map<K, V, H, E, A>> {
  static auto apply(const std::unordered_map<K, V, H, E, A>& m) {
    std::unordered_map<K, decltype(ToScalars<V>::apply(std::declval<const V&>())), H, E> out;
    for (const auto& [k, v] : m) out.emplace(k, ToScalars<V>::apply(v));
    return out;
  }
};
template <class T>
struct ToScalars<std::optional<T>> {
  static auto apply(const std::optional<T>& o) {
    using R = decltype(ToScalars<T>::apply(std::declval<const T&>()));
    return o ? std::optional<R>(ToScalars<T>::apply(*o)) : std::optional<R>();
  }
};

/// Writes a shape as "[2, 3]" for messages.
inline std::string shape_str(at::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

}  // namespace detail

/// Moves a module's parameters and buffers to the device in place and returns the module itself.
template <ModuleLike M>
M& to_device(M& module, const c10::Device& device, bool non_blocking = false) {
  detail::module_ref(module).to(device, non_blocking);
  return module;
}

/// Returns data with every tensor moved to the device: tensors, torch::data::Example, and any nesting of
/// vector, array, tuple, pair, map, unordered_map and optional; other values are returned unchanged.
///
///     auto batch = fabric::to_device(std::pair{images, labels}, torch::kCPU);
///
/// An object of one's own that has `to(device)` (alone or inside a container) moves itself: what `to`
/// returns is kept when it is the object's type, else the object itself (a `to` that moves in place).
template <class T>
requires(!ModuleLike<T>) std::remove_cvref_t<T> to_device(T&& data, const c10::Device& device,
                                                          bool non_blocking = false) {
  return detail::move_data(std::remove_cvref_t<T>(std::forward<T>(data)), device, non_blocking);
}

/// Returns data with every tensor replaced by its value as a double (vector, array, tuple, pair, map,
/// unordered_map and optional are rebuilt around the numbers; other values are kept), as Lightning's
/// `convert_tensors_to_scalars` prepares metrics for loggers. A tensor of more than one element is an error.
///
///     std::map<std::string, double> metrics = fabric::convert_tensors_to_scalars(std::map{{"loss"s, loss}});
template <class T>
auto convert_tensors_to_scalars(const T& data) {
  return detail::ToScalars<T>::apply(data);
}

}  // namespace fabric
