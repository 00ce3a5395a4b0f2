#pragma once
// fabric::MixedPrecision: float32 weights, forward under autocast: BF16Mixed ("bf16-mixed") and
// FP16Mixed ("16-mixed", with a gradient scaler).

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/precision/grad_scaler.hpp"
#include "fabric/precision/precision.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace fabric {

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
  /// Says that the precision works in the wrapper's forward (autocast, input casts).
  static constexpr bool needs_wrapped_forward = true;
  /// Says that `loss.backward()` must be `fabric.backward(loss)` (float16 scales the loss; bfloat16
  /// too, as in Lightning, so that a program runs under both).
  static constexpr bool needs_fabric_backward = true;
  /// Says that the optimizer's own step would skip the gradient scaler (float16 only).
  static constexpr bool needs_fabric_step = Dtype == c10::ScalarType::Half;

  /// Settings: the gradient scaler's (used by float16 only), and whether floating outputs of the wrapped
  /// forward come back as float32 (Lightning's `convert_output`; the default) or stay in the dtype
  /// autocast gave them (`convert_output = false`: bfloat16 logits for fabric::nn::cross_entropy, no
  /// float32 copy).
  struct Options {
    GradScaler::Options scaler{};
    bool convert_output = true;
  };

  MixedPrecision() = default;
  /// Creates the precision with its settings; bfloat16 has no gradient scaler, so BF16Mixed refuses scaler
  /// settings (as Lightning's `MixedPrecision("bf16-mixed", scaler=...)`).
  explicit MixedPrecision(Options options) : options_(options) {
    if (Dtype == c10::ScalarType::BFloat16 && !(options_.scaler == GradScaler::Options{})) {
      detail::raise(
          "bf16-mixed does not use a gradient scaler: expected the default MixedPrecision::Options::scaler, found "
          "init_scale = {}, growth_factor = {}, backoff_factor = {}, growth_interval = {}; drop the scaler settings "
          "or use FP16Mixed",
          options_.scaler.init_scale, options_.scaler.growth_factor, options_.scaler.backoff_factor,
          options_.scaler.growth_interval);
    }
  }

  /// Returns the dtype of parameters (float32: mixed precision keeps them).
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

  /// Leaves the module in float32.
  template <class M>
  void convert_module(M& /*module*/) noexcept {}
  /// Casts floating inputs of the wrapped forward to the compute dtype.
  template <class T>
  std::remove_cvref_t<T> convert_input(T&& x) {
    return detail::cast_floating(std::forward<T>(x), dtype_);
  }
  /// Casts floating outputs of the wrapped forward back to float32 (unless `Options::convert_output` is false).
  template <class T>
  std::remove_cvref_t<T> convert_output(T&& x) {
    if (!options_.convert_output) return std::remove_cvref_t<T>(std::forward<T>(x));
    return detail::cast_floating(std::forward<T>(x), c10::ScalarType::Float);
  }
  /// Says whether floating outputs of the wrapped forward come back as float32.
  bool converts_output() const noexcept { return options_.convert_output; }
  /// Autocast for the fabric's device type and the dtype.
  AutocastGuard forward_context() const { return AutocastGuard(device_type_, dtype_); }
  /// Runs backward on the loss, scaled by the gradient scaler with float16.
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    if (scaler_) {
      scaler_->scale(loss).backward(std::forward<Args>(args)...);
    } else {
      loss.backward(std::forward<Args>(args)...);
    }
  }
  /// Divides the gradients by the scale before clipping (float16 only).
  template <class O>
  void unscale_gradients(O& optimizer) {
    if (scaler_) scaler_->unscale_(optimizer);
  }
  /// Steps the optimizer; with float16 through the scaler (skipped on inf/NaN), then updates the scale.
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
