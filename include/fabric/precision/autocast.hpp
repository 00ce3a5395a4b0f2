#pragma once
// fabric::AutocastGuard and fabric::DefaultDtypeGuard: the scoped contexts precisions run code in.
// The one place that knows how autocast is spelled in each LibTorch version.

#include <ATen/autocast_mode.h>
#include <c10/core/DefaultDtype.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/typeid.h>

#include "fabric/detail/torch_version.hpp"

namespace fabric {
namespace detail {

// NOTE: LibTorch 2.4 added device-generic autocast functions and deprecated the per-device ones;
// 1.13 only has the per-device spellings (CPU and CUDA are the ones fabric runs on).
#if FABRIC_TORCH_GENERIC_AUTOCAST
inline bool autocast_enabled(c10::DeviceType d) { return at::autocast::is_autocast_enabled(d); }
inline void set_autocast_enabled(c10::DeviceType d, bool on) { at::autocast::set_autocast_enabled(d, on); }
inline c10::ScalarType autocast_dtype(c10::DeviceType d) { return at::autocast::get_autocast_dtype(d); }
inline void set_autocast_dtype(c10::DeviceType d, c10::ScalarType t) { at::autocast::set_autocast_dtype(d, t); }
#else
inline bool autocast_enabled(c10::DeviceType d) {
  return d == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
}
inline void set_autocast_enabled(c10::DeviceType d, bool on) {
  d == c10::DeviceType::CPU ? at::autocast::set_cpu_enabled(on) : at::autocast::set_enabled(on);
}
inline c10::ScalarType autocast_dtype(c10::DeviceType d) {
  return d == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype();
}
inline void set_autocast_dtype(c10::DeviceType d, c10::ScalarType t) {
  d == c10::DeviceType::CPU ? at::autocast::set_autocast_cpu_dtype(t) : at::autocast::set_autocast_gpu_dtype(t);
}
#endif

/// True when this LibTorch can autocast to dtype on the device type.
constexpr bool can_autocast(c10::DeviceType device, c10::ScalarType dtype) noexcept {
  if (device == c10::DeviceType::CUDA) return dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half;
  if (device == c10::DeviceType::CPU) {
    return dtype == c10::ScalarType::BFloat16 || (torch_cpu_autocast_half && dtype == c10::ScalarType::Half);
  }
  return false;
}

}  // namespace detail

/// Enables autocast for a device type and dtype while it lives, like Python's `torch.autocast`:
/// the previous state is restored on every exit (exceptions included), guards nest, and the
/// autocast cache is cleared when the outermost guard exits.
class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, c10::ScalarType dtype, bool enabled = true)
      : device_(device),
        prev_enabled_(detail::autocast_enabled(device)),
        prev_dtype_(detail::autocast_dtype(device)),
        prev_cache_(at::autocast::is_autocast_cache_enabled()) {
    detail::set_autocast_enabled(device_, enabled);
    detail::set_autocast_dtype(device_, dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    detail::set_autocast_enabled(device_, prev_enabled_);
    detail::set_autocast_dtype(device_, prev_dtype_);
    at::autocast::set_autocast_cache_enabled(prev_cache_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
  bool prev_cache_;
};

/// Sets the default dtype (what factory functions and new modules use) while it lives.
class DefaultDtypeGuard {
 public:
  explicit DefaultDtypeGuard(c10::ScalarType dtype) : prev_(c10::get_default_dtype()) {
    c10::set_default_dtype(c10::scalarTypeToTypeMeta(dtype));
  }
  ~DefaultDtypeGuard() { c10::set_default_dtype(prev_); }
  DefaultDtypeGuard(const DefaultDtypeGuard&) = delete;
  DefaultDtypeGuard& operator=(const DefaultDtypeGuard&) = delete;

 private:
  caffe2::TypeMeta prev_;
};

}  // namespace fabric
