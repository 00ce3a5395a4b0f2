#pragma once
// fabric::Auto: the accelerator policy that picks CUDA when a GPU is visible and the CPU otherwise,
// at run time (Lightning's accelerator="auto" without TPUs and MPS).

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/accelerators/cpu.hpp"
#include "fabric/accelerators/cuda.hpp"
#include "fabric/core/concepts.hpp"

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include <array>
#include <string_view>

namespace fabric {

/// Runs on CUDA when LibTorch has CUDA and a GPU is visible, otherwise on the CPU; the choice is
/// made when Fabric is constructed, so one binary serves both machines. The precision follows the
/// device: a precision that neither device supports is a compile error, one that the chosen device
/// cannot run fails at construction (FP16Mixed on the CPU of LibTorch 1.13 warns and runs as
/// BF16Mixed, as in Lightning). `options` apply when CUDA is chosen.
///
///     fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::BF16Mixed> fabric;
///     fabric.print("training on {}", fabric.device().str());
struct Auto {
  using category = accelerator_tag;
  static constexpr std::string_view name = "auto";
  /// The device types Auto may choose (precisions check each of them at compile time).
  static constexpr std::array<c10::DeviceType, 2> device_types = {c10::DeviceType::CUDA, c10::DeviceType::CPU};

  /// The CUDA settings, used when CUDA is chosen.
  CUDAOptions options{};

  /// Returns true: the CPU is always there to fall back to.
  static bool is_available() noexcept { return true; }
  /// Returns true when Auto chooses CUDA on this machine.
  static bool uses_cuda() { return CUDA::is_available(); }
  /// Returns the device type Auto chooses on this machine.
  static c10::DeviceType chosen_type() { return uses_cuda() ? c10::DeviceType::CUDA : c10::DeviceType::CPU; }
  /// Returns the number of devices of the chosen type (1 on the CPU, as Lightning's auto devices).
  static int device_count() { return uses_cuda() ? CUDA::device_count() : 1; }
  /// Checks the requested number of processes per node against the chosen accelerator.
  static void check_devices(int devices) { uses_cuda() ? CUDA::check_devices(devices) : CPU::check_devices(devices); }
  /// Returns the device of a local rank: GPU r with CUDA, the CPU otherwise.
  static c10::Device device(int local_rank) { return uses_cuda() ? CUDA::device(local_rank) : CPU::device(local_rank); }
  /// Makes the device current before anything is allocated on it.
  static void setup_device(const c10::Device& device) {
    device.is_cuda() ? CUDA::setup_device(device) : CPU::setup_device(device);
  }
  /// Checks the options and the number of devices per node for the chosen accelerator.
  void check(int devices) const {
    detail::check_cuda_options(options);
    uses_cuda() ? CUDA{options}.check(devices) : CPU::check_devices(devices);
  }
  /// Checks as check() does, picks the device of the local rank and prepares it (applying the CUDA
  /// options when CUDA is chosen); returns the device.
  c10::Device select_device(int local_rank, int devices) const {
    if (uses_cuda()) return CUDA{options}.select_device(local_rank, devices);
    check(devices);
    const c10::Device chosen = CPU::device(local_rank);
    CPU::setup_device(chosen);
    return chosen;
  }
  /// Releases cached GPU memory when CUDA was chosen (see CUDA::teardown).
  static void teardown() { CUDA::teardown(); }
};

}  // namespace fabric
