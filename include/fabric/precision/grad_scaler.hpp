#pragma once
// fabric::GradScaler: PyTorch's gradient scaler for float16 mixed precision, in C++ (LibTorch has none).

#include "fabric/core/error.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/optim/foreach_step.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <map>
#include <vector>

namespace fabric {

/// Scales the loss so float16 gradients do not underflow, unscales the gradients before the step,
/// skips the step when any gradient is inf/NaN, and grows or backs off the scale like PyTorch's
/// torch.amp.GradScaler (initial 2^16, growth 2 every 2000 good steps, backoff 0.5 on inf/NaN).
/// Uses LibTorch's own kernels where they exist (CUDA; CPU from LibTorch 2) and equivalent tensor
/// operations elsewhere.
class GradScaler {
 public:
  /// Settings of the scaler (PyTorch's defaults).
  struct Options {
    double init_scale = 65536.0;
    double growth_factor = 2.0;
    double backoff_factor = 0.5;
    std::int64_t growth_interval = 2000;
    /// Compares every setting.
    bool operator==(const Options&) const = default;
  };

  GradScaler() : GradScaler(Options{}) {}
  explicit GradScaler(Options options) : options_(options) {
    if (options_.growth_factor <= 1.0 || options_.backoff_factor >= 1.0 || options_.backoff_factor <= 0.0 ||
        options_.growth_interval < 1 || options_.init_scale <= 0.0) {
      detail::raise(
          "GradScaler: expected growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1 and init_scale > 0, "
          "found {}, {}, {} and {}",
          options_.growth_factor, options_.backoff_factor, options_.growth_interval, options_.init_scale);
    }
  }

  /// Returns loss multiplied by the current scale (the scale lives on the loss's device).
  at::Tensor scale(const at::Tensor& loss) {
    lazy_init(loss.device());
    return loss.mul(scale_.to(loss.scalar_type()));
  }

  /// Divides the optimizer's gradients by the scale in place and records whether any is inf/NaN.
  /// Once per step: a second call before update() is an error.
  void unscale_(torch::optim::Optimizer& optimizer) {
    auto& state = per_optimizer_[&optimizer];
    if (state.unscaled) {
      detail::raise(
          "GradScaler: unscale_ was already called for this optimizer since the last update(); "
          "clip gradients at most once per step, after backward and before step");
    }
    if (!scale_.defined()) {
      detail::raise("GradScaler: unscale_ before any scaled backward; call fabric.backward(loss) first");
    }
    const at::Tensor inv_scale = scale_.to(at::kDouble).reciprocal().to(at::kFloat);
    at::Tensor found_inf = at::zeros({1}, scale_.options());
    std::map<c10::ScalarType, std::vector<at::Tensor>> by_dtype;
    for (auto& group : optimizer.param_groups()) {
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        if (p.grad().scalar_type() == at::kHalf) {
          detail::raise(
              "GradScaler: expected float32 gradients, found float16 ones; keep the parameters in float32 "
              "(FP16Mixed does) or use FP16True, which has no scaler");
        }
        by_dtype[p.grad().scalar_type()].push_back(p.grad());
      }
    }
    for (auto& [dtype, grads] : by_dtype) {
      if (kernels_available()) {
        at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
      } else {
        for (auto& g : grads) {
          found_inf.logical_or_(g.isfinite().logical_not().any().reshape({1}));
          g.mul_(inv_scale.to(g.scalar_type()));
        }
      }
    }
    state.found_inf = found_inf;
    state.unscaled = true;
  }

  /// Unscales if needed and steps the optimizer unless a gradient was inf/NaN; returns the
  /// optimizer's result, or an undefined tensor when the step was skipped.
  template <class Closure>
  at::Tensor step(torch::optim::Optimizer& optimizer, Closure&& closure) {
    if (!scale_.defined()) return detail::optimizer_step(optimizer, std::forward<Closure>(closure));
    auto& state = per_optimizer_[&optimizer];
    if (!state.unscaled) unscale_(optimizer);
    // NOTE: LibTorch's optimizers cannot take found_inf, so the decision needs the host (as in PyTorch).
    skipped_ = state.found_inf.item<double>() != 0.0;
    if (skipped_) return {};
    return detail::optimizer_step(optimizer, std::forward<Closure>(closure));
  }

  /// Updates the scale from the steps since the last update: backoff when any gradient was inf/NaN,
  /// growth after growth_interval clean steps.
  void update() {
    if (!scale_.defined()) return;
    at::Tensor found = at::zeros({1}, scale_.options());
    for (auto& [opt, state] : per_optimizer_) {
      if (state.found_inf.defined()) found.add_(state.found_inf.to(found.device()));
    }
    if (kernels_available()) {
      at::_amp_update_scale_(scale_, growth_tracker_, found, options_.growth_factor, options_.backoff_factor,
                             options_.growth_interval);
    } else if (found.item<double>() != 0.0) {
      scale_.mul_(options_.backoff_factor);
      growth_tracker_.zero_();
    } else if (growth_tracker_.item<std::int64_t>() + 1 == options_.growth_interval) {
      scale_.mul_(options_.growth_factor);
      growth_tracker_.zero_();
    } else {
      growth_tracker_.add_(1);
    }
    per_optimizer_.clear();
  }

  /// Returns the current scale.
  double get_scale() const { return scale_.defined() ? scale_.item<double>() : options_.init_scale; }
  /// Returns the number of clean steps since the last growth or backoff.
  std::int64_t growth_tracker() const { return growth_tracker_.defined() ? growth_tracker_.item<std::int64_t>() : 0; }
  /// Returns true when the last step() was skipped because of inf/NaN gradients.
  bool last_step_skipped() const noexcept { return skipped_; }
  /// Returns the options.
  const Options& options() const noexcept { return options_; }

  /// Returns the state under PyTorch's keys: scale, growth_factor, backoff_factor, growth_interval,
  /// _growth_tracker.
  c10::impl::GenericDict state_dict() const {
    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    dict.insert("scale", get_scale());
    dict.insert("growth_factor", options_.growth_factor);
    dict.insert("backoff_factor", options_.backoff_factor);
    dict.insert("growth_interval", options_.growth_interval);
    dict.insert("_growth_tracker", growth_tracker());
    return dict;
  }
  /// Restores the state written by state_dict (or by PyTorch's GradScaler).
  void load_state_dict(const c10::impl::GenericDict& dict) {
    for (const char* key : {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}) {
      if (!dict.contains(key))
        detail::raise("GradScaler: expected the key \"{}\" in the scaler state, found none", key);
    }
    auto number = [&](const char* key) {
      const c10::IValue v = dict.at(key);
      if (!v.isDouble() && !v.isInt()) detail::raise("GradScaler: expected a number under \"{}\"", key);
      return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
    };
    options_.init_scale = number("scale");
    options_.growth_factor = number("growth_factor");
    options_.backoff_factor = number("backoff_factor");
    options_.growth_interval = static_cast<std::int64_t>(number("growth_interval"));
    const auto tracker = static_cast<std::int64_t>(number("_growth_tracker"));
    const c10::Device device = scale_.defined() ? scale_.device() : c10::Device(c10::DeviceType::CPU);
    scale_ = at::full(at::IntArrayRef{}, options_.init_scale, at::TensorOptions().dtype(at::kFloat).device(device));
    growth_tracker_ = at::full(at::IntArrayRef{}, tracker, at::TensorOptions().dtype(at::kInt).device(device));
  }

 private:
  struct OptimizerState {
    bool unscaled = false;
    at::Tensor found_inf{};
  };

  void lazy_init(const c10::Device& device) {
    if (scale_.defined()) {
      if (scale_.device() != device) {
        scale_ = scale_.to(device);
        growth_tracker_ = growth_tracker_.to(device);
      }
      return;
    }
    scale_ = at::full(at::IntArrayRef{}, options_.init_scale, at::TensorOptions().dtype(at::kFloat).device(device));
    growth_tracker_ = at::zeros(at::IntArrayRef{}, at::TensorOptions().dtype(at::kInt).device(device));
  }

  bool kernels_available() const {
    // NOTE: LibTorch 1.13 has the _amp_* kernels for CUDA only; 2.x for the CPU too.
    return scale_.is_cuda() || detail::torch_cpu_amp_kernels;
  }

  Options options_;
  at::Tensor scale_{};
  at::Tensor growth_tracker_{};
  std::map<const torch::optim::Optimizer*, OptimizerState> per_optimizer_{};
  bool skipped_ = false;
};

}  // namespace fabric
