#pragma once
// The precisions that convert the module's weights or the data to another dtype: FP64, BF16True,
// FP16True, and the mixed ones that autocast: BF16Mixed (BF16) and FP16Mixed (FP16).

#include "fabric/concepts.hpp"
#include "fabric/device.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/precision/fp32.hpp"
#include "fabric/precision/grad_scaler.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/version.h>

#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

namespace fabric {
namespace detail {

/// Returns data with every floating-point tensor cast to dtype (integer tensors untouched).
template <class T>
std::remove_cvref_t<T> cast_floating(T&& data, c10::ScalarType dtype) {
  auto cast = [dtype](at::Tensor t) {
    return t.defined() && t.is_floating_point() && t.scalar_type() != dtype ? t.to(dtype) : t;
  };
  return map_tensors(std::remove_cvref_t<T>(std::forward<T>(data)), cast);
}

/// Converts a module's floating-point parameters and buffers to dtype in place.
template <class M>
void convert_module_to(M& module, c10::ScalarType dtype) {
  module.to(dtype);
}

}  // namespace detail

/// Weights, compute and the default dtype of a dtype ("64-true", "bf16-true", "16-true"): the
/// module is converted (no float32 master copy, no scaler), floating inputs are cast to the dtype
/// and floating outputs back to float32; `init_module`/`init_tensor` create tensors in the dtype.
template <c10::ScalarType Dtype>
struct TruePrecision : detail::UnscaledSteps {
  using category = precision_tag;
  static constexpr std::string_view name = Dtype == c10::ScalarType::Double     ? "64-true"
                                           : Dtype == c10::ScalarType::BFloat16 ? "bf16-true"
                                                                                : "16-true";

  /// Returns the dtype of parameters and of what `init_module`/`init_tensor` create.
  static constexpr c10::ScalarType param_dtype() noexcept { return Dtype; }
  /// Checks the combination with an accelerator (every accelerator stores these dtypes).
  template <Accelerator A>
  static constexpr void check() noexcept {}
  /// Fails at construction where the device cannot compute in the dtype: float16 matmuls on the CPU
  /// need LibTorch 2.1.
  static void setup_device(const c10::Device& device) {
    constexpr bool cpu_half = TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1);
    if (Dtype == c10::ScalarType::Half && device.is_cpu() && !cpu_half) {
      detail::raise(
          "16-true cannot run on the CPU with LibTorch {} (no float16 matmul there); use bf16-true, or a "
          "CUDA device",
          TORCH_VERSION);
    }
  }

  template <class M>
  void convert_module(M& module) {
    detail::convert_module_to(module, Dtype);
  }
  template <class T>
  std::remove_cvref_t<T> convert_input(T&& x) {
    return detail::cast_floating(std::forward<T>(x), Dtype);
  }
  template <class T>
  std::remove_cvref_t<T> convert_output(T&& x) {
    return detail::cast_floating(std::forward<T>(x), c10::ScalarType::Float);
  }
  /// Makes the dtype the default while forward (or `Fabric::autocast`) runs.
  DefaultDtypeGuard forward_context() const { return DefaultDtypeGuard(Dtype); }
};

/// float64 everywhere ("64-true").
using FP64 = TruePrecision<c10::ScalarType::Double>;
/// bfloat16 weights and compute, no master copy ("bf16-true").
using BF16True = TruePrecision<c10::ScalarType::BFloat16>;
/// float16 weights and compute, no master copy and no scaler ("16-true").
using FP16True = TruePrecision<c10::ScalarType::Half>;

/// Mixed precision ("bf16-mixed", "16-mixed"): parameters stay float32, forward runs under autocast
/// to the dtype on the fabric's device, floating inputs are cast to the dtype and outputs come back
/// as float32. `Fabric::autocast()` extends autocast to code outside forward (the loss). float16
/// scales the loss with a GradScaler.
///
/// On a LibTorch without float16 autocast on the CPU (1.13), FP16Mixed on the CPU does what
/// Lightning does: it warns once and runs as BF16Mixed (no scaler).
template <c10::ScalarType Dtype>
class MixedPrecision {
  static_assert(Dtype == c10::ScalarType::BFloat16 || Dtype == c10::ScalarType::Half,
                "fabric: mixed precision autocasts to bfloat16 or float16; use BF16Mixed or FP16Mixed");

 public:
  using category = precision_tag;
  static constexpr std::string_view name = Dtype == c10::ScalarType::BFloat16 ? "bf16-mixed" : "16-mixed";

  /// Settings: the gradient scaler's (used by float16 only).
  struct Options {
    GradScaler::Options scaler{};
  };

  MixedPrecision() = default;
  explicit MixedPrecision(Options options) : options_(options) {}

  static constexpr c10::ScalarType param_dtype() noexcept { return c10::ScalarType::Float; }
  /// Rejects accelerators that cannot autocast this dtype in any LibTorch version.
  template <Accelerator A>
  static constexpr void check() noexcept {
    static_assert(detail::may_run_on<A>(c10::DeviceType::CPU) || detail::may_run_on<A>(c10::DeviceType::CUDA),
                  "fabric: mixed precision needs an accelerator that LibTorch can autocast (CPU or CUDA); use "
                  "FP32 or a true-half precision on this accelerator");
  }

  /// Binds the precision to the fabric's device (called once by Fabric).
  void setup_device(const c10::Device& device) {
    device_type_ = device.type();
    dtype_ = Dtype;
    if (!detail::can_autocast(device_type_, Dtype)) {
      if (Dtype == c10::ScalarType::Half && device_type_ == c10::DeviceType::CPU) {
        TORCH_WARN_ONCE("fabric: FP16Mixed on the CPU needs LibTorch 2 (this LibTorch ", TORCH_VERSION,
                        " autocasts only to bfloat16 there); running as BF16Mixed, as Lightning does");
        dtype_ = c10::ScalarType::BFloat16;
      } else {
        detail::raise("{} cannot autocast on the device {}; use FP32 or a true-half precision", std::string(name),
                      device.str());
      }
    }
    if (dtype_ == c10::ScalarType::Half) scaler_.emplace(options_.scaler);
  }

  /// Returns the dtype forward autocasts to (FP16Mixed may have fallen back to bfloat16).
  c10::ScalarType compute_dtype() const noexcept { return dtype_; }
  /// Returns the gradient scaler (float16 only), or null.
  GradScaler* scaler() noexcept { return scaler_ ? &*scaler_ : nullptr; }

  template <class M>
  void convert_module(M& /*module*/) noexcept {}
  template <class T>
  std::remove_cvref_t<T> convert_input(T&& x) {
    return detail::cast_floating(std::forward<T>(x), dtype_);
  }
  template <class T>
  std::remove_cvref_t<T> convert_output(T&& x) {
    return detail::cast_floating(std::forward<T>(x), c10::ScalarType::Float);
  }
  /// Autocast for the fabric's device type and the dtype.
  AutocastGuard forward_context() const { return AutocastGuard(device_type_, dtype_); }
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    if (scaler_) {
      scaler_->scale(loss).backward(std::forward<Args>(args)...);
    } else {
      loss.backward(std::forward<Args>(args)...);
    }
  }
  template <class O>
  void unscale_gradients(O& optimizer) {
    if (scaler_) scaler_->unscale_(optimizer);
  }
  template <class O, class Closure>
  at::Tensor optimizer_step(O& optimizer, Closure&& closure) {
    if (!scaler_) return detail::optimizer_step(optimizer, std::forward<Closure>(closure));
    at::Tensor result = scaler_->step(optimizer, std::forward<Closure>(closure));
    scaler_->update();
    return result;
  }

 private:
  Options options_{};
  c10::DeviceType device_type_ = c10::DeviceType::CPU;
  c10::ScalarType dtype_ = Dtype;
  std::optional<GradScaler> scaler_{};
};

/// bfloat16 mixed precision ("bf16-mixed").
using BF16Mixed = MixedPrecision<c10::ScalarType::BFloat16>;
/// float16 mixed precision with a gradient scaler ("16-mixed").
using FP16Mixed = MixedPrecision<c10::ScalarType::Half>;
/// The short name of BF16Mixed, as "bf16" is in Lightning.
using BF16 = BF16Mixed;
/// The short name of FP16Mixed, as "16" is in Lightning.
using FP16 = FP16Mixed;

}  // namespace fabric
