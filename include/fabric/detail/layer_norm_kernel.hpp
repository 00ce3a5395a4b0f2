#pragma once
// The fused LayerNorm kernels of fabric::nn::LayerNorm on CUDA, compiled at run time with NVRTC
// (fabric/detail/cuda_jit.hpp) once per device and pair of dtypes. Forward: a warp per row reads the row
// (float32, bfloat16 or float16) for its mean, again (from L1) for its variance, and a third time to write
// the normalised, scaled and shifted row in the output dtype (the autocast dtype where fabric::nn::LayerNorm
// is asked for it, so that no cast kernel follows), keeping the row's mean and 1/std in float32. Backward:
// a warp per row, two passes (four adjacent columns a lane at a time where rows are aligned to four
// elements), writes the input's gradient and adds the row's terms of the weight's and the
// bias's gradients to its warp's own float32 partial sums in shared memory (each lane always owns the same
// columns: no atomics, so the sums are deterministic); each block writes its partials, and the column-sum
// module's second kernel (fabric/detail/column_sum_kernel.hpp) sums them over blocks in a fixed order.

#include "fabric/detail/column_sum_kernel.hpp"
#include "fabric/detail/cuda_jit.hpp"

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#if FABRIC_CUDA_JIT
#include "fabric/core/error.hpp"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>
#endif

namespace fabric::detail {

/// The widest row (normalised elements) the fused kernels take: the backward keeps two float32 partial sums
/// per column and warp in shared memory (at most 48 KiB without opting in to more).
inline constexpr std::int64_t layer_norm_kernel_max_columns = 6144;

#if FABRIC_CUDA_JIT

/// The kernels' CUDA source, after cuda_jit_prelude. X_KIND and Y_KIND (set when compiling) are the input's
/// and the output's dtypes as cuda_kind numbers them (0 float32, 1 bfloat16, 2 float16); the output's
/// gradient has the output's dtype and the input's gradient the input's. Weight and bias are float32 or
/// absent (null).
inline constexpr const char* layer_norm_kernel_source = R"CUDA(
typedef Kind<X_KIND> XK;
typedef Kind<Y_KIND> YK;
typedef XK::t x_t;
typedef YK::t y_t;
__device__ __forceinline__ float load_x(x_t v) { return XK::load(v); }
__device__ __forceinline__ x_t store_x(float f) { return XK::store(f); }
__device__ __forceinline__ float load_y(y_t v) { return YK::load(v); }
__device__ __forceinline__ y_t store_y(float f) { return YK::store(f); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A warp per row, blockDim.x / 32 rows per block.
extern "C" __global__ void fabric_layer_norm_forward(const x_t* __restrict__ x, const float* __restrict__ w,
                                                     const float* __restrict__ b, y_t* __restrict__ y,
                                                     float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                     long long rows, long long cols, float eps) {
  const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const x_t* xr = x + row * cols;
  float s = 0.f;
  for (long long j = lane; j < cols; j += 32) s += load_x(xr[j]);
  const float mean = warp_sum(s) / (float)cols;
  float v = 0.f;
  for (long long j = lane; j < cols; j += 32) {
    const float d = load_x(xr[j]) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(warp_sum(v) / (float)cols + eps);
  y_t* yr = y + row * cols;
  for (long long j = lane; j < cols; j += 32) {
    float o = (load_x(xr[j]) - mean) * rstd;
    if (w != 0) o *= w[j];
    if (b != 0) o += b[j];
    yr[j] = store_y(o);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// V elements of T in one load or store (16 bytes for four float32).
template <class T, int V>
struct alignas(V * sizeof(T)) Lanes {
  T v[V];
};

// The backward's rows (see fabric_layer_norm_backward), V adjacent columns a lane at a time (V divides cols;
// for V > 1 every row and `mine` are aligned to V elements).
template <int V>
__device__ __forceinline__ void backward_rows(const y_t* __restrict__ g, const x_t* __restrict__ x,
                                              const float* __restrict__ w, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, x_t* __restrict__ dx,
                                              float* __restrict__ mine, long long rows, long long cols, int warps,
                                              int warp, int lane) {
  typedef Lanes<x_t, V> XV;
  typedef Lanes<y_t, V> YV;
  typedef Lanes<float, V> FV;
  const float inv = 1.f / (float)cols;
  const long long steps = cols / V;
  for (long long row = (long long)blockIdx.x * warps + warp; row < rows; row += (long long)gridDim.x * warps) {
    const XV* xr = reinterpret_cast<const XV*>(x + row * cols);
    const YV* gr = reinterpret_cast<const YV*>(g + row * cols);
    const float m = mean[row], r = rstd[row];
    float a = 0.f, c = 0.f;
#pragma unroll 2
    for (long long q = lane; q < steps; q += 32) {
      const XV xv = xr[q];
      const YV gv = gr[q];
      FV wv;
      if (w != 0) {
        wv = reinterpret_cast<const FV*>(w)[q];
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) wv.v[k] = 1.f;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float xh = (load_x(xv.v[k]) - m) * r;
        const float gw = load_y(gv.v[k]) * wv.v[k];
        a += gw;
        c += gw * xh;
      }
    }
    a = warp_sum(a) * inv;
    c = warp_sum(c) * inv;
#pragma unroll 2
    for (long long q = lane; q < steps; q += 32) {
      const XV xv = xr[q];
      const YV gv = gr[q];
      FV wv, dw, db;
      if (w != 0) {
        wv = reinterpret_cast<const FV*>(w)[q];
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) wv.v[k] = 1.f;
      }
      if (mine != 0) {
        dw = reinterpret_cast<const FV*>(mine)[q];
        db = reinterpret_cast<const FV*>(mine + cols)[q];
      }
      XV out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float xh = (load_x(xv.v[k]) - m) * r;
        const float gj = load_y(gv.v[k]);
        out.v[k] = store_x(r * (gj * wv.v[k] - a - xh * c));
        if (mine != 0) {
          dw.v[k] += gj * xh;
          db.v[k] += gj;
        }
      }
      if (dx != 0) reinterpret_cast<XV*>(dx + row * cols)[q] = out;
      if (mine != 0) {
        reinterpret_cast<FV*>(mine)[q] = dw;
        reinterpret_cast<FV*>(mine + cols)[q] = db;
      }
    }
  }
}

// Rows strided over the grid, a warp per row; shared memory: [warps][2][cols] float32 partial sums of
// g * xhat (the weight's gradient) and g (the bias's), each lane always the same columns. partial:
// [gridDim.x][2][cols]. `vectorized`: cols a multiple of 4 and g, x, w, dx aligned to four elements, so that
// a lane loads four adjacent columns at once (16 bytes of float32).
extern "C" __global__ void fabric_layer_norm_backward(const y_t* __restrict__ g, const x_t* __restrict__ x,
                                                      const float* __restrict__ w, const float* __restrict__ mean,
                                                      const float* __restrict__ rstd, x_t* __restrict__ dx,
                                                      float* __restrict__ partial, long long rows, long long cols,
                                                      int vectorized) {
  extern __shared__ float shared[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* mine = partial != 0 ? shared + (long long)warp * 2 * cols : 0;
  if (mine != 0) {
    for (long long j = lane; j < 2 * cols; j += 32) mine[j] = 0.f;
  }
  __syncwarp();  // the zeros before other lanes of the warp add to them
  if (vectorized) {
    backward_rows<4>(g, x, w, mean, rstd, dx, mine, rows, cols, warps, warp, lane);
  } else {
    backward_rows<1>(g, x, w, mean, rstd, dx, mine, rows, cols, warps, warp, lane);
  }
  if (partial == 0) return;
  __syncthreads();
  for (long long j = threadIdx.x; j < 2 * cols; j += blockDim.x) {
    float t = 0.f;
    for (int k = 0; k < warps; ++k) t += shared[(long long)k * 2 * cols + j];
    partial[(long long)blockIdx.x * 2 * cols + j] = t;
  }
}

)CUDA";

/// The compiled kernels for one device and pair of dtypes, or why there are none.
struct LayerNormKernels {
  CUfunction forward = nullptr;
  CUfunction backward = nullptr;
  std::string error;
};

/// The kernels for `device`, input dtype `x` and output dtype `y` from a per-process cache (compiled on
/// first use), or the reason there are none; the float32 column-sum kernels add the backward's partial sums.
inline const LayerNormKernels& layer_norm_kernels(c10::Device device, c10::ScalarType x, c10::ScalarType y) {
  const int xk = cuda_kind(x), yk = cuda_kind(y);
  const auto key = std::make_tuple(static_cast<int>(device.index()), xk, yk);
  return cached_cuda_kernels<LayerNormKernels>(key, [&] {
    LayerNormKernels kernels;
    if (xk < 0 || yk < 0) {
      kernels.error = std::string("no kernel for ") + c10::toString(x) + " input and " + c10::toString(y) + " output";
    } else {
      const c10::cuda::CUDAGuard guard(device);
      kernels.error = compile_cuda_module(
          layer_norm_kernel_source, "fabric_layer_norm.cu",
          {"-DX_KIND=" + std::to_string(xk), "-DY_KIND=" + std::to_string(yk)},
          {{"fabric_layer_norm_forward", &kernels.forward}, {"fabric_layer_norm_backward", &kernels.backward}});
      if (kernels.error.empty()) kernels.error = column_sum_kernels(device, c10::ScalarType::Float).error;
    }
    return kernels;
  });
}

/// Why the fused kernels cannot normalise `input` (any shape, `cols` trailing elements a row) into `output`
/// dtype with float32 (or no) weight and bias, or "" when they can.
inline std::string layer_norm_kernel_unavailable(const at::Tensor& input, c10::ScalarType output, std::int64_t cols,
                                                 const at::Tensor& weight, const at::Tensor& bias) {
  if (!input.is_cuda()) return "the input is not on a CUDA device";
  if (cols < 1 || cols > layer_norm_kernel_max_columns) {
    return "rows of " + std::to_string(cols) + " elements (the kernels take 1 to " +
           std::to_string(layer_norm_kernel_max_columns) + ")";
  }
  for (const at::Tensor* t : {&weight, &bias}) {
    if (t->defined() && (t->scalar_type() != c10::ScalarType::Float || t->device() != input.device())) {
      return "a weight or bias that is not float32 on the input's device";
    }
  }
  return layer_norm_kernels(input.device(), input.scalar_type(), output).error;
}

/// Normalises x (contiguous, rows of `cols`) into y (contiguous, `y`'s dtype), writing mean and rstd
/// (float32, one per row), on the current stream.
inline void launch_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd,
                                      std::int64_t cols, double eps) {
  const LayerNormKernels& kernels = layer_norm_kernels(x.device(), x.scalar_type(), y.scalar_type());
  if (kernels.forward == nullptr)
    raise("fabric::nn::LayerNorm: expected the fused CUDA kernels, found none: {}", kernels.error);
  const c10::cuda::CUDAGuard guard(x.device());
  long long rows = x.numel() / cols, columns = cols;
  if (rows == 0) return;
  const void* x_ptr = x.data_ptr();
  const void* w_ptr = weight.defined() ? weight.data_ptr() : nullptr;
  const void* b_ptr = bias.defined() ? bias.data_ptr() : nullptr;
  void* y_ptr = y.data_ptr();
  void* mean_ptr = mean.data_ptr();
  void* rstd_ptr = rstd.data_ptr();
  float epsilon = static_cast<float>(eps);
  void* args[] = {&x_ptr, &w_ptr, &b_ptr, &y_ptr, &mean_ptr, &rstd_ptr, &rows, &columns, &epsilon};
  constexpr long long warps = 4;
  const CUstream stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  launch_cuda_kernel("fabric::nn::LayerNorm", kernels.forward, static_cast<unsigned>((rows + warps - 1) / warps),
                     static_cast<unsigned>(32 * warps), 0, stream, args);
}

/// The gradients of the fused forward: dx (x's dtype; undefined: not computed) and, where `partial` is asked
/// for (`affine`), the weight's and the bias's gradients (float32 [cols] each) on the current stream.
inline std::pair<at::Tensor, at::Tensor> launch_layer_norm_backward(const at::Tensor& g, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& mean,
                                                                    const at::Tensor& rstd, const at::Tensor& dx,
                                                                    bool affine, std::int64_t cols) {
  const LayerNormKernels& kernels = layer_norm_kernels(x.device(), x.scalar_type(), g.scalar_type());
  if (kernels.backward == nullptr)
    raise("fabric::nn::LayerNorm: expected the fused CUDA kernels, found none: {}", kernels.error);
  const c10::cuda::CUDAGuard guard(x.device());
  long long rows = x.numel() / cols, columns = cols;
  const auto options = x.options().dtype(c10::ScalarType::Float);
  // Warps a block: as many as the shared partial sums leave room for, up to 8 (8 for GPT-2's 768 columns);
  // two blocks a multiprocessor at most (each block writes 2 x cols partial sums).
  const long long warps = std::clamp<long long>(static_cast<long long>(48 * 1024 / (8 * cols)), 1, 8);
  const long long blocks =
      std::clamp<long long>((rows + warps - 1) / warps, 1, 2LL * cuda_multiprocessors(x.device().index()));
  if (rows == 0) {
    if (!affine) return {};
    at::Tensor zeros = at::empty({2 * cols}, options).zero_();
    return {zeros.narrow(0, 0, cols), zeros.narrow(0, cols, cols)};
  }
  at::Tensor partial = affine ? at::empty({blocks, 2 * cols}, options) : at::Tensor();
  const void* g_ptr = g.data_ptr();
  const void* x_ptr = x.data_ptr();
  const void* w_ptr = weight.defined() ? weight.data_ptr() : nullptr;
  const void* mean_ptr = mean.data_ptr();
  const void* rstd_ptr = rstd.data_ptr();
  void* dx_ptr = dx.defined() ? dx.data_ptr() : nullptr;
  void* partial_ptr = affine ? partial.data_ptr() : nullptr;
  // Four columns a lane at a time where every row starts on four elements (g, x and dx contiguous).
  const auto aligned = [](const void* p, std::size_t element) {
    return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % (4 * element) == 0;
  };
  int vectorized = cols % 4 == 0 && aligned(g_ptr, g.element_size()) && aligned(x_ptr, x.element_size()) &&
                   aligned(w_ptr, 4) && aligned(dx_ptr, x.element_size());
  void* args[] = {&g_ptr, &x_ptr, &w_ptr, &mean_ptr, &rstd_ptr, &dx_ptr, &partial_ptr, &rows, &columns, &vectorized};
  const CUstream stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  launch_cuda_kernel("fabric::nn::LayerNorm", kernels.backward, static_cast<unsigned>(blocks),
                     static_cast<unsigned>(32 * warps), static_cast<unsigned>(affine ? warps * 8 * cols : 0), stream,
                     args);
  if (!affine) return {};
  at::Tensor sums = at::empty({2 * cols}, options);
  launch_sum_partials("fabric::nn::LayerNorm", partial, sums);
  return {sums.narrow(0, 0, cols), sums.narrow(0, cols, cols)};
}

inline constexpr bool layer_norm_kernel_compiled = true;

#else

inline constexpr bool layer_norm_kernel_compiled = false;

inline std::string layer_norm_kernel_unavailable(const at::Tensor& input, c10::ScalarType, std::int64_t,
                                                 const at::Tensor&, const at::Tensor&) {
  if (!input.is_cuda()) return "the input is not on a CUDA device";
  return "fabric was compiled without the CUDA toolkit's NVRTC headers (FABRIC_CUDA_NVRTC=0)";
}
inline void launch_layer_norm_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, std::int64_t, double) {}
inline std::pair<at::Tensor, at::Tensor> launch_layer_norm_backward(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&, bool,
                                                                    std::int64_t) {
  return {};
}

#endif

}  // namespace fabric::detail
