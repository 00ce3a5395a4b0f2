#pragma once
// The one place that compares LibTorch versions: every difference between LibTorch 1.13 and 2.x that
// fabric depends on is named here once, and the adapters (autocast, c10d, the optimizer step) test
// these names instead of version numbers.

#include <torch/version.h>

/// True when the LibTorch being compiled against is at least major.minor.
#define FABRIC_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

// Device-generic autocast functions (at::autocast::is_autocast_enabled(device), ...): 2.4.
#define FABRIC_TORCH_GENERIC_AUTOCAST FABRIC_TORCH_AT_LEAST(2, 4)
// c10d wraps each backend (Gloo, NCCL) in a ProcessGroup; in 1.13 a backend is the ProcessGroup: 2.0.
#define FABRIC_TORCH_PROCESS_GROUP_BACKENDS FABRIC_TORCH_AT_LEAST(2, 0)
// The fused Adam/AdamW kernels (at::_fused_adam_, at::_fused_adamw_): 2.0, on the CPU from 2.4.
#if FABRIC_TORCH_AT_LEAST(2, 0) && __has_include(<ATen/ops/_fused_adam.h>) && __has_include(<ATen/ops/_fused_adamw.h>)
#define FABRIC_TORCH_FUSED_ADAM 1
#else
#define FABRIC_TORCH_FUSED_ADAM 0
#endif
#define FABRIC_TORCH_FUSED_ADAM_CPU FABRIC_TORCH_AT_LEAST(2, 4)
// The multi-tensor copy at::_foreach_copy_ (converting dtypes in its CUDA fast path): 2.1.
#if FABRIC_TORCH_AT_LEAST(2, 1) && __has_include(<ATen/ops/_foreach_copy.h>)
#define FABRIC_TORCH_FOREACH_COPY 1
#else
#define FABRIC_TORCH_FOREACH_COPY 0
#endif
// A common caching-allocator base with emptyCache() for every device: 2.9.
#if FABRIC_TORCH_AT_LEAST(2, 9) && __has_include(<c10/core/CachingDeviceAllocator.h>)
#define FABRIC_TORCH_DEVICE_ALLOCATOR 1
#else
#define FABRIC_TORCH_DEVICE_ALLOCATOR 0
#endif

namespace fabric::detail {

/// Gloo's collectives refuse bfloat16 in LibTorch 1.13 ("Invalid scalar type", checked); in 2.x Gloo itself
/// answers (not checked here).
inline constexpr bool torch_gloo_refuses_bfloat16 = !FABRIC_TORCH_AT_LEAST(2, 0);

/// Autocast to float16 on the CPU (1.13 autocasts only to bfloat16 there).
inline constexpr bool torch_cpu_autocast_half = FABRIC_TORCH_AT_LEAST(2, 0);
/// float16 matrix products on the CPU, which 16-true needs there.
inline constexpr bool torch_cpu_half_matmul = FABRIC_TORCH_AT_LEAST(2, 1);
/// The gradient scaler's kernels (_amp_foreach_non_finite_check_and_unscale_, _amp_update_scale_) on
/// the CPU; CUDA has them in every supported version.
inline constexpr bool torch_cpu_amp_kernels = FABRIC_TORCH_AT_LEAST(2, 0);
/// Optimizer::zero_grad() sets gradients to undefined tensors by default (to zeros before).
inline constexpr bool torch_zero_grad_sets_none = FABRIC_TORCH_AT_LEAST(2, 0);
/// Gloo all-reduces bfloat16 tensors.
inline constexpr bool torch_gloo_bfloat16 = FABRIC_TORCH_AT_LEAST(2, 0);

}  // namespace fabric::detail
