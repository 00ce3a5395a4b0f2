#pragma once
// Throughput and FLOPs, a port of lightning.fabric.utilities.throughput: Throughput (rolling batches,
// samples, items and FLOPs per second, and MFU), ThroughputMonitor (the same, logged through a Fabric on
// global rank zero), get_available_flops (a peak table per GPU model and dtype), measure_flops (the FLOPs
// of a forward, or of a forward and backward, counted by LibTorch's profiler) and transformer_flops.

#include "fabric/core/error.hpp"
#include "fabric/loggers/logger.hpp"
#include "fabric/precision/precision.hpp"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#if __has_include(<dlfcn.h>)
#include <dlfcn.h>
#define FABRIC_HAS_DLOPEN 1
#else
#define FABRIC_HAS_DLOPEN 0
#endif

#include <algorithm>
#include <array>
#include <cctype>
#include <concepts>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

// ---- the peak table -------------------------------------------------------------------------------

/// Peak dense FLOP/s of one device in each dtype (0: the chip has no such peak), Lightning's
/// `_CUDA_FLOPS`: "tfloat32" is float32 matmuls run as TF32, "int4" has no ScalarType.
struct ChipFlops {
  std::string_view chip;
  double float64 = 0, float32 = 0, tfloat32 = 0, bfloat16 = 0, float16 = 0, int8 = 0, int4 = 0;
};

/// Lightning's `_CUDA_FLOPS` (dense, without 2:4 sparsity), keyed by the chip names get_cuda_chip returns.
/// The H200 SXM has the H100 SXM's tensor cores and clocks: NVIDIA's H200 datasheet lists the same
/// figures (fabric keys it "h200"; Lightning's keys "h200 sxm1"/"h200 nvl1" match no real device name).
inline constexpr std::array<ChipFlops, 31> cuda_flops{{
    // Hopper. H200: https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446
    {"h200", 3.4e13, 6.7e13, 4.945e14, 9.895e14, 9.895e14, 1.979e15, 0},
    {"h200 nvl", 3.0e13, 6.0e13, 4.2e14, 8.4e14, 8.4e14, 1.68e15, 0},
    // H100: https://resources.nvidia.com/en-us-gpu-resources/h100-datasheet-24306
    {"h100 nvl", 3.0e13, 6.0e13, 4.175e14, 8.355e14, 8.355e14, 1.6705e15, 0},
    {"h100 sxm", 3.4e13, 6.7e13, 4.945e14, 9.895e14, 9.895e14, 1.979e15, 0},
    {"h100 pcie", 2.56e13, 5.12e13, 3.78e14, 7.56e14, 7.56e14, 1.513e15, 0},
    // Ada: https://images.nvidia.com/aem-dam/Solutions/Data-Center/l4/nvidia-ada-gpu-architecture-whitepaper-v2.1.pdf
    {"rtx 4090", 0, 8.26e13, 8.26e13, 8.26e13, 8.26e13, 6.606e14, 1.3212e15},
    {"rtx 4080", 0, 4.87e13, 4.87e13, 4.87e13, 4.87e13, 3.899e14, 7.798e14},
    {"rtx 4080 super", 0, 5.22e13, 5.22e13, 5.22e13, 5.22e13, 4.176e14, 8.352e14},
    {"l4", 0, 3.03e13, 6.0e13, 1.21e14, 1.21e14, 2.42e14, 4.84e14},
    {"l40", 0, 9.05e13, 9.05e13, 1.81e14, 1.81e14, 3.62e14, 7.24e14},
    // Ampere. A100 (SXM and PCIe alike):
    // https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    {"a100", 9.7e12, 1.95e13, 1.56e14, 3.12e14, 3.12e14, 6.24e14, 0},
    {"a6000", 0, 3.87e13, 7.74e13, 3.87e13, 3.87e13, 3.097e14, 6.193e14},
    // A40: https://images.nvidia.com/content/Solutions/data-center/a40/nvidia-a40-datasheet.pdf
    {"a40", 0, 3.74e13, 7.48e13, 1.497e14, 1.497e14, 2.993e14, 5.987e14},
    // A10G: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf
    {"a10g", 0, 3.12e13, 6.25e13, 1.25e14, 1.25e14, 2.5e14, 5.0e14},
    {"rtx 3090 ti", 0, 4.0e13, 4.0e13, 4.0e13, 4.0e13, 3.2e14, 6.4e14},
    {"rtx 3090", 0, 3.56e13, 3.56e13, 3.56e13, 3.56e13, 2.84e14, 5.68e14},
    {"rtx 3080 ti", 0, 3.41e13, 3.41e13, 3.41e13, 3.41e13, 2.728e14, 5.466e14},
    // GA102: https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf
    {"rtx 3080", 0, 2.98e13, 2.98e13, 2.98e13, 2.98e13, 2.38e14, 4.76e14},
    {"rtx 3070", 0, 2.03e13, 2.03e13, 2.03e13, 2.03e13, 1.626e14, 3.252e14},
    // Turing. T4:
    // https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf
    {"t4", 0, 8.1e12, 0, 0, 6.5e13, 1.3e14, 2.6e14},
    // https://www.nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-literature/quadro-rtx-5000-data-sheet-us-nvidia-704120-r4-web.pdf
    {"quadro rtx 5000", 0, 1.12e13, 0, 0, 8.92e13, 0, 0},
    {"rtx 2080 super", 0, 1.12e13, 0, 0, 2.23e13, 1.784e14, 3.568e14},
    {"rtx 2080 ti", 0, 1.42e13, 0, 0, 2.85e13, 2.277e14, 4.554e14},
    {"rtx 2080", 0, 1.06e13, 0, 0, 2.12e13, 1.696e14, 3.391e14},
    // GA102 whitepaper (above)
    {"rtx 2070 super", 0, 9.1e12, 0, 0, 1.81e13, 1.45e14, 2.9e14},
    {"titan rtx", 0, 1.63e13, 0, 0, 3.26e13, 2.61e14, 5.22e14},
    // Volta: https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf
    {"v100 sxm", 7.8e12, 1.57e13, 0, 0, 1.25e14, 0, 0},
    {"v100 pcie", 7.0e12, 1.4e13, 0, 0, 1.12e14, 0, 0},
    {"v100s pcie", 8.2e12, 1.64e13, 0, 0, 1.3e14, 0, 0},
    // Lightning's spellings of the H200 (kept so that its keys still resolve).
    {"h200 sxm1", 3.4e13, 6.7e13, 4.945e14, 9.895e14, 9.895e14, 1.979e15, 0},
    {"h200 nvl1", 3.0e13, 6.0e13, 4.2e14, 8.4e14, 8.4e14, 1.68e15, 0},
}};

namespace detail {

/// Reports a warning through c10's handler (printed to stderr by default; tests capture it).
inline void throughput_warn(bool enabled, const std::string& message) {
  if (enabled) TORCH_WARN("fabric: ", message);
}

/// Lower-cases ASCII.
inline std::string lower(std::string_view text) {
  std::string out(text);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

/// Returns the words of text split at single spaces (Python's str.split(" ")).
inline std::vector<std::string> split_spaces(const std::string& text) {
  std::vector<std::string> words;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == ' ') {
      words.push_back(text.substr(start, i - start));
      start = i + 1;
    }
  }
  return words;
}

/// Returns torch's name of a dtype ("torch.bfloat16").
inline std::string torch_dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Double:
      return "torch.float64";
    case c10::ScalarType::Float:
      return "torch.float32";
    case c10::ScalarType::BFloat16:
      return "torch.bfloat16";
    case c10::ScalarType::Half:
      return "torch.float16";
    case c10::ScalarType::Char:
      return "torch.int8";
    default:
      return std::string("torch.") + lower(c10::toString(dtype));
  }
}

/// The name and compute capability of a CUDA device, as the driver reports them.
struct CudaDeviceInfo {
  std::string name;
  int major = 0;
  int minor = 0;
};

/// Reads a CUDA device's name and compute capability from the driver (libcuda.so.1, opened with dlopen),
/// or returns nothing where there is no driver or no such device. NOTE: LibTorch's C++ API has no device
/// name (torch.cuda.get_device_name is Python over cudaGetDeviceProperties, and at::cuda's properties
/// need the CUDA headers), so this works the same in a CPU-only build, on 1.13 and on 2.x.
inline std::optional<CudaDeviceInfo> cuda_device_info(int index) {
#if FABRIC_HAS_DLOPEN
  static void* const handle = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (handle == nullptr || index < 0) return std::nullopt;
  using Init = int (*)(unsigned);
  using Get = int (*)(int*, int);
  using Name = int (*)(char*, int, int);
  using Attribute = int (*)(int*, int, int);
  const auto init = reinterpret_cast<Init>(dlsym(handle, "cuInit"));
  const auto get = reinterpret_cast<Get>(dlsym(handle, "cuDeviceGet"));
  const auto name = reinterpret_cast<Name>(dlsym(handle, "cuDeviceGetName"));
  const auto attribute = reinterpret_cast<Attribute>(dlsym(handle, "cuDeviceGetAttribute"));
  if (!init || !get || !name || !attribute || init(0) != 0) return std::nullopt;
  int device = 0;
  if (get(&device, index) != 0) return std::nullopt;
  std::array<char, 256> buffer{};
  if (name(buffer.data(), static_cast<int>(buffer.size()), device) != 0) return std::nullopt;
  CudaDeviceInfo info{.name = buffer.data()};
  constexpr int major_attribute = 75, minor_attribute = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_*
  if (attribute(&info.major, major_attribute, device) != 0 || attribute(&info.minor, minor_attribute, device) != 0) {
    return std::nullopt;
  }
  return info;
#else
  (void)index;
  return std::nullopt;
#endif
}

/// True when float32 matmuls may run as TF32 (torch.get_float32_matmul_precision() != "highest").
inline bool float32_matmul_allows_tf32() {
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

/// Returns the index of a CUDA device, the current one where it names none.
inline int cuda_index(const c10::Device& device) {
  if (device.has_index()) return device.index();
  if (c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA)) {
    return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice().index();
  }
  return 0;
}

std::optional<double> available_flops(std::string_view device_name, c10::ScalarType dtype, bool tf32, bool warn);

}  // namespace detail

/// Returns the key of `cuda_flops` for a CUDA device name as torch.cuda.get_device_name gives it
/// ("NVIDIA H100 80GB HBM3" → "h100 sxm"), Lightning's parsing, or nothing for an unknown chip.
inline std::optional<std::string> get_cuda_chip(std::string_view device_name) {
  std::string chip = detail::lower(device_name);
  const auto has = [&chip](std::string_view part) { return chip.find(part) != std::string::npos; };
  if (has("h200")) {
    if (has("sxm1")) return "h200 sxm1";
    if (has("nvl1")) return "h200 nvl1";
    return has("nvl") ? "h200 nvl" : "h200";
  }
  if (has("h100")) {
    if (has("hbm3")) return "h100 sxm";
    if (has("nvl")) return "h100 nvl";
    if (has("pcie") || has("hbm2e")) return "h100 pcie";
    return chip;
  }
  if (has("l40s")) return "l40s";
  if (has("l4")) return has("tesla") || has("l40") ? "l40" : "l4";
  if (has("geforce rtx")) {
    const auto words = detail::split_spaces(chip);
    if (words.size() < 4) return std::nullopt;
    const std::string extra = has("super") ? " super" : has("ti") ? " ti" : "";
    return "rtx " + words[3] + extra;
  }
  for (std::string_view part : {"a6000", "a100", "a40", "a10g", "t4", "quadro rtx 5000", "titan rtx"}) {
    if (has(part)) return std::string(part);
  }
  if (has("v100-sxm")) return "v100 sxm";
  if (has("v100-pcie")) return "v100 pcie";
  if (has("v100s-pcie")) return "v100s pcie";
  return std::nullopt;
}

/// Returns the name of a CUDA device as the driver reports it ("NVIDIA H200"), or nothing for another
/// device type or without a driver.
inline std::optional<std::string> cuda_device_name(const c10::Device& device) {
  if (!device.is_cuda()) return std::nullopt;
  auto info = detail::cuda_device_info(detail::cuda_index(device));
  if (!info) return std::nullopt;
  return std::move(info->name);
}

/// Returns the peak FLOP/s of one device of the named CUDA model in the dtype (float32 as TF32 where
/// tf32), or nothing with a warning where the model or the dtype is not in `cuda_flops`.
template <class Name>
requires std::convertible_to<const Name&, std::string_view> std::optional<double> get_available_flops(
    const Name& device_name, c10::ScalarType dtype, bool tf32 = false) {
  return detail::available_flops(device_name, dtype, tf32, true);
}

/// Returns the theoretical peak FLOP/s of the device in the dtype, an optimistic limit that only thick
/// matmuls approach: for CUDA from the device name (read from the driver) and `cuda_flops`, float32
/// counted as TF32 on Ampere and later unless the float32 matmul precision is "highest", as Lightning
/// does; nothing (with a warning) for an unknown GPU or dtype; nothing, silently, for the CPU.
///
///     auto peak = fabric::get_available_flops(fabric.device(), c10::ScalarType::BFloat16);
inline std::optional<double> get_available_flops(const c10::Device& device, c10::ScalarType dtype) {
  if (!device.is_cuda()) return std::nullopt;
  const int index = detail::cuda_index(device);
  const auto info = detail::cuda_device_info(index);
  if (!info) {
    detail::throughput_warn(true, fmt::format("FLOPs not found for CUDA device {}: the driver (libcuda.so.1) did "
                                              "not report its name; pass available_flops yourself",
                                              index));
    return std::nullopt;
  }
  const bool tf32 = info->major >= 8 && detail::float32_matmul_allows_tf32();
  return get_available_flops(info->name, dtype, tf32);
}

namespace detail {

inline std::optional<double> available_flops(std::string_view device_name, c10::ScalarType dtype, bool tf32,
                                             bool warn) {
  const auto chip = get_cuda_chip(device_name);
  if (!chip) {
    throughput_warn(warn, fmt::format("FLOPs not found for '{}'", device_name));
    return std::nullopt;
  }
  const auto row =
      std::find_if(cuda_flops.begin(), cuda_flops.end(), [&](const ChipFlops& c) { return c.chip == *chip; });
  if (row == cuda_flops.end()) {
    throughput_warn(warn, fmt::format("FLOPs not found for '{}', chip is '{}'", device_name, *chip));
    return std::nullopt;
  }
  double peak = 0;
  std::string dtype_name = torch_dtype_name(dtype);
  switch (dtype) {
    case c10::ScalarType::Double:
      peak = row->float64;
      break;
    case c10::ScalarType::Float:
      peak = tf32 ? row->tfloat32 : row->float32;
      if (tf32) dtype_name = "tfloat32";
      break;
    case c10::ScalarType::BFloat16:
      peak = row->bfloat16;
      break;
    case c10::ScalarType::Half:
      peak = row->float16;
      break;
    case c10::ScalarType::Char:
      peak = row->int8;
      break;
    default:
      break;
  }
  if (peak <= 0) {
    throughput_warn(warn, fmt::format("'{}' does not support {}", device_name, dtype_name));
    return std::nullopt;
  }
  return peak;
}

/// A fixed-size window of values that must increase with every append (Lightning's _MonotonicWindow).
template <class T>
class MonotonicWindow {
 public:
  MonotonicWindow(std::string_view what, std::size_t maxlen) : what_(what), maxlen_(maxlen) {}
  /// Throws unless x is above the last value.
  void check(const T& x) const {
    if (!values_.empty() && !(values_.back() < x)) {
      raise(
          "Throughput.update: expected {} to increase with every call, found {} after {}; pass running totals "
          "(the time since the start, the batches and samples seen so far), not per-step values",
          what_, x, values_.back());
    }
  }
  /// Appends x (checked first), dropping the oldest value when the window is full.
  void append(const T& x) {
    check(x);
    values_.push_back(x);
    if (values_.size() > maxlen_) values_.pop_front();
  }
  std::size_t size() const noexcept { return values_.size(); }
  std::size_t size_after_append() const noexcept { return std::min(values_.size() + 1, maxlen_); }
  std::size_t maxlen() const noexcept { return maxlen_; }
  bool empty() const noexcept { return values_.empty(); }
  bool full() const noexcept { return values_.size() == maxlen_; }
  const T& front() const { return values_.front(); }
  const T& back() const { return values_.back(); }
  const std::deque<T>& values() const noexcept { return values_; }
  void clear() noexcept { values_.clear(); }

 private:
  std::string_view what_;
  std::size_t maxlen_;
  std::deque<T> values_;
};

}  // namespace detail

// ---- Throughput -----------------------------------------------------------------------------------

/// Settings of Throughput and ThroughputMonitor (Lightning's constructor arguments).
struct ThroughputOptions {
  /// Peak FLOP/s of one device; unset: no MFU (ThroughputMonitor looks it up with get_available_flops).
  std::optional<double> available_flops{};
  /// Devices across hosts; the global (not "device/") rates appear only above 1. ThroughputMonitor takes
  /// the fabric's world size.
  int world_size = 1;
  /// Updates in the rolling window (at least 2: a rate is the difference of its ends).
  int window_size = 100;
  /// Joins "device" and the metric name.
  std::string separator = "/";
  /// Whether the model uses 2:4 structured sparsity (the peak is then scaled); unset: dense, with a
  /// warning where a peak is known.
  std::optional<bool> using_sparse_model{};
  /// The peak's multiplier when using_sparse_model.
  double sparse_cuda_acceleration_factor = 2.0;
};

/// One update of Throughput: running totals per device, and the FLOPs since the last update.
struct ThroughputUpdate {
  double time = 0;                        ///< seconds since the start; increases with every update
  std::int64_t batches = 0;               ///< batches seen so far; increases with every update
  std::int64_t samples = 0;               ///< samples seen so far (at least batches); increases
  std::optional<std::int64_t> lengths{};  ///< items (e.g. tokens) seen so far (at least samples)
  std::optional<double> flops{};          ///< FLOPs of this device since the last update
};

/// Computes throughput over a rolling window, like Lightning's Throughput: compute() returns
/// "time", "batches", "samples" (and "lengths") always; once window_size updates were seen,
/// "device/batches_per_sec", "device/samples_per_sec" (and "device/items_per_sec" with lengths) and,
/// above one device, "batches_per_sec", "samples_per_sec", "items_per_sec"; with flops in every update
/// of the window "device/flops_per_sec" ("flops_per_sec" above one device) and, with a known peak,
/// "device/mfu". Synchronize the device before reading the clock.
///
///     fabric::Throughput throughput({.window_size = 10});
///     for (std::int64_t i = 1; i <= steps; ++i) {
///       train_step();
///       throughput.update({.time = seconds_since(t0), .batches = i, .samples = i * batch_size});
///       if (i % 10 == 0) fabric.print("{}", throughput.compute().at("device/samples_per_sec"));
///     }
class Throughput {
 public:
  /// Checks the settings; warns (on rank zero) that MFU assumes a dense model when a peak is given and
  /// using_sparse_model is unset.
  explicit Throughput(ThroughputOptions options = {}) : Throughput(std::move(options), true) {}

  /// Records one step's running totals (see ThroughputUpdate). Throws fabric::Error, changing nothing,
  /// when a total does not increase, samples < batches, lengths < samples, or lengths come in some
  /// updates of the window and not in others.
  void update(const ThroughputUpdate& u) {
    time_.check(u.time);
    if (u.samples < u.batches) {
      detail::raise(
          "Throughput.update: expected samples >= batches, found samples = {} and batches = {}; pass the "
          "samples seen so far (batches times the batch size)",
          u.samples, u.batches);
    }
    batches_.check(u.batches);
    samples_.check(u.samples);
    if (u.lengths) {
      if (*u.lengths < u.samples) {
        detail::raise(
            "Throughput.update: expected lengths >= samples, found lengths = {} and samples = {}; pass the "
            "items (e.g. tokens) seen so far",
            *u.lengths, u.samples);
      }
      lengths_.check(*u.lengths);
      if (samples_.size_after_append() != lengths_.size_after_append()) {
        detail::raise(
            "Throughput.update: expected lengths in every update of the window once they are passed, "
            "found {} lengths for {} samples; pass lengths from the first update on, or reset()",
            lengths_.size_after_append(), samples_.size_after_append());
      }
    }
    time_.append(u.time);
    batches_.append(u.batches);
    samples_.append(u.samples);
    if (u.lengths) lengths_.append(*u.lengths);
    if (u.flops) {
      flops_.push_back(*u.flops * options_.world_size);  // the sum over the ranks
      if (flops_.size() > time_.maxlen()) flops_.pop_front();
    }
  }
  /// update with positional arguments: update(time, batches, samples, lengths, flops).
  void update(double time, std::int64_t batches, std::int64_t samples, std::optional<std::int64_t> lengths = {},
              std::optional<double> flops = {}) {
    update(ThroughputUpdate{.time = time, .batches = batches, .samples = samples, .lengths = lengths, .flops = flops});
  }

  /// Returns the metrics (Lightning's keys; see the class). Throws before the first update.
  Metrics compute() const {
    if (time_.empty()) {
      detail::raise(
          "Throughput.compute: expected at least one update() before compute(), found none; call update "
          "after each step");
    }
    const std::string device = "device" + options_.separator;
    const bool global = options_.world_size > 1;
    const double world = options_.world_size;
    Metrics m{{"time", time_.back()},
              {"batches", static_cast<double>(batches_.back())},
              {"samples", static_cast<double>(samples_.back())}};
    if (!lengths_.empty()) m["lengths"] = static_cast<double>(lengths_.back());
    // NOTE: as Lightning, rates appear only once the window is full (the monotonic checks rule out a
    // zero elapsed time).
    if (time_.full()) {
      const double elapsed_time = time_.back() - time_.front();
      const double dev_batches = static_cast<double>(batches_.back() - batches_.front()) / elapsed_time;
      const double dev_samples = static_cast<double>(samples_.back() - samples_.front()) / elapsed_time;
      m[device + "batches_per_sec"] = dev_batches;
      m[device + "samples_per_sec"] = dev_samples;
      if (global) {
        m["batches_per_sec"] = dev_batches * world;
        m["samples_per_sec"] = dev_samples * world;
      }
      if (lengths_.full()) {
        const double dev_items = static_cast<double>(lengths_.back() - lengths_.front()) / elapsed_time;
        m[device + "items_per_sec"] = dev_items;
        if (global) m["items_per_sec"] = dev_items * world;
      }
    }
    if (flops_.size() == time_.maxlen()) {
      // NOTE: the first update's FLOPs were spent before the window's first time stamp (Lightning's rule).
      const double elapsed_flops = std::accumulate(flops_.begin(), flops_.end(), 0.0) - flops_.front();
      const double flops_per_sec = elapsed_flops / (time_.back() - time_.front());
      const double dev_flops = flops_per_sec / world;
      if (global) m["flops_per_sec"] = flops_per_sec;
      m[device + "flops_per_sec"] = dev_flops;
      if (available_flops_ && *available_flops_ != 0) m[device + "mfu"] = dev_flops / *available_flops_;
    }
    return m;
  }

  /// Forgets every update (the settings stay).
  void reset() noexcept {
    time_.clear();
    batches_.clear();
    samples_.clear();
    lengths_.clear();
    flops_.clear();
  }

  /// Returns the peak FLOP/s of one device that MFU divides by (scaled for a sparse model), or nothing.
  std::optional<double> available_flops() const noexcept { return available_flops_; }
  /// Returns the number of devices the global rates multiply by.
  int world_size() const noexcept { return options_.world_size; }
  /// Returns the settings.
  const ThroughputOptions& options() const noexcept { return options_; }

 protected:
  Throughput(ThroughputOptions options, bool warn)
      : options_(check(std::move(options))),
        time_("time", window()),
        batches_("batches", window()),
        samples_("samples", window()),
        lengths_("lengths", window()) {
    available_flops_ = options_.available_flops;
    if (!options_.using_sparse_model && available_flops_) {
      detail::throughput_warn(warn,
                              "MFU assumes dense model FLOPs (no sparsity acceleration). Set "
                              "'using_sparse_model = true' for MFU to use sparse FLOPs, or false to silence this");
    }
    if (options_.using_sparse_model.value_or(false) && available_flops_) {
      *available_flops_ *= options_.sparse_cuda_acceleration_factor;
    }
  }

 private:
  static ThroughputOptions check(ThroughputOptions o) {
    if (o.window_size < 2) {
      detail::raise(
          "Throughput: expected window_size >= 2 (a rate needs two updates), found {}; pass a larger "
          "window_size",
          o.window_size);
    }
    if (o.world_size < 1) {
      detail::raise("Throughput: expected world_size >= 1, found {}; pass the number of devices", o.world_size);
    }
    if (!(o.sparse_cuda_acceleration_factor >= 1.0)) {
      detail::raise(
          "Throughput: expected sparse_cuda_acceleration_factor >= 1 (sparsity cannot reduce the peak), "
          "found {}; pass 2 for NVIDIA's 2:4 sparsity",
          o.sparse_cuda_acceleration_factor);
    }
    if (o.available_flops && !(*o.available_flops >= 0)) {
      detail::raise("Throughput: expected available_flops >= 0, found {}; pass the peak FLOP/s of one device",
                    *o.available_flops);
    }
    return o;
  }
  std::size_t window() const noexcept { return static_cast<std::size_t>(options_.window_size); }

  ThroughputOptions options_;
  std::optional<double> available_flops_;
  detail::MonotonicWindow<double> time_;
  detail::MonotonicWindow<std::int64_t> batches_;
  detail::MonotonicWindow<std::int64_t> samples_;
  detail::MonotonicWindow<std::int64_t> lengths_;
  std::deque<double> flops_;
};

// ---- ThroughputMonitor ----------------------------------------------------------------------------

/// What ThroughputMonitor needs of a Fabric: its device, world size and rank, and log_dict.
template <class F>
concept ThroughputFabric = requires(F& f, const Metrics& m, std::optional<std::int64_t> step) {
  { f.device() } -> std::convertible_to<c10::Device>;   // where get_available_flops looks
  { f.world_size() } -> std::convertible_to<int>;       // the devices the global rates count
  { f.is_global_zero() } -> std::convertible_to<bool>;  // only rank zero computes and logs
  f.log_dict(m, step);                                  // where compute_and_log sends the metrics
};

/// Throughput that takes the world size from a Fabric, looks the peak up for the fabric's device and
/// precision (unless available_flops is given), and logs through `fabric.log_dict`; as Lightning's, it
/// updates, computes and logs on global rank zero only (elsewhere compute returns no metrics).
///
///     fabric::ThroughputMonitor monitor(fabric, {.window_size = 10});
///     for (std::int64_t i = 1; i <= steps; ++i) {
///       train_step();
///       monitor.update({.time = seconds_since(t0), .batches = i, .samples = i * batch, .flops = step_flops});
///       if (i % 10 == 0) monitor.compute_and_log(i);
///     }
template <ThroughputFabric F>
class ThroughputMonitor : public Throughput {
 public:
  /// Binds the monitor to a fabric (which must outlive it). options.world_size must be left at 1 or
  /// equal the fabric's.
  explicit ThroughputMonitor(F& fabric, ThroughputOptions options = {})
      : Throughput(with_fabric(fabric, std::move(options)), fabric.is_global_zero()), fabric_(&fabric) {}

  /// Throughput::update, on global rank zero only.
  void update(const ThroughputUpdate& u) {
    if (fabric_->is_global_zero()) Throughput::update(u);
  }
  /// Throughput::update with positional arguments, on global rank zero only.
  void update(double time, std::int64_t batches, std::int64_t samples, std::optional<std::int64_t> lengths = {},
              std::optional<double> flops = {}) {
    update(ThroughputUpdate{.time = time, .batches = batches, .samples = samples, .lengths = lengths, .flops = flops});
  }
  /// Throughput::compute on global rank zero; no metrics elsewhere.
  Metrics compute() const { return fabric_->is_global_zero() ? Throughput::compute() : Metrics{}; }
  /// Forgets every update (on global rank zero; the others hold none).
  void reset() noexcept { Throughput::reset(); }
  /// Computes the metrics and logs them with `fabric.log_dict` at step (one more than the last step
  /// when not given, from 0); returns them (none away from global rank zero).
  Metrics compute_and_log(std::optional<std::int64_t> step = std::nullopt) {
    if (!fabric_->is_global_zero()) return {};
    step_ = step ? *step : step_ + 1;
    Metrics metrics = compute();
    fabric_->log_dict(metrics, step_);
    return metrics;
  }
  /// Returns the step of the last compute_and_log (-1 before the first).
  std::int64_t step() const noexcept { return step_; }

 private:
  static ThroughputOptions with_fabric(F& fabric, ThroughputOptions options) {
    const int world = fabric.world_size();
    if (options.world_size != 1 && options.world_size != world) {
      detail::raise(
          "ThroughputMonitor: expected world_size left at 1 (the monitor takes fabric.world_size() = {}), "
          "found {}; drop .world_size, or use fabric::Throughput",
          world, options.world_size);
    }
    options.world_size = world;
    if (!options.available_flops) {
      c10::ScalarType dtype = c10::ScalarType::Float;
      if constexpr (requires { fabric.precision(); }) dtype = detail::compute_dtype(fabric.precision());
      const c10::Device device = fabric.device();
      if (device.is_cuda()) {
        // NOTE: as get_available_flops(device, dtype), with the warnings on rank zero only.
        const int index = detail::cuda_index(device);
        if (const auto info = detail::cuda_device_info(index)) {
          const bool tf32 = info->major >= 8 && detail::float32_matmul_allows_tf32();
          options.available_flops = detail::available_flops(info->name, dtype, tf32, fabric.is_global_zero());
        } else {
          detail::throughput_warn(fabric.is_global_zero(),
                                  fmt::format("FLOPs not found for CUDA device {}: the driver (libcuda.so.1) did not "
                                              "report its name; pass available_flops yourself",
                                              index));
        }
      }
    }
    return options;
  }

  F* fabric_;
  std::int64_t step_ = -1;
};

// ---- measure_flops --------------------------------------------------------------------------------

namespace detail {

/// Sums the FLOPs of profiled operators, leaving out elementwise aten::add and aten::mul (as PyTorch's
/// FlopCounterMode does) and an operator recorded inside itself on the same thread: autocast casts the
/// inputs and calls the operator again (aten::addmm inside aten::addmm), which would count it twice.
template <class Event>
std::uint64_t counted_flops(const std::vector<Event>& events) {
  struct Counted {
    std::uint64_t thread, start, end, flops;
    std::string name;
  };
  std::vector<Counted> counted;
  for (const auto& e : events) {
    if (e.flops() == 0) continue;
    std::string name = e.name();
    if (name == "aten::add" || name == "aten::mul") continue;
    // NOTE: LibTorch 2.x stamps events in nanoseconds, 1.13 in microseconds.
    if constexpr (requires { e.startNs(); }) {
      counted.push_back({e.startThreadId(), e.startNs(), e.endNs(), e.flops(), std::move(name)});
    } else {
      counted.push_back({e.startThreadId(), e.startUs(), e.startUs() + e.durationUs(), e.flops(), std::move(name)});
    }
  }
  std::sort(counted.begin(), counted.end(), [](const Counted& a, const Counted& b) {
    return std::tie(a.thread, a.start, b.end) < std::tie(b.thread, b.start, a.end);
  });
  // The end of the last counted event per thread and name: one that starts before it ends is inside it.
  std::map<std::pair<std::uint64_t, std::string>, std::uint64_t> open;
  std::uint64_t flops = 0;
  for (const auto& c : counted) {
    auto [it, fresh] = open.try_emplace({c.thread, c.name}, c.end);
    if (!fresh && c.start < it->second) continue;
    it->second = c.end;
    flops += c.flops;
  }
  return flops;
}

/// Runs fn under LibTorch's profiler with FLOP counting (CPU activity only: the operators are recorded
/// where they are dispatched, on any device) and returns the FLOPs of the recorded operators (counted_flops).
template <class Fn>
std::uint64_t profile_flops(Fn&& fn) {
  namespace profiler = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  if (torch::profiler::impl::profilerEnabled()) {
    raise(
        "measure_flops: expected no profiler running on this thread, found one; call measure_flops outside "
        "the profiled region");
  }
  const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/true, /*profile_memory=*/false,
                              /*with_stack=*/false, /*with_flops=*/true);
  const std::set<ActivityType> activities{ActivityType::CPU};
  profiler::prepareProfiler(config, activities);
  profiler::enableProfiler(config, activities);
  struct Stop {  // NOTE: disables the profiler when fn throws.
    bool armed = true;
    ~Stop() {
      if (armed) profiler::disableProfiler();
    }
  } stop;
  std::forward<Fn>(fn)();
  stop.armed = false;
  const auto result = profiler::disableProfiler();
  return counted_flops(result->events());
}

}  // namespace detail

/// Returns the FLOPs of forward_fn(), counted by LibTorch's profiler (PyTorch's FlopCounterMode is
/// Python): matrix products (mm, addmm, bmm, baddbmm, and conv2d forward) at 2 FLOPs per multiply-add.
///
///     torch::nn::Linear linear(32, 16);
///     auto x = torch::randn({2, 32});
///     std::uint64_t fwd = fabric::measure_flops([&] { return linear(x); });                  // 2*2*32*16
///     std::uint64_t all = fabric::measure_flops([&] { return linear(x); }, [](const at::Tensor& y) {
///       return y.sum();
///     });  // forward and backward
template <std::invocable Forward>
std::uint64_t measure_flops(Forward&& forward_fn) {
  return detail::profile_flops([&] { (void)std::invoke(forward_fn); });
}

/// Returns the FLOPs of `loss_fn(forward_fn()).backward()`: the forward, the loss and the backward.
template <class Forward, class Loss>
requires std::invocable<Loss&, const at::Tensor&> && std::invocable<Forward&> std::uint64_t measure_flops(
    Forward&& forward_fn, Loss&& loss_fn) {
  return detail::profile_flops([&] {
    at::Tensor loss = std::invoke(loss_fn, std::invoke(forward_fn));
    loss.backward();
  });
}

/// measure_flops with Lightning's first argument, the model (unused: forward_fn runs it).
template <class Model, class Forward>
requires(!std::invocable<Forward&, const at::Tensor&>) && std::invocable<Forward&> std::uint64_t
    measure_flops(const Model& /*model*/, Forward&& forward_fn) {
  return measure_flops(std::forward<Forward>(forward_fn));
}

/// measure_flops(model, forward_fn, loss_fn): Lightning's signature.
template <class Model, class Forward, class Loss>
requires std::invocable<Loss&, const at::Tensor&> && std::invocable<Forward&> std::uint64_t measure_flops(
    const Model& /*model*/, Forward&& forward_fn, Loss&& loss_fn) {
  return measure_flops(std::forward<Forward>(forward_fn), std::forward<Loss>(loss_fn));
}

// ---- transformer_flops ----------------------------------------------------------------------------

/// The sizes of a decoder-only transformer that its FLOPs depend on.
struct TransformerShape {
  std::int64_t parameters = 0;  ///< N, all parameters (the tied embedding once)
  std::int64_t layers = 0;      ///< blocks
  std::int64_t width = 0;       ///< the residual stream (heads times head size)
  std::int64_t context = 0;     ///< the sequence length attended over
};

/// Returns the FLOPs of training a decoder-only transformer on tokens (forward and backward):
/// 6·N·tokens for the weights plus 12·layers·width·context·tokens for attention (PaLM, appendix B;
/// nanoGPT's estimate_mfu); a third of that with training = false (the forward only).
///
///     double step = fabric::transformer_flops({.parameters = 124'475'904, .layers = 12, .width = 768,
///                                              .context = 1024}, 8 * 1024);
inline double transformer_flops(const TransformerShape& shape, std::int64_t tokens, bool training = true) {
  if (shape.parameters < 1 || shape.layers < 1 || shape.width < 1 || shape.context < 1 || tokens < 0) {
    detail::raise(
        "transformer_flops: expected positive parameters, layers, width and context and tokens >= 0, "
        "found {}, {}, {}, {} and {}; pass the model's sizes",
        shape.parameters, shape.layers, shape.width, shape.context, tokens);
  }
  const double per_token = 6.0 * static_cast<double>(shape.parameters) + 12.0 * static_cast<double>(shape.layers) *
                                                                             static_cast<double>(shape.width) *
                                                                             static_cast<double>(shape.context);
  return per_token * static_cast<double>(tokens) / (training ? 1.0 : 3.0);
}

}  // namespace fabric
