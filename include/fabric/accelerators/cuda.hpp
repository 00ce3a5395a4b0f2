#pragma once
// fabric::CUDA: the accelerator policy for NVIDIA GPUs, one device per process.

#include "fabric/concepts.hpp"
#include "fabric/error.hpp"

#include <c10/core/Device.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/cuda.h>

#include <string_view>

namespace fabric {

/// Runs on a CUDA device: local rank r uses device r. Built against a CPU-only LibTorch it still
/// compiles, and a Fabric using it fails at construction with a clear error.
struct CUDA {
  using category = accelerator_tag;
  static constexpr std::string_view name = "cuda";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CUDA;

  /// Returns true when LibTorch was built with CUDA and a device is visible.
  static bool is_available() { return torch::cuda::is_available(); }
  /// Returns the number of visible devices.
  static int device_count() { return static_cast<int>(torch::cuda::device_count()); }
  /// Checks the requested number of devices per node against the visible ones.
  static void check_devices(int devices) {
    if (devices < 1 || devices > device_count()) {
      detail::raise(
          "expected between 1 and {} CUDA devices per node (the visible ones), found devices = {}; lower "
          "devices or check CUDA_VISIBLE_DEVICES",
          device_count(), devices);
    }
  }
  /// Returns the device of a local rank.
  static c10::Device device(int local_rank) {
    return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(local_rank));
  }
  /// Makes the device current before anything is allocated on it.
  static void setup_device(const c10::Device& device) {
    c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).setDevice(device);
  }
};

}  // namespace fabric
