#pragma once
// The fused cross-entropy kernel of fabric::nn::cross_entropy on CUDA: one thread block per row reads the
// row's logits (bfloat16, float16 or float32) once for an online max / sum of exponentials in float32, writes
// the row's loss, and reads the row again (mostly from L2) to write the gradient of the logits in their own
// dtype: two reads and one write of the logits, no float32 tensor of them. It is compiled at run time with
// NVRTC (fabric/detail/cuda_jit.hpp), once per device and dtype, and launched on the current stream.

#include "fabric/detail/cuda_jit.hpp"

#include <ATen/core/Tensor.h>

#include <string>

#if FABRIC_CUDA_JIT
#include "fabric/core/error.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#endif

namespace fabric::detail {

#if FABRIC_CUDA_JIT

/// The kernel's CUDA source, after cuda_jit_prelude. T_KIND (set when compiling): the logits' dtype as
/// cuda_kind numbers it (0 float32, 1 bfloat16, 2 float16).
inline constexpr const char* cross_entropy_kernel_source = R"CUDA(
typedef Kind<T_KIND> K;
typedef K::t storage_t;
#define VEC K::vec
__device__ __forceinline__ float to_float(storage_t x) { return K::load(x); }
__device__ __forceinline__ storage_t from_float(float f) { return K::store(f); }

struct alignas(16) Pack { storage_t v[VEC]; };

#define NEG_INF (-__int_as_float(0x7f800000))

// Merges the running (max, sum of exp(x - max)) pair (om, os) into (m, s).
__device__ __forceinline__ void merge(float& m, float& s, float om, float os) {
  const float nm = fmaxf(m, om);
  if (nm == NEG_INF) return;
  s = s * expf(m - nm) + os * expf(om - nm);
  m = nm;
}

__device__ __forceinline__ void warp_reduce(float& m, float& s, float& sx) {
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, o);
    const float os = __shfl_xor_sync(0xffffffffu, s, o);
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    merge(m, s, om, os);
  }
}

// One block per row. logits and grad may be the same memory (in place): each element is read by the thread
// that writes it, and the target's logit is read before the first barrier.
extern "C" __global__ void __launch_bounds__(1024)
    fabric_cross_entropy(const storage_t* logits, long long row_stride, storage_t* grad, long long grad_stride,
                         const long long* __restrict__ targets, float* __restrict__ losses,
                         const float* __restrict__ count, long long classes, long long ignore_index,
                         float smoothing, int mean, int write_grad, int vectorized) {
  __shared__ float shared_m[32], shared_s[32], shared_sx[32];
  const long long row = blockIdx.x;
  const storage_t* x = logits + row * row_stride;
  const long long t = targets[row];
  const bool ignored = t == ignore_index;
  const bool bad = !ignored && (t < 0 || t >= classes);
  float xt = 0.f;
  if (threadIdx.x == 0 && !ignored && !bad) xt = to_float(x[t]);

  float m = NEG_INF, s = 0.f, sx = 0.f;
  const long long packs = vectorized ? classes / VEC : 0;
  for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack pk = reinterpret_cast<const Pack*>(x)[p];
    float f[VEC];
    float pm = NEG_INF;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      f[k] = to_float(pk.v[k]);
      pm = fmaxf(pm, f[k]);
      sx += f[k];
    }
    const float nm = fmaxf(m, pm);
    if (nm != NEG_INF) {
      float acc = s * expf(m - nm);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc += expf(f[k] - nm);
      s = acc;
      m = nm;
    }
  }
  for (long long j = packs * VEC + threadIdx.x; j < classes; j += blockDim.x) {
    const float f = to_float(x[j]);
    sx += f;
    const float nm = fmaxf(m, f);
    if (nm != NEG_INF) {
      s = s * expf(m - nm) + expf(f - nm);
      m = nm;
    }
  }

  warp_reduce(m, s, sx);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
    shared_sx[warp] = sx;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? shared_m[lane] : NEG_INF;
    s = lane < warps ? shared_s[lane] : 0.f;
    sx = lane < warps ? shared_sx[lane] : 0.f;
    warp_reduce(m, s, sx);
    if (lane == 0) {
      shared_m[0] = m;
      shared_s[0] = s;
      shared_sx[0] = sx;
    }
  }
  __syncthreads();
  const float lse = shared_m[0] + logf(shared_s[0]);
  const float nan = __int_as_float(0x7fc00000);
  if (threadIdx.x == 0) {
    float loss = 0.f;
    if (bad) {
      loss = nan;
    } else if (!ignored) {
      loss = lse - xt;
      if (smoothing > 0.f) loss = (1.f - smoothing) * loss + smoothing * (lse - shared_sx[0] / (float)classes);
    }
    losses[row] = loss;
  }
  if (!write_grad) return;

  // The gradient of the row's loss: (softmax - (1 - e) onehot(t) - e / C) times 1 / count (mean) or 1; 0 for
  // an ignored row, NaN for a target out of range.
  const float scale = bad ? nan : ignored ? 0.f : mean ? 1.f / count[0] : 1.f;
  const float off = smoothing / (float)classes, on = 1.f - smoothing;
  storage_t* g = grad + row * grad_stride;
  for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack pk = reinterpret_cast<const Pack*>(x)[p];
    Pack out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const long long j = p * VEC + k;
      out.v[k] = from_float((expf(to_float(pk.v[k]) - lse) - off - (j == t ? on : 0.f)) * scale);
    }
    reinterpret_cast<Pack*>(g)[p] = out;
  }
  for (long long j = packs * VEC + threadIdx.x; j < classes; j += blockDim.x) {
    g[j] = from_float((expf(to_float(x[j]) - lse) - off - (j == t ? on : 0.f)) * scale);
  }
}
// The backward's one pass: the gradient written in forward times the incoming gradient (s[0], or s[row] for
// reduction none), computed in float32 and rounded once. One block per row.
extern "C" __global__ void fabric_cross_entropy_scale(storage_t* grad, long long grad_stride, long long classes,
                                                      const float* __restrict__ s, int per_row, int vectorized) {
  const long long row = blockIdx.x;
  const float k = s[per_row ? row : 0];
  storage_t* g = grad + row * grad_stride;
  const long long packs = vectorized ? classes / VEC : 0;
  for (long long p = threadIdx.x; p < packs; p += blockDim.x) {
    Pack pk = reinterpret_cast<Pack*>(g)[p];
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = from_float(to_float(pk.v[j]) * k);
    reinterpret_cast<Pack*>(g)[p] = pk;
  }
  for (long long j = packs * VEC + threadIdx.x; j < classes; j += blockDim.x) g[j] = from_float(to_float(g[j]) * k);
}
)CUDA";

/// A compiled kernel for one device and dtype, or why there is none.
struct CrossEntropyKernel {
  CUfunction function = nullptr;
  CUfunction scale = nullptr;
  std::string error;
};

/// Compiles the kernel for the current device (a device guard is set) and `kind` (0 float32, 1 bfloat16, 2
/// float16); the error is recorded, not thrown, so that the automatic choice falls back to ATen.
inline CrossEntropyKernel compile_cross_entropy_kernel(int kind) {
  CrossEntropyKernel out;
  out.error =
      compile_cuda_module(cross_entropy_kernel_source, "fabric_cross_entropy.cu", {"-DT_KIND=" + std::to_string(kind)},
                          {{"fabric_cross_entropy", &out.function}, {"fabric_cross_entropy_scale", &out.scale}});
  return out;
}

/// The kernel for `device` and `dtype` from a per-process cache (compiled on first use), or the reason there
/// is none ("" and a function when there is).
inline const CrossEntropyKernel& cross_entropy_kernel(c10::Device device, c10::ScalarType dtype) {
  const int kind = cuda_kind(dtype);
  return cached_cuda_kernels<CrossEntropyKernel>(std::make_pair(static_cast<int>(device.index()), kind), [&] {
    CrossEntropyKernel kernel;
    if (kind < 0) {
      kernel.error = std::string("no kernel for ") + c10::toString(dtype) + " logits";
    } else {
      const c10::cuda::CUDAGuard guard(device);
      kernel = compile_cross_entropy_kernel(kind);
    }
    return kernel;
  });
}

/// Why the fused kernel cannot run for these logits, or "" when it can.
inline std::string cross_entropy_kernel_unavailable(const at::Tensor& logits) {
  if (!logits.is_cuda()) return "the logits are not on a CUDA device";
  return cross_entropy_kernel(logits.device(), logits.scalar_type()).error;
}

/// Runs the kernel on the current stream: losses [N] (float32, 0 for ignored rows) and, where `grad` is
/// defined (same shape and dtype as the logits, possibly the logits themselves), the gradient of the loss
/// (mean: divided by *count). logits and grad have rows of stride 1; targets are int64, contiguous.
inline void launch_cross_entropy_kernel(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& targets,
                                        const at::Tensor& losses, const at::Tensor& count, std::int64_t ignore_index,
                                        double smoothing, bool mean) {
  const CrossEntropyKernel& kernel = cross_entropy_kernel(logits.device(), logits.scalar_type());
  if (kernel.function == nullptr) {
    raise(
        "fabric::nn::cross_entropy: expected the fused CUDA kernel, found none: {}; pass "
        "{{.kernel = fabric::nn::LossKernel::aten}}",
        kernel.error);
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const std::int64_t n = logits.size(0);
  if (n == 0) return;
  const void* logits_ptr = logits.data_ptr();
  void* grad_ptr = grad.defined() ? grad.data_ptr() : nullptr;
  const void* targets_ptr = targets.data_ptr();
  void* losses_ptr = losses.data_ptr();
  const void* count_ptr = count.data_ptr();
  long long row_stride = logits.stride(0), grad_stride = grad.defined() ? grad.stride(0) : 0;
  long long classes = logits.size(1), ignore = ignore_index;
  float e = static_cast<float>(smoothing);
  int is_mean = mean ? 1 : 0, write_grad = grad.defined() ? 1 : 0;
  const std::int64_t vec = logits.scalar_type() == at::kFloat ? 4 : 8;
  const auto aligned = [vec](const void* p, long long stride) {
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && stride % vec == 0;
  };
  int vectorized = aligned(logits_ptr, row_stride) && (grad_ptr == nullptr || aligned(grad_ptr, grad_stride));
  void* args[] = {&logits_ptr, &row_stride, &grad_ptr, &grad_stride, &targets_ptr, &losses_ptr, &count_ptr,
                  &classes,    &ignore,     &e,        &is_mean,     &write_grad,  &vectorized};
  // A block per row: up to 1024 threads, fewer (a multiple of 32) for rows too short to give each one a pack.
  const std::int64_t packs = (classes + vec - 1) / vec;
  const unsigned threads = static_cast<unsigned>(std::clamp<std::int64_t>((packs + 31) / 32 * 32, 32, 1024));
  const CUstream stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  launch_cuda_kernel("fabric::nn::cross_entropy", kernel.function, static_cast<unsigned>(n), threads, 0, stream, args);
}

/// Multiplies the gradient the kernel wrote (rows of stride 1) by `by` (float32: one element, or one per row
/// when `per_row`), in place, on the current stream.
inline void launch_cross_entropy_scale(const at::Tensor& grad, const at::Tensor& by, bool per_row) {
  const CrossEntropyKernel& kernel = cross_entropy_kernel(grad.device(), grad.scalar_type());
  if (kernel.scale == nullptr)
    raise("fabric::nn::cross_entropy: expected the fused CUDA kernel, found none: {}", kernel.error);
  const c10::cuda::CUDAGuard guard(grad.device());
  if (grad.size(0) == 0) return;
  void* grad_ptr = grad.data_ptr();
  const void* by_ptr = by.data_ptr();
  long long stride = grad.stride(0), classes = grad.size(1);
  int rows = per_row ? 1 : 0;
  const std::int64_t vec = grad.scalar_type() == at::kFloat ? 4 : 8;
  int vectorized = reinterpret_cast<std::uintptr_t>(grad_ptr) % 16 == 0 && stride % vec == 0;
  void* args[] = {&grad_ptr, &stride, &classes, &by_ptr, &rows, &vectorized};
  const std::int64_t packs = (classes + vec - 1) / vec;
  const unsigned threads = static_cast<unsigned>(std::clamp<std::int64_t>((packs + 31) / 32 * 32, 32, 512));
  const CUstream stream = c10::cuda::getCurrentCUDAStream(grad.device().index()).stream();
  launch_cuda_kernel("fabric::nn::cross_entropy", kernel.scale, static_cast<unsigned>(grad.size(0)), threads, 0, stream,
                     args);
}

inline constexpr bool cross_entropy_kernel_compiled = true;

#else

inline constexpr bool cross_entropy_kernel_compiled = false;

inline std::string cross_entropy_kernel_unavailable(const at::Tensor& logits) {
  if (!logits.is_cuda()) return "the logits are not on a CUDA device";
  return "fabric was compiled without the CUDA toolkit's NVRTC headers (FABRIC_CUDA_NVRTC=0)";
}

inline void launch_cross_entropy_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, std::int64_t, double, bool) {}
inline void launch_cross_entropy_scale(const at::Tensor&, const at::Tensor&, bool) {}

#endif

}  // namespace fabric::detail
