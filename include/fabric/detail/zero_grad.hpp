#pragma once
// fabric::detail::zero_grad: how the wrappers reset one parameter's gradient.

#include <ATen/core/Tensor.h>

namespace fabric::detail {

/// Resets a parameter's gradient: to an undefined tensor with set_to_none, else to zeros in place.
// NOTE: like Python's Optimizer.zero_grad, a gradient without history is not detach_()ed: with DDP's
// gradient_as_bucket_view it is a view into a bucket, which detach_() rejects.
inline void zero_grad(at::Tensor& param, bool set_to_none) {
  if (!param.grad().defined()) return;
  if (set_to_none) {
    param.mutable_grad() = at::Tensor();
  } else {
    if (param.grad().grad_fn()) {
      param.mutable_grad().detach_();
    } else {
      param.mutable_grad().requires_grad_(false);
    }
    param.mutable_grad().zero_();
  }
}

}  // namespace fabric::detail
