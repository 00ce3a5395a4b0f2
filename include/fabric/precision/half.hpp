#pragma once
// fabric::TruePrecision: the precisions that convert the module's weights to a dtype, and the half ones,
// BF16True ("bf16-true") and FP16True ("16-true"); FP64 is in precision/double.hpp.

#include "fabric/core/error.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/precision/precision.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <torch/version.h>

#include <string_view>
#include <type_traits>
#include <utility>

namespace fabric {
namespace detail {

/// Casts a module's floating-point parameters and buffers (its children's too) to a dtype in place, as
/// PyTorch's `module.double()`: integer, bool and complex tensors keep their dtype, and each parameter
/// stays the same tensor (its data is swapped), so an optimizer built on it before still steps it.
template <class M>
void cast_floating_state(M& module, c10::ScalarType dtype) {
  // NOTE: LibTorch's Module::to(dtype) casts every tensor, turning BatchNorm's int64
  // num_batches_tracked into a float and complex buffers into reals; Python's casts floating ones only.
  c10::NoGradGuard no_grad;
  const auto cast = [dtype](const at::Tensor& t) {
    if (t.defined() && t.is_floating_point() && t.scalar_type() != dtype) t.set_data(t.to(dtype));
  };
  for (const auto& parameter : module.parameters(/*recurse=*/true)) cast(parameter);
  for (const auto& buffer : module.buffers(/*recurse=*/true)) cast(buffer);
}

}  // namespace detail

/// Weights, compute and the default dtype of a dtype ("64-true", "bf16-true", "16-true"): the
/// module is converted (no float32 master copy, no scaler), floating inputs are cast to the dtype
/// and floating outputs back to float32; `init_module`/`init_tensor` create tensors in the dtype.
template <c10::ScalarType Dtype>
struct TruePrecision : PrecisionBase {
  static constexpr std::string_view name = Dtype == c10::ScalarType::Double     ? "64-true"
                                           : Dtype == c10::ScalarType::BFloat16 ? "bf16-true"
                                                                                : "16-true";
  /// Says that the precision works in the wrapper's forward (it casts the inputs to the dtype).
  static constexpr bool needs_wrapped_forward = true;

  /// Settings: whether floating outputs of the wrapped forward come back as float32 (Lightning's
  /// `convert_output`; the default) or stay in the dtype (`convert_output = false`).
  struct Options {
    bool convert_output = true;
  };

  TruePrecision() = default;
  /// Creates the precision with its settings.
  explicit TruePrecision(Options options) noexcept : options_(options) {}

  /// Returns the dtype of parameters and of what `init_module`/`init_tensor` create.
  static constexpr c10::ScalarType param_dtype() noexcept { return Dtype; }
  /// Fails at construction where the device cannot compute in the dtype: float16 matmuls on the CPU
  /// need LibTorch 2.1.
  static void setup_device(const c10::Device& device) {
    if (Dtype == c10::ScalarType::Half && device.is_cpu() && !detail::torch_cpu_half_matmul) {
      detail::raise(
          "16-true cannot run on the CPU with LibTorch {} (no float16 matmul there); use bf16-true, or a "
          "CUDA device",
          TORCH_VERSION);
    }
  }

  /// Converts the module's floating-point parameters and buffers to the dtype, as Lightning's
  /// `module.double()`: integer (BatchNorm's `num_batches_tracked`), bool and complex tensors are left as
  /// they are, and parameters keep their identity and `requires_grad`.
  template <class M>
  void convert_module(M& module) {
    detail::cast_floating_state(module, Dtype);
  }
  /// Casts floating inputs of the wrapped forward to the dtype.
  template <class T>
  std::remove_cvref_t<T> convert_input(T&& x) {
    return detail::cast_floating(std::forward<T>(x), Dtype);
  }
  /// Casts floating outputs of the wrapped forward back to float32 (unless `Options::convert_output` is false).
  template <class T>
  std::remove_cvref_t<T> convert_output(T&& x) {
    if (!options_.convert_output) return std::remove_cvref_t<T>(std::forward<T>(x));
    return detail::cast_floating(std::forward<T>(x), c10::ScalarType::Float);
  }
  /// Says whether floating outputs of the wrapped forward come back as float32.
  bool converts_output() const noexcept { return options_.convert_output; }
  /// Makes the dtype the default while forward (or `Fabric::autocast`) runs.
  DefaultDtypeGuard forward_context() const { return DefaultDtypeGuard(Dtype); }

 private:
  Options options_{};
};

/// bfloat16 weights and compute, no master copy ("bf16-true").
using BF16True = TruePrecision<c10::ScalarType::BFloat16>;
/// float16 weights and compute, no master copy and no scaler ("16-true").
using FP16True = TruePrecision<c10::ScalarType::Half>;

}  // namespace fabric
