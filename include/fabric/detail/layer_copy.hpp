#pragma once
// The deep copy behind clone() of fabric's drop-in layers (fabric::nn::Linear, fabric::nn::LayerNorm): they
// derive from LibTorch's layers, whose Cloneable::clone would give LibTorch's type.

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>

namespace fabric::detail {

/// Copies `from`'s weight and bias (either may be undefined) into the freshly built `to` (onto `device` when
/// given, else cloned in place) and its training mode.
template <class Layer>
void copy_layer_state(const Layer& from, Layer& to, const c10::optional<c10::Device>& device) {
  at::NoGradGuard no_grad;
  const auto copy_into = [&device](const at::Tensor& source, const at::Tensor& target) {
    if (source.defined()) {
      target.set_data(device && source.device() != *device ? source.to(*device) : source.clone());
    }
  };
  copy_into(from.weight, to.weight);
  copy_into(from.bias, to.bias);
  to.train(from.is_training());
}

}  // namespace fabric::detail
