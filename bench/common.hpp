// What the benchmarks (cpu_overhead.cpp, race.cpp, ddp_race.cpp, ddp_step.cpp, optim_step.cpp) share:
// the command-line helpers (CLI11), the device's synchronisation, step timing with CUDA events and peak memory,
// autocast as a hand-written LibTorch loop spells it, the workloads' models and losses, and writing results
// (nlohmann::json). BENCH_RACE_CUDA compiles the GPU parts in.
#pragma once

#include "gpt2/gpt2.hpp"

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <fabric/fabric.hpp>
#include <fabric/precision/autocast.hpp>
#include <nlohmann/json.hpp>

#if defined(BENCH_RACE_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#endif

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace bench {

// ---- the command line --------------------------------------------------------------------------

/// A bad command line (exit status 2): the message says what was expected and what was found. A
/// CLI::ValidationError thrown in an option's callback reaches CLI::App::parse's caller unchanged.
using UsageError = CLI::ValidationError;

/// CLI11's help with the usage line first (it opens the App's description), then the flags.
class Help : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override { return {}; }
};

/// Sets up a benchmark's command line before its flags are added: the help's layout (the flags' descriptions
/// start at `column`), and the last value of a repeated flag wins.
inline void configure(CLI::App& app, std::size_t column) {
  app.formatter(std::make_shared<Help>());
  app.get_formatter()->column_width(column);
  app.option_defaults()->group("flags")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
}

/// "a", "a or b", "a, b or c".
inline std::string one_of(const std::vector<std::string>& names) {
  std::string out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    out += i == 0 ? "" : i + 1 == names.size() ? " or " : ", ";
    out += names[i];
  }
  return out;
}

/// Adds `flag N` to `app`: an integer of at least `min`, read into `into`.
inline CLI::Option* add_int(CLI::App& app, const std::string& flag, int& into, int min, const std::string& help) {
  return app
      .add_option_function<std::string>(
          flag,
          [flag, &into, min](const std::string& text) {
            int value = 0;
            const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
            if (err != std::errc{} || end != text.data() + text.size() || value < min) {
              throw UsageError(fmt::format("expected an integer >= {} after {}, found \"{}\"", min, flag, text));
            }
            into = value;
          },
          help)
      ->type_name("N");
}

/// Adds `flag X` to `app`: a positive number, read into `into`.
inline CLI::Option* add_positive(CLI::App& app, const std::string& flag, double& into, const std::string& help) {
  return app
      .add_option_function<std::string>(
          flag,
          [flag, &into](const std::string& text) {
            double value = 0;
            const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
            if (err != std::errc{} || end != text.data() + text.size() || !(value > 0)) {
              throw UsageError(fmt::format("expected a positive number after {}, found \"{}\"", flag, text));
            }
            into = value;
          },
          help)
      ->type_name("X");
}

/// Adds `flag NAME` to `app`: one of `names`, read into `into`.
inline CLI::Option* add_choice(CLI::App& app, const std::string& flag, std::string& into,
                               const std::vector<std::string>& names, const std::string& help) {
  return app
      .add_option_function<std::string>(
          flag,
          [flag, &into, names](const std::string& text) {
            if (std::find(names.begin(), names.end(), text) == names.end()) {
              throw UsageError(fmt::format("expected {} after {}, found \"{}\"", one_of(names), flag, text));
            }
            into = text;
          },
          help)
      ->type_name("NAME");
}

/// Parses the command line into the variables of `app`'s flags (added last: --help). Returns false when it
/// printed the help; throws a CLI::ParseError (UsageError for fabric's own messages) when the line is bad.
inline bool parse(CLI::App& app, int argc, char** argv) {
  app.set_help_flag("-h,--help", "print this and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return false;
  } catch (const CLI::ExtrasError&) {
    throw UsageError(
        fmt::format("unknown flag \"{}\"; run {} --help for the list", app.remaining().front(), app.get_name()));
  } catch (const CLI::ArgumentMismatch&) {
    // NOTE: CLI11 takes whatever follows a flag as its value, so only the last argument can lack one.
    throw UsageError(fmt::format("expected a value after {}, found none", argv[argc - 1]));
  }
  return true;
}

/// Runs a benchmark's main: `run()` parses and runs (it returns the exit status); a bad command line exits
/// with 2, any other error with 1, each with the benchmark's name and the message.
template <class Run>
int run_main(const char* name, Run&& run) {
  try {
    return run();
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

// ---- the device: synchronisation, timing, memory ------------------------------------------------

inline bool cuda_built() {
#if defined(BENCH_RACE_CUDA)
  return true;
#else
  return false;
#endif
}

inline void synchronize(const torch::Device& device) {
#if defined(BENCH_RACE_CUDA)
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
#else
  (void)device;
#endif
}

/// Frees the allocator's cache and restarts its peak statistics (before a loop is built).
inline void reset_memory(const torch::Device& device) {
  synchronize(device);
#if defined(BENCH_RACE_CUDA)
  if (device.is_cuda()) {
    // NOTE: the caching allocator keeps statistics only for devices it has been initialised for,
    // which the first allocation does; resetPeakStats fails before ("Invalid device argument").
    (void)at::empty({1}, at::TensorOptions().device(device));
    c10::cuda::CUDACachingAllocator::emptyCache();
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
  }
#endif
}

/// The peak allocated and reserved bytes since reset_memory (zeros on the CPU).
inline std::pair<std::int64_t, std::int64_t> peak_memory(const torch::Device& device) {
#if defined(BENCH_RACE_CUDA)
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return {stats.allocated_bytes[0].peak, stats.reserved_bytes[0].peak};  // [0]: all pools together
  }
#endif
  (void)device;
  return {0, 0};
}

/// Times steps: CUDA events around each step on the GPU (no synchronisation between steps), a
/// steady clock on the CPU.
class StepTimer {
 public:
  StepTimer(const torch::Device& device, int steps) : cuda_(device.is_cuda()) {
#if defined(BENCH_RACE_CUDA)
    if (cuda_) {
      events_.resize(2 * static_cast<std::size_t>(steps));
      for (auto& e : events_) check(cudaEventCreate(&e), "cudaEventCreate");
    }
#endif
    cpu_ms_.reserve(static_cast<std::size_t>(steps));
  }
  ~StepTimer() {
#if defined(BENCH_RACE_CUDA)
    for (auto& e : events_) cudaEventDestroy(e);
#endif
  }
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;

  void start() {
#if defined(BENCH_RACE_CUDA)
    if (cuda_) {
      check(cudaEventRecord(events_[2 * n_], c10::cuda::getCurrentCUDAStream()), "cudaEventRecord");
      return;
    }
#endif
    t0_ = std::chrono::steady_clock::now();
  }
  void stop() {
#if defined(BENCH_RACE_CUDA)
    if (cuda_) {
      check(cudaEventRecord(events_[2 * n_ + 1], c10::cuda::getCurrentCUDAStream()), "cudaEventRecord");
      ++n_;
      return;
    }
#endif
    cpu_ms_.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
    ++n_;
  }
  /// Returns the milliseconds of each step (call after synchronising).
  std::vector<double> ms() const {
#if defined(BENCH_RACE_CUDA)
    if (cuda_) {
      std::vector<double> out;
      for (std::size_t i = 0; i < n_; ++i) {
        float ms = 0;
        check(cudaEventElapsedTime(&ms, events_[2 * i], events_[2 * i + 1]), "cudaEventElapsedTime");
        out.push_back(ms);
      }
      return out;
    }
#endif
    return cpu_ms_;
  }

 private:
#if defined(BENCH_RACE_CUDA)
  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) throw std::runtime_error(fmt::format("{} failed: {}", what, cudaGetErrorString(err)));
  }
  std::vector<cudaEvent_t> events_;
#endif
  bool cuda_;
  std::size_t n_ = 0;
  std::chrono::steady_clock::time_point t0_{};
  std::vector<double> cpu_ms_;
};

/// Autocast as a hand-written LibTorch loop spells it (what Python's torch.autocast does on entry
/// and exit); the version adapter of fabric/precision/autocast.hpp only names the calls.
class RawAutocast {
 public:
  RawAutocast(c10::DeviceType device, c10::ScalarType dtype)
      : device_(device),
        prev_enabled_(fabric::detail::autocast_enabled(device)),
        prev_dtype_(fabric::detail::autocast_dtype(device)) {
    fabric::detail::set_autocast_enabled(device, true);
    fabric::detail::set_autocast_dtype(device, dtype);
    at::autocast::increment_nesting();
  }
  ~RawAutocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    fabric::detail::set_autocast_enabled(device_, prev_enabled_);
    fabric::detail::set_autocast_dtype(device_, prev_dtype_);
  }
  RawAutocast(const RawAutocast&) = delete;
  RawAutocast& operator=(const RawAutocast&) = delete;

 private:
  c10::DeviceType device_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
};

// ---- the workloads ----------------------------------------------------------------------------

/// The mlp workload's model: Linear 784->1024, ReLU, Linear 1024->1024, ReLU, Linear 1024->10.
struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : fc1(register_module("fc1", fabric::nn::Linear(784, 1024))),
        fc2(register_module("fc2", fabric::nn::Linear(1024, 1024))),
        fc3(register_module("fc3", fabric::nn::Linear(1024, 10))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc3(torch::relu(fc2(torch::relu(fc1(x))))); }
  // NOTE: 2-D inputs: torch::nn::Linear would fuse the bias too; fabric::nn::Linear for uniformity.
  fabric::nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(Mlp);

inline at::Tensor mlp_loss(const at::Tensor& logits, const at::Tensor& y) {
  return torch::nn::functional::cross_entropy(logits, y);
}

/// A workload's model, built from seed 0: the mlp, or GPT-2 with `config`.
template <class Net>
Net build(const gpt2::Config& config) {
  torch::manual_seed(0);
  if constexpr (std::is_same_v<Net, Mlp>) {
    return Mlp();
  } else {
    return gpt2::GPT(config);
  }
}

/// A workload's loss: cross-entropy over the classes (mlp) or over every position (gpt2, in float32 from
/// the logits' dtype by fabric::nn::cross_entropy, no float32 copy of the logits).
template <class Net>
at::Tensor workload_loss(const at::Tensor& out, const at::Tensor& y, const fabric::nn::ChunkOptions& chunks = {}) {
  if constexpr (std::is_same_v<Net, Mlp>) {
    return mlp_loss(out, y);
  } else {
    return gpt2::loss(out, y, chunks);
  }
}

/// A JSON document whose members keep the order they were written in.
using Json = nlohmann::ordered_json;

/// Writes `json` to `path` (indented by 2), replacing it; throws when it cannot.
inline void write_json(const std::string& path, const Json& json) {
  std::ofstream out(path, std::ios::trunc);
  out << json.dump(2) << '\n';
  if (!out.flush()) throw std::runtime_error(fmt::format("could not write {}", path));
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

inline std::string kernels_name() {
  switch (fabric::detail::last_optimizer_step_path()) {
    case fabric::detail::StepPath::fused:
      return "fused";
    case fabric::detail::StepPath::foreach:
      return "foreach";
    case fabric::detail::StepPath::own:
      return "own";
  }
  return "?";
}

inline std::int64_t count(const std::vector<at::Tensor>& params) {
  std::int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  return n;
}

}  // namespace bench
