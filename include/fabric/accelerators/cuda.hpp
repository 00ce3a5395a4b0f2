#pragma once
// fabric::CUDA: the accelerator policy for NVIDIA GPUs, one device per process, and its settings
// fabric::CUDAOptions.

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/detail/torch_version.hpp"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

// NOTE: LibTorch 2.9 gave every device allocator a common base with emptyCache(); before it, emptying
// the CUDA cache needs c10_cuda, which a CPU-only LibTorch does not have, so teardown() does nothing there.
#if FABRIC_TORCH_DEVICE_ALLOCATOR
#include <c10/core/CachingDeviceAllocator.h>
#endif

namespace fabric {

/// Settings of the CUDA accelerator (also used by fabric::Auto when it picks CUDA).
///
///     fabric::CUDA cuda{{.device_ids = {1, 3}, .float32_matmul_precision = "high"}};
struct CUDAOptions {
  /// The GPUs of this machine to use, as Lightning's `devices=[1, 3]`: local rank r uses device_ids[r].
  /// Empty: local rank r uses GPU r.
  std::vector<int> device_ids{};
  /// `torch.set_float32_matmul_precision`: "highest" (float32), "high" (TF32) or "medium" (bfloat16);
  /// unset keeps LibTorch's setting.
  std::optional<std::string> float32_matmul_precision{};
  /// `torch.backends.cudnn.benchmark`: let cuDNN time its algorithms per input shape; unset keeps
  /// LibTorch's setting.
  std::optional<bool> cudnn_benchmark{};
};

namespace detail {

/// Throws unless the options are well formed (checked before any device is touched).
inline void check_cuda_options(const CUDAOptions& options) {
  if (const auto& p = options.float32_matmul_precision; p && *p != "highest" && *p != "high" && *p != "medium") {
    raise("expected float32_matmul_precision \"highest\", \"high\" or \"medium\", found \"{}\"", *p);
  }
  const auto& ids = options.device_ids;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) raise("expected device_ids >= 0, found {} at position {}", ids[i], i);
    if (std::find(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(i), ids[i]) !=
        ids.begin() + static_cast<std::ptrdiff_t>(i)) {
      raise("expected distinct device_ids, found {} twice; list each GPU once", ids[i]);
    }
  }
}

}  // namespace detail

/// Runs on a CUDA device, one per process: local rank r uses GPU r, or `options.device_ids[r]`.
/// Built against a CPU-only LibTorch it still compiles, and a Fabric using it fails at construction
/// with an error that says so.
///
///     fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric(
///         {}, fabric::CUDA{{.float32_matmul_precision = "high"}}, fabric::SingleDevice{}, fabric::BF16Mixed{});
struct CUDA {
  using category = accelerator_tag;
  static constexpr std::string_view name = "cuda";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CUDA;

  /// The device list and global settings applied by select_device.
  CUDAOptions options{};

  /// Returns true when LibTorch was built with CUDA and a device is visible.
  static bool is_available() { return torch::cuda::is_available(); }
  /// Returns the number of visible devices.
  static int device_count() { return static_cast<int>(torch::cuda::device_count()); }
  /// Throws an error that tells a CPU-only LibTorch from a machine without a visible GPU.
  static void check_available() {
    if (is_available()) return;
    if (!at::detail::getCUDAHooks().hasCUDART()) {
      detail::raise(
          "the accelerator \"cuda\" is not available: it needs a LibTorch built with CUDA, found a CPU-only LibTorch "
          "{} (or a program that does not link libtorch_cuda); install a CUDA build of LibTorch, or use fabric::CPU "
          "or fabric::Auto",
          TORCH_VERSION);
    }
    detail::raise(
        "the accelerator \"cuda\" is not available: no CUDA device is visible; check the driver and "
        "CUDA_VISIBLE_DEVICES, or use fabric::CPU or fabric::Auto");
  }
  /// Checks the requested number of devices per node against the visible ones.
  static void check_devices(int devices) {
    if (devices < 1 || devices > device_count()) {
      detail::raise(
          "expected between 1 and {} CUDA devices per node (the visible ones), found devices = {}; lower "
          "devices or check CUDA_VISIBLE_DEVICES",
          device_count(), devices);
    }
  }
  /// Returns the device of a local rank (GPU r; select_device also honours options.device_ids).
  static c10::Device device(int local_rank) {
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(local_rank));
  }
  /// Makes the device current before anything is allocated on it.
  static void setup_device(const c10::Device& device) {
    c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).setDevice(device);
  }

  /// Checks the options, the availability and the number of devices per node (before any process
  /// starts).
  void check(int devices) const {
    detail::check_cuda_options(options);
    check_available();
    const auto& ids = options.device_ids;
    if (ids.empty()) {
      check_devices(devices);
    } else {
      if (static_cast<std::size_t>(devices) != ids.size()) {
        detail::raise(
            "expected devices = {} (the length of device_ids), found devices = {}; pass one process per listed GPU",
            ids.size(), devices);
      }
      const int count = device_count();
      for (int id : ids) {
        if (id >= count) {
          detail::raise("expected device_ids below {} (the visible CUDA devices), found {}; check CUDA_VISIBLE_DEVICES",
                        count, id);
        }
      }
    }
  }

  /// Checks as check() does, picks the device of the local rank (GPU r, or device_ids[r]), makes it
  /// current and applies the global settings; returns the device.
  c10::Device select_device(int local_rank, int devices) const {
    check(devices);
    const auto& ids = options.device_ids;
    if (local_rank < 0 || local_rank >= devices) {
      detail::raise("expected 0 <= local_rank < devices = {}, found local_rank = {}", devices, local_rank);
    }
    const c10::Device chosen =
        ids.empty() ? device(local_rank)
                    : c10::Device(c10::DeviceType::CUDA,
                                  static_cast<c10::DeviceIndex>(ids[static_cast<std::size_t>(local_rank)]));
    setup_device(chosen);
    if (options.float32_matmul_precision)
      at::globalContext().setFloat32MatmulPrecision(*options.float32_matmul_precision);
    if (options.cudnn_benchmark) at::globalContext().setBenchmarkCuDNN(*options.cudnn_benchmark);
    return chosen;
  }

  /// Releases the cached, unused GPU memory of this process (LibTorch 2.9 and later; nothing to do
  /// before, or without CUDA).
  static void teardown() {
#if FABRIC_TORCH_DEVICE_ALLOCATOR
    if (!is_available()) return;
    if (auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(c10::DeviceType::CUDA))) {
      allocator->emptyCache();
    }
#endif
  }
};

}  // namespace fabric
