#pragma once
// fabric::nn::Linear: torch::nn::Linear whose forward keeps the bias in the matrix product for every
// input rank (at::linear), so a [B, T, C] input costs one GEMM, not a GEMM and a separate bias add.

#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <ostream>

namespace fabric::nn {

/// A drop-in for `torch::nn::LinearImpl`: the same options, parameters (`weight` [out, in], `bias` [out]),
/// initialisation (so a seed gives the same weights) and state-dict keys, and a forward that calls
/// `at::linear`, which folds an input of any rank into one GEMM with the bias in it (under autocast the
/// bias is cast with the weight).
///
/// NOTE: LibTorch's `torch::nn::functional::linear` (and so `torch::nn::Linear`) fuses the bias only for
/// 2-D inputs; for a [B, T, C] input it runs the matmul and then `output += bias`, a second pass over the
/// output, and under autocast a mixed bfloat16 += float32 add. Python's `nn.Linear` calls `at::linear`.
///
///     fabric::nn::Linear fc(768, 3072);                                 // as torch::nn::Linear(768, 3072)
///     fabric::nn::Linear head(torch::nn::LinearOptions(768, 10).bias(false));
///     at::Tensor y = fc(x);                                             // x [B, T, 768] -> [B, T, 3072]
///
/// It is a `torch::nn::LinearImpl` (`module.as<torch::nn::Linear>()` finds it), and `clone()` gives a
/// fabric::nn::LinearImpl.
class LinearImpl : public torch::nn::LinearImpl {
 public:
  /// Creates the layer as `torch::nn::Linear(in_features, out_features)` does.
  LinearImpl(std::int64_t in_features, std::int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  /// Creates the layer as `torch::nn::Linear(options)` does.
  explicit LinearImpl(const torch::nn::LinearOptions& options) : torch::nn::LinearImpl(options) {}

  /// Returns `input @ weight.T + bias` for an input [..., in_features], bias inside the GEMM.
  at::Tensor forward(const at::Tensor& input) { return at::linear(input, weight, bias); }

  /// Returns a deep copy that is a fabric::nn::LinearImpl too (on `device` when given).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    torch::NoGradGuard no_grad;
    auto copy = std::make_shared<LinearImpl>(options);
    const auto copy_into = [&device](const at::Tensor& from, const at::Tensor& to) {
      if (from.defined()) to.set_data(device && from.device() != *device ? from.to(*device) : from.clone());
    };
    copy_into(weight, copy->weight);
    copy_into(bias, copy->bias);
    copy->train(is_training());
    return copy;
  }

  /// Prints `fabric::nn::Linear(in_features=.., out_features=.., bias=..)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "fabric::nn::Linear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", bias=" << std::boolalpha << options.bias() << ")";
  }
};

/// The module holder of fabric::nn::LinearImpl, used as `torch::nn::Linear` is.
TORCH_MODULE(Linear);

}  // namespace fabric::nn
