#pragma once
// Gradient clipping: the maths of `Fabric::clip_gradients` (torch.nn.utils.clip_grad_norm_ and
// clip_grad_value_), on the gradients of an optimizer's parameters.

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>
#include <torch/optim/optimizer.h>

#include <cmath>
#include <optional>
#include <vector>

namespace fabric {

/// Returns the defined gradients of the optimizer's parameters (views of them, not copies).
inline std::vector<at::Tensor> optimizer_gradients(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> grads;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      if (p.grad().defined()) grads.push_back(p.grad());
    }
  }
  return grads;
}

/// Clamps every gradient element into [-clip_val, clip_val] in place.
inline void clip_gradients_value(const std::vector<at::Tensor>& grads, double clip_val) {
  if (clip_val < 0) detail::raise("clip_gradients: expected clip_val >= 0, found {}", clip_val);
  at::NoGradGuard no_grad;
  for (auto g : grads) g.clamp_(-clip_val, clip_val);
}

/// Rescales the gradients in place so that their total p-norm is at most max_norm and returns the
/// total norm before clipping (a scalar tensor on `device` when there are no gradients). With a
/// norm_dtype the norms are accumulated and returned in it (fabric::BF16Master: float32 over bfloat16
/// gradients), else in the gradients' dtype, as torch.nn.utils.clip_grad_norm_.
inline at::Tensor clip_gradients_norm(const std::vector<at::Tensor>& grads, double max_norm, double norm_type,
                                      bool error_if_nonfinite, const c10::Device& device,
                                      c10::ScalarType norm_dtype = c10::ScalarType::Undefined) {
  at::NoGradGuard no_grad;
  if (grads.empty()) return at::scalar_tensor(0.0, at::TensorOptions().device(device));
  std::vector<at::Tensor> norms;
  norms.reserve(grads.size());
  const bool inf = std::isinf(norm_type);
  const bool cast = norm_dtype != c10::ScalarType::Undefined;
  for (const auto& g : grads) {
    if (inf) {
      norms.push_back(cast ? g.detach().abs().max().to(norm_dtype) : g.detach().abs().max());
    } else {
      norms.push_back(cast ? g.detach().norm(c10::optional<at::Scalar>(norm_type), norm_dtype)
                           : g.detach().norm(norm_type));
    }
  }
  const at::Tensor stacked = at::stack(norms);
  at::Tensor total = inf ? stacked.max() : stacked.norm(norm_type);
  if (error_if_nonfinite && !std::isfinite(total.item<double>())) {
    detail::raise(
        "clip_gradients: the total norm of order {} of the gradients is non-finite ({}), so they cannot be "
        "clipped; check the loss, or pass error_if_nonfinite = false",
        norm_type, total.item<double>());
  }
  const at::Tensor coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
  for (auto g : grads) g.mul_(coef.to(g.device()));
  return total;
}

/// Clips the optimizer's gradients as options say (exactly one of max_norm and clip_val); returns the
/// total norm before clipping for max_norm, nothing for clip_val.
inline std::optional<at::Tensor> clip_gradients(const torch::optim::Optimizer& optimizer, const ClipOptions& options,
                                                const c10::Device& device) {
  const auto grads = optimizer_gradients(optimizer);
  if (options.clip_val) {
    clip_gradients_value(grads, *options.clip_val);
    return std::nullopt;
  }
  return clip_gradients_norm(grads, *options.max_norm, options.norm_type, options.error_if_nonfinite, device);
}

}  // namespace fabric
