#pragma once
// Applying functions to nested data: fabric::to_device (tensors, modules and nested standard containers
// to a device), map_tensors and for_each_tensor, and the module traits the wrappers use.

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
template <class T, class F>
T map_tensors(T value, F& fn) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return fn(std::move(value));
  } else {
    if constexpr (requires { MapTensors<T>::apply(value, fn); }) MapTensors<T>::apply(value, fn);
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

/// Moves every tensor inside value to the device.
template <class T>
T move_data(T value, const c10::Device& device, bool non_blocking) {
  auto move = [&](at::Tensor t) { return t.defined() && t.device() != device ? t.to(device, non_blocking) : t; };
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
template <class T>
requires(!ModuleLike<T>) std::remove_cvref_t<T> to_device(T&& data, const c10::Device& device,
                                                          bool non_blocking = false) {
  return detail::move_data(std::remove_cvref_t<T>(std::forward<T>(data)), device, non_blocking);
}

}  // namespace fabric
