#pragma once
// Column sums on CUDA: a matrix g [rows, cols] (float32, bfloat16 or float16, contiguous) summed over its
// rows into float32 [cols], the bias gradient of a Linear (fabric::nn::Linear's mixed backward). Compiled at
// run time with NVRTC (fabric/detail/cuda_jit.hpp) once per device and dtype. Two kernels, no atomics, so
// the sums are the same bit for bit on every run on the same device: the first gives each block a tile of
// columns and a chunk of rows and writes the chunk's float32 sums; the second (which fabric::nn::LayerNorm's
// backward uses for its own partial sums too) adds the chunks in a fixed order.
//
// NOTE: on an H200, ATen's `g.sum(0, dtype=float32)` of GPT-2's gradients ([8192, 768 ... 3072] bfloat16)
// reads at about a third of the memory's bandwidth (0.95 ms a step for 48 sums, bench/results/2026-12-02-h200/
// 20a5cb3); here each warp reads 512 contiguous bytes of a row at a time (16 bytes a lane).

#include "fabric/detail/cuda_jit.hpp"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#if FABRIC_CUDA_JIT
#include "fabric/core/error.hpp"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <utility>
#endif

namespace fabric::detail {

#if FABRIC_CUDA_JIT

/// The kernels' CUDA source, after cuda_jit_prelude. T_KIND (set when compiling): the summed matrix's dtype
/// as cuda_kind numbers it.
inline constexpr const char* column_sum_kernel_source = R"CUDA(
typedef Kind<T_KIND> K;
typedef K::t storage_t;
#define VEC K::vec
struct alignas(16) Pack { storage_t v[VEC]; };

// Block 32 x 8 threads: blockIdx.x a tile of 32 * VEC columns, blockIdx.y the rows [y * chunk, (y + 1) *
// chunk). Thread (x, y) sums rows y, y + 8, ... of the chunk for VEC columns in float32: VEC adjacent ones
// (a 16-byte load) when `vectorized` (g 16-byte aligned, cols a multiple of VEC), else columns x, x + 32,
// ... of the tile. The eight row lanes are then added in order: partial [gridDim.y][cols].
extern "C" __global__ void __launch_bounds__(256)
    fabric_column_sum(const storage_t* __restrict__ g, float* __restrict__ partial, long long rows, long long cols,
                      long long chunk, int vectorized) {
  __shared__ float sums[8][32 * VEC];
  const long long first = (long long)blockIdx.y * chunk;
  const long long last = first + chunk < rows ? first + chunk : rows;
  const long long tile = (long long)blockIdx.x * 32 * VEC;
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  if (vectorized) {
    const long long c = tile + (long long)threadIdx.x * VEC;
    if (c < cols) {
#pragma unroll 4
      for (long long r = first + threadIdx.y; r < last; r += 8) {
        const Pack p = *reinterpret_cast<const Pack*>(g + r * cols + c);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += K::load(p.v[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sums[threadIdx.y][threadIdx.x * VEC + k] = acc[k];
  } else {
    for (long long r = first + threadIdx.y; r < last; r += 8) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const long long c = tile + k * 32 + threadIdx.x;
        if (c < cols) acc[k] += K::load(g[r * cols + c]);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sums[threadIdx.y][k * 32 + threadIdx.x] = acc[k];
  }
  __syncthreads();
  for (int j = threadIdx.y * 32 + threadIdx.x; j < 32 * VEC; j += 256) {
    const long long c = tile + j;
    if (c < cols) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += sums[i][j];
      partial[(long long)blockIdx.y * cols + c] = s;
    }
  }
}

// Sums partial [blocks][n] (float32) over blocks into out [n], in a fixed order: a block of 32 x 8 threads
// per 32 columns, each thread a strided eighth of the blocks, then the eight in order.
extern "C" __global__ void fabric_sum_partials(const float* __restrict__ partial, float* __restrict__ out,
                                               long long blocks, long long n) {
  __shared__ float sums[8][33];
  const long long j = (long long)blockIdx.x * 32 + threadIdx.x;
  float t = 0.f;
  if (j < n) {
    for (long long k = threadIdx.y; k < blocks; k += 8) t += partial[k * n + j];
  }
  sums[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    float s = 0.f;
    for (int k = 0; k < 8; ++k) s += sums[k][threadIdx.x];
    out[j] = s;
  }
}
)CUDA";

/// The compiled kernels for one device and dtype, or why there are none.
struct ColumnSumKernels {
  CUfunction sum = nullptr;
  CUfunction partials = nullptr;
  std::string error;
};

/// The kernels for `device` and `dtype` from a per-process cache (compiled on first use), or the reason
/// there are none.
inline const ColumnSumKernels& column_sum_kernels(c10::Device device, c10::ScalarType dtype) {
  const int kind = cuda_kind(dtype);
  return cached_cuda_kernels<ColumnSumKernels>(std::make_pair(static_cast<int>(device.index()), kind), [&] {
    ColumnSumKernels kernels;
    if (kind < 0) {
      kernels.error = std::string("no kernel for ") + c10::toString(dtype);
    } else {
      const c10::cuda::CUDAGuard guard(device);
      kernels.error =
          compile_cuda_module(column_sum_kernel_source, "fabric_column_sum.cu", {"-DT_KIND=" + std::to_string(kind)},
                              {{"fabric_column_sum", &kernels.sum}, {"fabric_sum_partials", &kernels.partials}});
    }
    return kernels;
  });
}

/// Sums `partial` (float32 [blocks, n], contiguous, on the current device) over its rows into `out`
/// (float32 [n]) in a fixed order, on the current stream: the second stage of the column sum and of
/// fabric::nn::LayerNorm's backward.
inline void launch_sum_partials(const char* who, const at::Tensor& partial, const at::Tensor& out) {
  const ColumnSumKernels& kernels = column_sum_kernels(partial.device(), c10::ScalarType::Float);
  if (kernels.partials == nullptr) raise("{}: expected the fused CUDA kernels, found none: {}", who, kernels.error);
  const void* in = partial.data_ptr();
  void* sums = out.data_ptr();
  long long blocks = partial.size(0), n = partial.size(1);
  void* args[] = {&in, &sums, &blocks, &n};
  const CUstream stream = c10::cuda::getCurrentCUDAStream(partial.device().index()).stream();
  launch_cuda_kernel(who, kernels.partials, static_cast<unsigned>((n + 31) / 32), 32, 0, stream, args, /*block_y=*/8);
}

/// Why the column-sum kernels cannot sum `g`, or "" when they can: a contiguous CUDA matrix of float32,
/// bfloat16 or float16.
inline std::string column_sum_kernel_unavailable(const at::Tensor& g) {
  if (!g.is_cuda()) return "the tensor is not on a CUDA device";
  if (g.dim() != 2 || !g.is_contiguous()) return "the tensor is not a contiguous matrix";
  if (const std::string& why = column_sum_kernels(g.device(), g.scalar_type()).error; !why.empty()) return why;
  return column_sum_kernels(g.device(), c10::ScalarType::Float).error;
}

/// Returns g [rows, cols] (contiguous, CUDA, float32 / bfloat16 / float16) summed over its rows in float32
/// ([cols], zeros for no rows), on the current stream; deterministic on a given device.
inline at::Tensor column_sum_float(const at::Tensor& g) {
  const ColumnSumKernels& kernels = column_sum_kernels(g.device(), g.scalar_type());
  if (kernels.sum == nullptr)
    raise("fabric::detail::column_sum_float: expected the fused CUDA kernels, found none: {}", kernels.error);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto options = g.options().dtype(c10::ScalarType::Float);
  long long rows = g.size(0), cols = g.size(1);
  if (rows == 0 || cols == 0) return at::zeros({cols}, options);
  const long long vec = g.scalar_type() == c10::ScalarType::Float ? 4 : 8;
  int vectorized = reinterpret_cast<std::uintptr_t>(g.data_ptr()) % 16 == 0 && cols % vec == 0;
  // Chunks of rows: enough blocks to fill every multiprocessor eight times over (256 threads each), but at
  // least 64 rows a chunk (8 a thread), so that the partial sums stay a small fraction of g.
  const long long tiles = (cols + 32 * vec - 1) / (32 * vec);
  const long long wanted = 8LL * cuda_multiprocessors(g.device().index());
  const long long most = (rows + 63) / 64;
  const long long chunks0 = std::clamp<long long>((wanted + tiles - 1) / tiles, 1, most);
  long long chunk = (rows + chunks0 - 1) / chunks0;
  const long long chunks = (rows + chunk - 1) / chunk;
  const CUstream stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  at::Tensor out = at::empty({cols}, options);
  at::Tensor partial = chunks > 1 ? at::empty({chunks, cols}, options) : out;
  const void* g_ptr = g.data_ptr();
  void* partial_ptr = partial.data_ptr();
  void* args[] = {&g_ptr, &partial_ptr, &rows, &cols, &chunk, &vectorized};
  launch_cuda_kernel("fabric::detail::column_sum_float", kernels.sum, static_cast<unsigned>(tiles), 32, 0, stream, args,
                     /*block_y=*/8, /*grid_y=*/static_cast<unsigned>(chunks));
  if (chunks > 1) launch_sum_partials("fabric::detail::column_sum_float", partial, out);
  return out;
}

inline constexpr bool column_sum_kernel_compiled = true;

#else

inline constexpr bool column_sum_kernel_compiled = false;

inline std::string column_sum_kernel_unavailable(const at::Tensor& g) {
  if (!g.is_cuda()) return "the tensor is not on a CUDA device";
  return "fabric was compiled without the CUDA toolkit's NVRTC headers (FABRIC_CUDA_NVRTC=0)";
}
inline at::Tensor column_sum_float(const at::Tensor&) { return {}; }

#endif

}  // namespace fabric::detail
