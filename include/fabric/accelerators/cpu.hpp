#pragma once
// fabric::CPU: the accelerator policy for the host CPU.

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"

#include <c10/core/Device.h>

#include <algorithm>
#include <string_view>
#include <thread>

namespace fabric {

/// Runs on the host CPU; every process uses the one CPU device.
struct CPU {
  using category = accelerator_tag;
  static constexpr std::string_view name = "cpu";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;

  /// Returns true: a CPU is always there.
  static bool is_available() noexcept { return true; }
  /// Returns the number of hardware threads (processes are not limited by it, as in Lightning).
  static int device_count() noexcept { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }
  /// Checks the requested number of processes per node.
  static void check_devices(int devices) {
    if (devices < 1) {
      detail::raise("expected devices >= 1 for the CPU accelerator, found {}; pass the number of processes per node",
                    devices);
    }
  }
  /// Returns the device of a local rank.
  static c10::Device device(int /*local_rank*/) noexcept { return c10::Device(c10::DeviceType::CPU); }
  /// Prepares the device before anything is allocated on it.
  static void setup_device(const c10::Device& /*device*/) noexcept {}

  /// Checks the number of processes per node (before any process starts).
  void check(int devices) const { check_devices(devices); }
  /// Checks, and returns the CPU device (every local rank shares it).
  c10::Device select_device(int local_rank, int devices) const {
    check(devices);
    return device(local_rank);
  }
  /// Releases nothing: the CPU holds no cache.
  void teardown() noexcept {}
};

}  // namespace fabric
