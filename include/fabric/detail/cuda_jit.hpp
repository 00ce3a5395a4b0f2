#pragma once
// Run-time compiled CUDA kernels (fabric::nn::cross_entropy's, fabric::nn::LayerNorm's, the column sums of
// fabric::nn::Linear's bias gradient): NVRTC compiles a kernel's source, after one shared prelude (the 16-bit
// conversions), to a CUBIN for the current device (CUDA 11.1 and later), the driver loads it, and the kernels
// launch through the driver API on the current stream (so a CUDA graph records them). A CPU-only LibTorch
// compiles none of this.
//
// NOTE: NVRTC and the driver are opened with dlopen, not through ATen's lazily loaded stub
// (at::globalContext().getNVRTC()): the PyTorch wheels do not ship its header (ATen/cuda/nvrtc_stub/
// ATenNVRTC.h; checked on the GPU machine's 2.11 wheel), and the struct it declares changes with the CUDA
// version. The entry points used here have the same C signatures in CUDA 11 to 13 and are typed by the
// toolkit's own nvrtc.h / cuda.h. libnvrtc is looked up as FABRIC_NVRTC_LIBRARY (an environment variable:
// a path), then libnvrtc.so.<CUDA major> (already loaded by LibTorch, or on the loader's path), libnvrtc.so
// and the toolkit's lib64; libcuda.so.1 is the driver's.
//
// The CUDA toolkit's headers (cuda.h, nvrtc.h) are needed to compile it; a CPU-only LibTorch (Debian's)
// has neither. Define FABRIC_CUDA_NVRTC=0 to leave it out on a CUDA build.
#ifndef FABRIC_CUDA_NVRTC
#if __has_include(<nvrtc.h>) && __has_include(<cuda.h>) && __has_include(<cuda_runtime_api.h>) && \
    __has_include(<c10/cuda/CUDAStream.h>) && __has_include(<dlfcn.h>)
#define FABRIC_CUDA_NVRTC 1
#else
#define FABRIC_CUDA_NVRTC 0
#endif
#endif

#if FABRIC_CUDA_NVRTC
#include "fabric/core/error.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nvrtc.h>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fabric::detail {

#if CUDA_VERSION >= 11010
#define FABRIC_CUDA_JIT 1

/// The NVRTC and driver entry points the kernel needs, opened once per process (dlopen), or why not.
struct CudaJitApi {
#define FABRIC_CUDA_JIT_MEMBER(name) decltype(&::name) name = nullptr;
// clang-format off
// NOTE: clang-format 14 reflows these lists differently on each run; kept one entry per line by hand.
#define FABRIC_CUDA_JIT_NVRTC(_) \
  _(nvrtcCreateProgram)          \
  _(nvrtcDestroyProgram)         \
  _(nvrtcCompileProgram)         \
  _(nvrtcGetProgramLogSize)      \
  _(nvrtcGetProgramLog)          \
  _(nvrtcGetErrorString)         \
  _(nvrtcGetCUBINSize)           \
  _(nvrtcGetCUBIN)
#define FABRIC_CUDA_JIT_DRIVER(_) \
  _(cuCtxGetCurrent)              \
  _(cuModuleLoadData)             \
  _(cuModuleGetFunction)          \
  _(cuLaunchKernel)               \
  _(cuGetErrorString)

  FABRIC_CUDA_JIT_NVRTC(FABRIC_CUDA_JIT_MEMBER)
  FABRIC_CUDA_JIT_DRIVER(FABRIC_CUDA_JIT_MEMBER)
  // clang-format on
  std::string error;
};

/// Opens libnvrtc and libcuda (never closed: the kernels live as long as the process).
inline const CudaJitApi& cuda_jit_api() {
  static const CudaJitApi api = [] {
    CudaJitApi out;
    std::vector<std::string> names;
    if (const char* path = std::getenv("FABRIC_NVRTC_LIBRARY"); path != nullptr && *path != '\0') names.push_back(path);
#if CUDA_VERSION >= 12000
    names.push_back("libnvrtc.so." + std::to_string(CUDA_VERSION / 1000));
#else
    names.push_back("libnvrtc.so." + std::to_string(CUDA_VERSION / 1000) + ".2");
#endif
    names.insert(names.end(), {"libnvrtc.so", "/usr/local/cuda/lib64/libnvrtc.so"});
    void* nvrtc = nullptr;
    for (const auto& name : names) {
      if ((nvrtc = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    }
    void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (nvrtc == nullptr || driver == nullptr) {
      out.error = nvrtc == nullptr ? "NVRTC not found (tried " + names.front() +
                                         ", libnvrtc.so and "
                                         "/usr/local/cuda/lib64; set FABRIC_NVRTC_LIBRARY to its path)"
                                   : "the CUDA driver library libcuda.so.1 not found";
      return out;
    }
#define FABRIC_CUDA_JIT_LOAD_NVRTC(name)                               \
  out.name = reinterpret_cast<decltype(&::name)>(dlsym(nvrtc, #name)); \
  if (out.name == nullptr) out.error = "NVRTC lacks " #name;
#define FABRIC_CUDA_JIT_LOAD_DRIVER(name)                               \
  out.name = reinterpret_cast<decltype(&::name)>(dlsym(driver, #name)); \
  if (out.name == nullptr) out.error = "the CUDA driver lacks " #name;
    FABRIC_CUDA_JIT_NVRTC(FABRIC_CUDA_JIT_LOAD_NVRTC)
    FABRIC_CUDA_JIT_DRIVER(FABRIC_CUDA_JIT_LOAD_DRIVER)
#undef FABRIC_CUDA_JIT_LOAD_NVRTC
#undef FABRIC_CUDA_JIT_LOAD_DRIVER
    return out;
  }();
  return api;
}
#undef FABRIC_CUDA_JIT_MEMBER
#undef FABRIC_CUDA_JIT_NVRTC
#undef FABRIC_CUDA_JIT_DRIVER

/// Makes the current device's primary context current on this thread, which the driver API needs and the
/// runtime binds only lazily: a thread whose first CUDA work is this kernel (autograd's device thread, when
/// the loss's backward is the first node it runs) has none, and cuLaunchKernel would fail with "invalid
/// device context". cudaFree(nullptr) binds it, as ATen's own NVRTC kernels do.
inline void bind_primary_context(const CudaJitApi& api) {
  CUcontext context = nullptr;
  api.cuCtxGetCurrent(&context);
  if (context == nullptr) (void)cudaFree(nullptr);
}

/// The source every kernel module starts with (compile_cuda_module prepends it). No header is included
/// (NVRTC has no CUDA include path here), so the 16-bit conversions are written out: bfloat16 is the top half
/// of a float32, rounded to nearest even as c10::BFloat16 rounds; float16 goes through PTX cvt. `Kind<K>` (K
/// as cuda_kind numbers dtypes) names a dtype's storage type `t`, its float32 `load` and rounding `store`,
/// and `vec`, the elements of a 16-byte load.
inline constexpr const char* cuda_jit_prelude = R"CUDA(
typedef unsigned short u16;
template <int K> struct Kind;
template <> struct Kind<0> {
  typedef float t;
  static const int vec = 4;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
};
template <> struct Kind<1> {
  typedef u16 t;
  static const int vec = 8;
  static __device__ __forceinline__ float load(u16 v) { return __uint_as_float(((unsigned)v) << 16); }
  static __device__ __forceinline__ u16 store(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
  }
};
template <> struct Kind<2> {
  typedef u16 t;
  static const int vec = 8;
  static __device__ __forceinline__ float load(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ u16 store(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};
)CUDA";

/// A dtype's number in the kernels' sources (Kind<K>): 0 float32, 1 bfloat16, 2 float16, -1 any other.
constexpr int cuda_kind(c10::ScalarType dtype) noexcept {
  return dtype == c10::ScalarType::Float      ? 0
         : dtype == c10::ScalarType::BFloat16 ? 1
         : dtype == c10::ScalarType::Half     ? 2
                                              : -1;
}

/// Compiles cuda_jit_prelude and `source` with NVRTC for the current device (a device guard is set), with `defines`
/// ("-DNAME=1" options), loads the CUBIN and looks up each named function into its CUfunction. Returns "" or what
/// failed (NVRTC's log included); the error is returned, not thrown, so that callers can fall back to ATen.
inline std::string compile_cuda_module(const char* source, const char* file, const std::vector<std::string>& defines,
                                       std::initializer_list<std::pair<const char*, CUfunction*>> functions) {
  const CudaJitApi& nvrtc = cuda_jit_api();
  if (!nvrtc.error.empty()) return nvrtc.error;
  bind_primary_context(nvrtc);
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return "cudaDeviceGetAttribute failed";
  }
  const std::string text = std::string(cuda_jit_prelude) + source;
  nvrtcProgram program = nullptr;
  if (nvrtc.nvrtcCreateProgram(&program, text.c_str(), file, 0, nullptr, nullptr) != NVRTC_SUCCESS) {
    return "nvrtcCreateProgram failed";
  }
  const std::string arch = "--gpu-architecture=sm_" + std::to_string(major) + std::to_string(minor);
  std::vector<const char*> options{arch.c_str()};
  for (const auto& define : defines) options.push_back(define.c_str());
  const nvrtcResult compiled = nvrtc.nvrtcCompileProgram(program, static_cast<int>(options.size()), options.data());
  if (compiled != NVRTC_SUCCESS) {
    std::size_t size = 0;
    nvrtc.nvrtcGetProgramLogSize(program, &size);
    std::string log(size, '\0');
    if (size > 0) nvrtc.nvrtcGetProgramLog(program, log.data());
    nvrtc.nvrtcDestroyProgram(&program);
    return std::string("NVRTC (") + arch + "): " + nvrtc.nvrtcGetErrorString(compiled) + ": " + log;
  }
  std::size_t size = 0;
  nvrtc.nvrtcGetCUBINSize(program, &size);
  std::vector<char> cubin(size);
  nvrtc.nvrtcGetCUBIN(program, cubin.data());
  nvrtc.nvrtcDestroyProgram(&program);
  // NOTE: the module is never unloaded: it lives as long as the process (its context does too), and unloading
  // it at static destruction could run after the driver shut down.
  CUmodule module = nullptr;
  CUresult loaded = nvrtc.cuModuleLoadData(&module, cubin.data());
  for (const auto& [name, function] : functions) {
    if (loaded == CUDA_SUCCESS) loaded = nvrtc.cuModuleGetFunction(function, module, name);
  }
  if (loaded != CUDA_SUCCESS) {
    for (const auto& named : functions) *named.second = nullptr;
    const char* text = nullptr;
    nvrtc.cuGetErrorString(loaded, &text);
    return std::string("loading the CUBIN (") + arch + "): " + (text != nullptr ? text : "unknown error");
  }
  return {};
}

/// The kernels `compile()` returns for `key` (a device index and dtype kinds, say), from a per-process cache
/// of each call site (the lambda's type): compiled on first use, under a lock, and kept with their error.
template <class Kernels, class Key, class Compile>
const Kernels& cached_cuda_kernels(const Key& key, Compile compile) {
  static std::mutex mutex;
  static std::map<Key, Kernels> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) found = cache.emplace(key, compile()).first;
  return found->second;
}

/// The number of multiprocessors of CUDA device `index` (asked once per device), at least 1.
inline int cuda_multiprocessors(int index) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = counts.find(index);
  if (found == counts.end()) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index) != cudaSuccess) sms = 1;
    found = counts.emplace(index, sms > 0 ? sms : 1).first;
  }
  return found->second;
}

/// Launches `function` on `stream` with `grid` x `grid_y` blocks of `block` x `block_y` threads and `shared`
/// bytes of dynamic shared memory (binding the primary context first); a failure is a fabric::Error naming
/// `who`.
inline void launch_cuda_kernel(const char* who, CUfunction function, unsigned grid, unsigned block, unsigned shared,
                               CUstream stream, void** args, unsigned block_y = 1, unsigned grid_y = 1) {
  const CudaJitApi& api = cuda_jit_api();
  bind_primary_context(api);
  const CUresult launched =
      api.cuLaunchKernel(function, grid, grid_y, 1, block, block_y, 1, shared, stream, args, nullptr);
  if (launched != CUDA_SUCCESS) {
    const char* text = nullptr;
    api.cuGetErrorString(launched, &text);
    raise("{}: expected the fused kernel to launch, found {}", who, text != nullptr ? text : "an unknown error");
  }
}

#else
#define FABRIC_CUDA_JIT 0
#endif

}  // namespace fabric::detail

#else
#define FABRIC_CUDA_JIT 0
#endif
