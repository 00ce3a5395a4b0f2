#pragma once
// fabric::nn::LayerNorm: torch::nn::LayerNorm whose CUDA forward and backward are fabric's fused kernels
// (fabric/detail/layer_norm_kernel.hpp): one pass to normalise, one to differentiate, the weight's and the
// bias's gradients summed in the same pass; under autocast it can write its output in the autocast dtype,
// so that the Linear after it casts nothing.

#include "fabric/core/error.hpp"
#include "fabric/detail/layer_copy.hpp"
#include "fabric/detail/layer_norm_kernel.hpp"
#include "fabric/precision/autocast.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/options/normalization.h>
#include <torch/nn/pimpl.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <ostream>
#include <utility>
#include <vector>

namespace fabric::nn {
namespace detail {

/// The autograd Function of fabric::nn::LayerNorm's fused path: input (CUDA, any shape whose last elements
/// make rows of `cols`), float32 weight and bias [cols] (or undefined), the output in `output` dtype.
struct FusedLayerNorm : torch::autograd::Function<FusedLayerNorm> {
  // NOTE: weight and bias are optionals (autograd's custom Functions take no undefined tensor as an input).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const c10::optional<at::Tensor>& weight_or_none,
                            const c10::optional<at::Tensor>& bias_or_none, std::int64_t cols, double eps,
                            std::int64_t output) {
    const at::Tensor weight = weight_or_none.value_or(at::Tensor()), bias = bias_or_none.value_or(at::Tensor());
    const at::Tensor x = input.contiguous();
    const auto float32 = x.options().dtype(c10::ScalarType::Float);
    const at::Tensor y = at::empty(x.sizes(), x.options().dtype(static_cast<c10::ScalarType>(output)));
    const std::int64_t rows = cols > 0 ? x.numel() / cols : 0;
    const at::Tensor mean = at::empty({rows}, float32), rstd = at::empty({rows}, float32);
    fabric::detail::launch_layer_norm_forward(x, weight, bias, y, mean, rstd, cols, eps);
    ctx->save_for_backward({x, weight, mean, rstd});
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["output"] = output;
    ctx->saved_data["bias"] = bias.defined();
    ctx->saved_data["bias_sizes"] = bias.defined() ? bias.sizes().vec() : std::vector<std::int64_t>{};
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (at::GradMode::is_enabled()) {
      fabric::detail::raise(
          "fabric::nn::LayerNorm: expected a backward without create_graph, found a double backward (the fused "
          "kernels' backward is not differentiable); switch them off for this layer with "
          "layer->fused_kernels(false), which runs at::layer_norm");
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const std::int64_t cols = ctx->saved_data["cols"].toInt();
    const at::Tensor g = grads[0].to(static_cast<c10::ScalarType>(ctx->saved_data["output"].toInt())).contiguous();
    // NOTE: needs_input_grad counts the tensors given (an absent weight or bias takes no index).
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const bool weight_grad = weight.defined() && ctx->needs_input_grad(1);
    const bool bias_grad = has_bias && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    const at::Tensor dx = ctx->needs_input_grad(0) ? at::empty_like(x) : at::Tensor();
    const bool affine = weight_grad || bias_grad;
    auto [dw, db] = fabric::detail::launch_layer_norm_backward(g, x, weight, saved[2], saved[3], dx, affine, cols);
    // The kernels sum over rows of `cols` elements; the parameters have normalized_shape.
    dw = weight_grad ? dw.view(weight.sizes()) : at::Tensor();
    db = bias_grad ? db.view(ctx->saved_data["bias_sizes"].toIntVector()) : at::Tensor();
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace detail

/// A drop-in for `torch::nn::LayerNormImpl`: the same options, parameters (`weight`, `bias`), initialisation
/// and state-dict keys. On CUDA, where fabric's kernels run (fabric compiled with the toolkit's NVRTC headers;
/// a float32, bfloat16 or float16 input; float32 or no weight and bias; rows of at most 6144 elements) it
/// normalises with them: the forward reads a row three times from one load (mean, variance, output), the
/// backward writes the input's gradient and sums the weight's and the bias's in the same pass. Elsewhere
/// (CPU, other dtypes) it is `torch::nn::LayerNorm`'s forward.
///
/// The output's dtype is `torch::nn::LayerNorm`'s: the input's, and float32 under autocast (LayerNorm runs
/// in float32 there) — unless `autocast_output(true)`: then under autocast the output is in the autocast
/// dtype, which is what a following Linear casts it to anyway (the values are those of the float32 output
/// rounded once), so no cast kernel runs forward or backward. Only where the output feeds a layer that
/// autocast runs in the lower dtype (a Linear, a matmul): a residual sum would get a rounded addend.
///
///     fabric::nn::LayerNorm ln(torch::nn::LayerNormOptions({768}));   // as torch::nn::LayerNorm
///     ln->autocast_output(true);                                       // its output feeds a Linear
///
/// The fused backward is not differentiable (a double backward is a fabric::Error); `fused_kernels(false)`
/// gives `at::layer_norm` for second-order gradients. It is a `torch::nn::LayerNormImpl`
/// (`module.as<torch::nn::LayerNorm>()` finds it), and `clone()` gives a fabric::nn::LayerNormImpl.
class LayerNormImpl : public torch::nn::LayerNormImpl {
 public:
  /// Creates the layer as `torch::nn::LayerNorm(normalized_shape)` does.
  explicit LayerNormImpl(std::vector<std::int64_t> normalized_shape)
      : LayerNormImpl(torch::nn::LayerNormOptions(std::move(normalized_shape))) {}
  /// Creates the layer as `torch::nn::LayerNorm(options)` does.
  explicit LayerNormImpl(const torch::nn::LayerNormOptions& options) : torch::nn::LayerNormImpl(options) {}

  /// Normalises the trailing `normalized_shape` elements of `input`.
  at::Tensor forward(const at::Tensor& input) {
    if (fused_ && input.is_cuda()) {
      const std::vector<std::int64_t>& shape = options.normalized_shape();
      const auto dims = static_cast<std::int64_t>(shape.size());
      bool matches = input.dim() >= dims;
      std::int64_t cols = 1;
      for (std::int64_t i = 0; matches && i < dims; ++i) {
        matches = input.size(input.dim() - dims + i) == shape[static_cast<std::size_t>(i)];
        cols *= shape[static_cast<std::size_t>(i)];
      }
      const bool autocast = fabric::detail::autocast_enabled(c10::DeviceType::CUDA);
      const c10::ScalarType output = !autocast          ? input.scalar_type()
                                     : autocast_output_ ? fabric::detail::autocast_dtype(c10::DeviceType::CUDA)
                                                        : c10::ScalarType::Float;
      if (matches && fabric::detail::layer_norm_kernel_unavailable(input, output, cols, weight, bias).empty()) {
        return detail::FusedLayerNorm::apply(input, c10::optional<at::Tensor>(weight), c10::optional<at::Tensor>(bias),
                                             cols, options.eps(), static_cast<std::int64_t>(output));
      }
    }
    return torch::nn::LayerNormImpl::forward(input);
  }

  /// Whether CUDA inputs go through fabric's kernels (the default) or `at::layer_norm`.
  bool fused_kernels() const noexcept { return fused_; }
  /// Chooses fabric's kernels (true) or `at::layer_norm` (false: differentiable twice) for CUDA inputs.
  LayerNormImpl& fused_kernels(bool on) noexcept {
    fused_ = on;
    return *this;
  }
  /// Whether the output under autocast is in the autocast dtype (fused path only) rather than float32.
  bool autocast_output() const noexcept { return autocast_output_; }
  /// Chooses the autocast dtype (true) or float32 (false, the default, as torch::nn::LayerNorm) for the output
  /// under autocast.
  LayerNormImpl& autocast_output(bool on) noexcept {
    autocast_output_ = on;
    return *this;
  }

  /// Returns a deep copy that is a fabric::nn::LayerNormImpl too (on `device` when given).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    auto copy = std::make_shared<LayerNormImpl>(options);
    fabric::detail::copy_layer_state(*this, *copy, device);
    copy->fused_ = fused_;
    copy->autocast_output_ = autocast_output_;
    return copy;
  }

  /// Prints `fabric::nn::LayerNorm([768], eps=1e-05, elementwise_affine=true)`.
  void pretty_print(std::ostream& stream) const override {
    stream << std::boolalpha << "fabric::nn::LayerNorm(" << c10::IntArrayRef(options.normalized_shape())
           << ", eps=" << options.eps() << ", elementwise_affine=" << options.elementwise_affine() << ")";
  }

 private:
  bool fused_ = true;
  bool autocast_output_ = false;
};

/// The module holder of fabric::nn::LayerNormImpl, used as `torch::nn::LayerNorm` is.
TORCH_MODULE(LayerNorm);

}  // namespace fabric::nn
