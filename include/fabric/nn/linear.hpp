#pragma once
// fabric::nn::Linear: torch::nn::Linear whose forward keeps the bias in the matrix product for every
// input rank (at::linear), so a [B, T, C] input costs one GEMM, not a GEMM and a separate bias add; under
// autocast its float32 weight and bias get their gradients in float32 straight from the GEMM and the sum.

#include "fabric/core/error.hpp"
#include "fabric/detail/column_sum_kernel.hpp"
#include "fabric/detail/layer_copy.hpp"
#include "fabric/precision/autocast.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <vector>

namespace fabric::nn {
namespace detail {

/// True when this LibTorch has `at::mm(a, b, out_dtype)` (bfloat16 / float16 operands, a float32 product
/// straight from the GEMM; CUDA only).
template <class T>
concept mm_with_out_dtype = requires(const T& t) {
  at::mm(t, t, c10::ScalarType::Float);
};

/// Returns a @ b in float32 for operands of a lower precision: the GEMM writes float32 where this LibTorch
/// can (CUDA), else the product is rounded to the operands' dtype and widened, as autocast's backward does.
template <class T = at::Tensor>
at::Tensor mm_float(const T& a, const T& b) {
  if constexpr (mm_with_out_dtype<T>) {
    if (a.is_cuda()) return at::mm(a, b, c10::ScalarType::Float);
  }
  return at::mm(a, b).to(c10::ScalarType::Float);
}

/// The autograd Function of fabric::nn::Linear under autocast: input in the autocast dtype, float32
/// weight [out, in] and bias [out] (or undefined). Forward casts the weight and bias and runs one GEMM with
/// the bias in it (what at::linear runs under autocast, bit for bit); backward gives the input's gradient in
/// its dtype and the weight's and bias's in float32: the weight's from a GEMM that writes float32 where
/// LibTorch has one (CUDA, LibTorch 2.x), the bias's summed into float32. Against autocast's own backward
/// (a bfloat16 product and sum, then a cast kernel for each) that drops one pass over every gradient and
/// the rounding of the gradient to bfloat16. With `fused`, a CUDA bias gradient is summed by fabric's column-sum
/// kernels (fabric/detail/column_sum_kernel.hpp; deterministic), where they run.
struct MixedLinear : torch::autograd::Function<MixedLinear> {
  // NOTE: the bias is an optional (autograd's custom Functions take no undefined tensor as an input).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, bool fused) {
    const c10::ScalarType dtype = input.scalar_type();
    const bool has_bias = bias.has_value() && bias->defined();
    const at::Tensor w = weight.to(dtype);
    const at::Tensor x = input.reshape({-1, input.size(-1)});
    const at::Tensor y = has_bias ? at::addmm(bias->to(dtype), x, w.t()) : at::mm(x, w.t());
    ctx->save_for_backward({x, w});
    ctx->saved_data["input_sizes"] = input.sizes().vec();
    ctx->saved_data["bias"] = has_bias;
    ctx->saved_data["fused"] = fused;
    std::vector<std::int64_t> sizes = input.sizes().vec();
    sizes.back() = weight.size(0);
    return y.view(sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (at::GradMode::is_enabled()) {
      fabric::detail::raise(
          "fabric::nn::Linear: expected a backward without create_graph under autocast, found a double backward "
          "(its mixed-precision backward is not differentiable); switch it off for this layer with "
          "layer->mixed_backward(false), which runs at::linear's differentiable backward");
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor g = grads[0].reshape({-1, grads[0].size(-1)}).to(x.scalar_type());
    at::Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) grad_input = g.mm(w).view(ctx->saved_data["input_sizes"].toIntVector());
    if (ctx->needs_input_grad(1)) grad_weight = mm_float(g.t(), x);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = ctx->saved_data["fused"].toBool() && fabric::detail::column_sum_kernel_unavailable(g).empty()
                      ? fabric::detail::column_sum_float(g)
                      : g.sum({0}, /*keepdim=*/false, c10::ScalarType::Float);
    }
    return {grad_input, grad_weight, grad_bias, at::Tensor()};
  }
};

}  // namespace detail

/// A drop-in for `torch::nn::LinearImpl`: the same options, parameters (`weight` [out, in], `bias` [out]),
/// initialisation (so a seed gives the same weights) and state-dict keys, and a forward that calls
/// `at::linear`, which folds an input of any rank into one GEMM with the bias in it.
///
/// NOTE: LibTorch's `torch::nn::functional::linear` (and so `torch::nn::Linear`) fuses the bias only for
/// 2-D inputs; for a [B, T, C] input it runs the matmul and then `output += bias`, a second pass over the
/// output, and under autocast a mixed bfloat16 += float32 add. Python's `nn.Linear` calls `at::linear`.
///
/// Under autocast (bf16-mixed, 16-mixed: autocast on for the input's device, a float32 weight that requires
/// grad, in grad mode) the forward is the same GEMM, and the backward gives the float32 weight and bias their
/// gradients in float32 directly: the weight's from a GEMM that writes float32 (on CUDA with LibTorch 2.x;
/// elsewhere a product rounded as autocast rounds it), the bias's summed into float32 (autocast's sum rounds
/// to bfloat16 first: about 2^-8 of the gradient). On an H200 that removes GPT-2's cast kernels of the
/// weights' gradients (`ToCopyBackward0`). On CUDA the bias's gradient is summed by fabric's column-sum kernels
/// (NVRTC, deterministic, 16-byte loads: GPT-2 small's 48 sums in 0.42 ms a step on an H200, ATen's in 1.05)
/// unless `fused_kernels(false)`.
/// Its backward is not differentiable: `mixed_backward(false)` gives at::linear's backward for second-order
/// gradients (a double backward through it is a fabric::Error).
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
  at::Tensor forward(const at::Tensor& input) {
    if (mixed_backward_ && input.dim() > 0) {
      const c10::DeviceType device = input.device().type();
      if (fabric::detail::autocast_enabled(device) && weight.scalar_type() == c10::ScalarType::Float &&
          weight.requires_grad() && at::GradMode::is_enabled() && weight.device() == input.device()) {
        const c10::ScalarType dtype = fabric::detail::autocast_dtype(device);
        if ((dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half) &&
            (input.scalar_type() == c10::ScalarType::Float || input.scalar_type() == dtype)) {
          return detail::MixedLinear::apply(input.to(dtype), weight, c10::optional<at::Tensor>(bias), fused_);
        }
      }
    }
    return at::linear(input, weight, bias);
  }

  /// Whether the backward under autocast is the mixed-precision one above (the default) or at::linear's.
  bool mixed_backward() const noexcept { return mixed_backward_; }
  /// Chooses the backward under autocast: false gives at::linear's (differentiable, so second-order
  /// gradients work; the weight's gradient rounded to the autocast dtype, then cast).
  LinearImpl& mixed_backward(bool on) noexcept {
    mixed_backward_ = on;
    return *this;
  }

  /// Whether the mixed backward sums a CUDA bias gradient with fabric's kernels (the default) or ATen's sum.
  bool fused_kernels() const noexcept { return fused_; }
  /// Chooses fabric's column-sum kernels (true) or ATen's sum (false) for the mixed backward's bias gradient.
  LinearImpl& fused_kernels(bool on) noexcept {
    fused_ = on;
    return *this;
  }

  /// Returns a deep copy that is a fabric::nn::LinearImpl too (on `device` when given).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    auto copy = std::make_shared<LinearImpl>(options);
    fabric::detail::copy_layer_state(*this, *copy, device);
    copy->mixed_backward_ = mixed_backward_;
    copy->fused_ = fused_;
    return copy;
  }

  /// Prints `fabric::nn::Linear(in_features=.., out_features=.., bias=..)`.
  void pretty_print(std::ostream& stream) const override {
    stream << "fabric::nn::Linear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", bias=" << std::boolalpha << options.bias() << ")";
  }

 private:
  bool mixed_backward_ = true;
  bool fused_ = true;
};

/// The module holder of fabric::nn::LinearImpl, used as `torch::nn::Linear` is.
TORCH_MODULE(Linear);

}  // namespace fabric::nn
