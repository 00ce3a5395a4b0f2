// bench_cpu_overhead: the CPU time of one training step written by hand in LibTorch against the same
// step through fabric::Fabric<CPU, SingleDevice, FP32>, measured in one process.
//
// The workload ("mlp"): Linear 784->1024, ReLU, Linear 1024->1024, ReLU, Linear 1024->10,
// cross-entropy, batch 256, AdamW lr 1e-3, on one batch of random non-zero inputs drawn once. Both
// loops train their own copy of the model, initialised identically, and run in alternating blocks
// of steps (the block order flips each round) so that drift of the machine hits both alike; the
// median time per step of each, and their ratio, are reported.
//
//     bench_cpu_overhead --steps 30 --warmup 10 --json results.json
//     bench_cpu_overhead --mode fabric --steps 3 --warmup 1     # one loop only, e.g. under callgrind

#include "common.hpp"

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define BENCH_CALLGRIND_DUMP(name) CALLGRIND_DUMP_STATS_AT(name)
#else
#define BENCH_CALLGRIND_DUMP(name) ((void)0)
#endif

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using namespace bench;

/// Which loops to run.
enum class Mode { raw, fabric, both };

/// The command-line settings.
struct Config {
  int steps = 30;
  int warmup = 10;
  int block = 5;
  Mode mode = Mode::both;
  std::string json{};
  int threads = 0;
};

constexpr std::string_view usage = R"(usage: bench_cpu_overhead [flags]

Times a training step of the mlp workload (Linear 784-1024-1024-10, ReLU, cross-entropy, batch
256, AdamW lr 1e-3) written by hand in LibTorch ("raw") and through fabric::Fabric<CPU,
SingleDevice, FP32> ("fabric"), interleaved in blocks of steps, and prints the median ms/step of
each and the ratio fabric/raw.

flags:
  --steps N        timed steps of each loop (default 30)
  --warmup N       untimed steps of each loop first (default 10)
  --block N        steps of one loop before switching to the other (default 5)
  --mode M         raw, fabric or both (default both); one loop only is for callgrind
  --threads N      intra-op threads of LibTorch (default: LibTorch's choice)
  --json PATH      also write the results to PATH as JSON
  --help           print this and exit
)";

Config parse_args(int argc, char** argv, bool& help) {
  Config config;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) throw UsageError(fmt::format("expected a value after {}, found none", flag));
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      help = true;
    } else if (flag == "--steps") {
      config.steps = parse_int(flag, value(), 1);
    } else if (flag == "--warmup") {
      config.warmup = parse_int(flag, value(), 0);
    } else if (flag == "--block") {
      config.block = parse_int(flag, value(), 1);
    } else if (flag == "--threads") {
      config.threads = parse_int(flag, value(), 1);
    } else if (flag == "--json") {
      config.json = value();
    } else if (flag == "--mode") {
      const std::string_view mode = value();
      if (mode == "raw") {
        config.mode = Mode::raw;
      } else if (mode == "fabric") {
        config.mode = Mode::fabric;
      } else if (mode == "both") {
        config.mode = Mode::both;
      } else {
        throw UsageError(fmt::format("expected raw, fabric or both after --mode, found \"{}\"", mode));
      }
    } else {
      throw UsageError(fmt::format("unknown flag \"{}\"; run bench_cpu_overhead --help for the list", flag));
    }
  }
  return config;
}

/// Builds the model from a fixed seed, so both loops start from the same weights.
Mlp make_model() { return build<Mlp>({}); }

using Clock = std::chrono::steady_clock;
using Fabric = fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32>;

/// The hand-written loop.
class RawLoop {
 public:
  RawLoop(const torch::Tensor& x, const torch::Tensor& y)
      : x_(x), y_(y), net_(make_model()), adamw_(net_->parameters(), torch::optim::AdamWOptions(1e-3)) {}
  double step() {
    const auto start = Clock::now();
    const auto loss = torch::nn::functional::cross_entropy(net_->forward(x_), y_);
    loss.backward();
    adamw_.step();
    adamw_.zero_grad();
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }

 private:
  torch::Tensor x_, y_;
  Mlp net_;
  torch::optim::AdamW adamw_;
};

/// The same loop through fabric.
class FabricLoop {
 public:
  FabricLoop(const torch::Tensor& x, const torch::Tensor& y)
      : x_(x),
        y_(y),
        net_(make_model()),
        adamw_(net_->parameters(), torch::optim::AdamWOptions(1e-3)),
        wrapped_(fabric_.setup(net_, adamw_)) {}
  double step() {
    auto& [model, optimizer] = wrapped_;
    const auto start = Clock::now();
    const auto loss = torch::nn::functional::cross_entropy(model(x_), y_);
    fabric_.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }

 private:
  using Wrapped = decltype(std::declval<Fabric&>().setup(std::declval<Mlp&>(), std::declval<torch::optim::AdamW&>()));

  torch::Tensor x_, y_;
  Mlp net_;
  torch::optim::AdamW adamw_;
  Fabric fabric_{};
  Wrapped wrapped_;  // the (model, optimizer) that fabric_.setup returned
};

int run(const Config& config) {
  if (config.threads > 0) torch::set_num_threads(config.threads);
  const bool run_raw = config.mode != Mode::fabric;
  const bool run_fabric = config.mode != Mode::raw;

  torch::manual_seed(1);
  const torch::Tensor x = torch::rand({256, 784}) * 0.9 + 0.1;  // in [0.1, 1): no zeros
  const torch::Tensor y = torch::randint(0, 10, {256}, torch::kLong);

  std::optional<RawLoop> raw;
  std::optional<FabricLoop> fab;
  if (run_raw) raw.emplace(x, y);
  if (run_fabric) fab.emplace(x, y);

  std::vector<double> raw_ms, fabric_ms;
  // Alternating blocks; the loop that goes first flips each round.
  const auto interleave = [&](int steps, bool record) {
    int done_raw = 0, done_fabric = 0, round = 0;
    while ((run_raw && done_raw < steps) || (run_fabric && done_fabric < steps)) {
      for (int half = 0; half < 2; ++half) {
        const bool raw_turn = (half == 0) == (round % 2 == 0);
        if (raw_turn && run_raw) {
          for (int i = 0; i < config.block && done_raw < steps; ++i, ++done_raw) {
            const double ms = raw->step();
            if (record) raw_ms.push_back(ms);
          }
        } else if (!raw_turn && run_fabric) {
          for (int i = 0; i < config.block && done_fabric < steps; ++i, ++done_fabric) {
            const double ms = fab->step();
            if (record) fabric_ms.push_back(ms);
          }
        }
      }
      ++round;
    }
  };
  interleave(config.warmup, false);
  BENCH_CALLGRIND_DUMP("setup+warmup");  // under callgrind: the timed steps get a part of their own
  interleave(config.steps, true);
  BENCH_CALLGRIND_DUMP("steps");

  const char* mode_name = config.mode == Mode::raw ? "raw" : config.mode == Mode::fabric ? "fabric" : "both";
  fmt::print(
      "bench_cpu_overhead: mlp workload, batch 256, {} timed + {} warm-up steps per loop, blocks of {}, "
      "mode {}, {} thread{}\n",
      config.steps, config.warmup, config.block, mode_name, torch::get_num_threads(),
      torch::get_num_threads() == 1 ? "" : "s");
  std::string json = fmt::format(
      "{{\n  \"workload\": \"mlp\",\n  \"batch_size\": 256,\n  \"steps\": {},\n  "
      "\"warmup\": {},\n  \"block\": {},\n  \"mode\": \"{}\",\n  \"threads\": {}",
      config.steps, config.warmup, config.block, mode_name, torch::get_num_threads());
  const auto report = [&](std::string_view name, const std::vector<double>& ms) {
    const double med = median(ms);
    const auto [lo, hi] = std::minmax_element(ms.begin(), ms.end());
    fmt::print("  {:<6} median {:9.3f} ms/step  (min {:.3f}, max {:.3f}, {} steps)\n", name, med, *lo, *hi, ms.size());
    json += fmt::format(",\n  \"{0}_ms_median\": {1:.6f},\n  \"{0}_ms_min\": {2:.6f},\n  \"{0}_ms_max\": {3:.6f}", name,
                        med, *lo, *hi);
    return med;
  };
  double raw_median = 0.0, fabric_median = 0.0;
  if (run_raw) raw_median = report("raw", raw_ms);
  if (run_fabric) fabric_median = report("fabric", fabric_ms);
  if (run_raw && run_fabric) {
    const double ratio = fabric_median / raw_median;
    fmt::print("  ratio fabric/raw {:.4f} (target <= 1.01)\n", ratio);
    json += fmt::format(",\n  \"ratio\": {:.6f}", ratio);
  }
  json += "\n}\n";
  if (!config.json.empty()) write_text(config.json, json);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const Config config = parse_args(argc, argv, help);
    if (help) {
      std::fputs(usage.data(), stdout);
      return 0;
    }
    return run(config);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "bench_cpu_overhead: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cpu_overhead: %s\n", e.what());
    return 1;
  }
}
