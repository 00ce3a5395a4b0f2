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
//     bench_cpu_overhead --progress     # the fabric loop also drives a fabric::ProgressBar and log()

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
  bool progress = false;
};

constexpr std::string_view description = R"(usage: bench_cpu_overhead [flags]

Times a training step of the mlp workload (Linear 784-1024-1024-10, ReLU, cross-entropy, batch
256, AdamW lr 1e-3) written by hand in LibTorch ("raw") and through fabric::Fabric<CPU,
SingleDevice, FP32> ("fabric"), interleaved in blocks of steps, and prints the median ms/step of
each and the ratio fabric/raw.)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Config> parse_args(int argc, char** argv) {
  Config config;
  std::string mode = "both";
  CLI::App app(std::string(description), "bench_cpu_overhead");
  configure(app, 19);
  add_int(app, "--steps", config.steps, 1, "timed steps of each loop (default 30)");
  add_int(app, "--warmup", config.warmup, 0, "untimed steps of each loop first (default 10)");
  add_int(app, "--block", config.block, 1, "steps of one loop before switching to the other (default 5)");
  add_choice(app, "--mode", mode, {"raw", "fabric", "both"},
             "raw, fabric or both (default both); one loop only is for callgrind")
      ->type_name("M");
  add_int(app, "--threads", config.threads, 1, "intra-op threads of LibTorch (default: LibTorch's choice)");
  app.add_flag("--progress", config.progress,
               "the fabric loop also logs a metric and reports the batch to a\nfabric::ProgressBar each step "
               "(drawn to /dev/null)");
  app.add_option("--json", config.json, "also write the results to PATH as JSON")->type_name("PATH");
  if (!parse(app, argc, argv)) return std::nullopt;
  config.mode = mode == "raw" ? Mode::raw : mode == "fabric" ? Mode::fabric : Mode::both;
  return config;
}

/// Builds the model from a fixed seed, so both loops start from the same weights.
Mlp make_model() { return build<Mlp>({}); }

using Clock = std::chrono::steady_clock;
using Fabric = fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32>;
/// With --progress: a progress bar among the callbacks, drawn as on a terminal but into /dev/null.
using ProgressFabric = fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, fabric::ProgressBar>;

/// /dev/null, open while the benchmark runs.
std::FILE* dev_null() {
  static std::FILE* file = std::fopen("/dev/null", "w");
  if (file == nullptr) throw std::runtime_error("bench_cpu_overhead: cannot open /dev/null");
  return file;
}

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

/// The same loop through fabric; with a ProgressBar, each step also logs the previous step's time
/// (a plain double: no device sync) and reports the batch, as a training loop with a bar does.
template <class F>
class FabricLoop {
 public:
  static constexpr bool with_progress = fabric::contains_v<fabric::ProgressBar, typename F::callbacks_type>;

  FabricLoop(const torch::Tensor& x, const torch::Tensor& y)
      : x_(x),
        y_(y),
        net_(make_model()),
        adamw_(net_->parameters(), torch::optim::AdamWOptions(1e-3)),
        fabric_(make_fabric()),
        wrapped_(fabric_.setup(net_, adamw_)) {
    if constexpr (with_progress) fabric_.call(fabric::hooks::on_train_epoch_start, 0, std::int64_t{1} << 40);
  }
  double step() {
    auto& [model, optimizer] = wrapped_;
    const auto start = Clock::now();
    const auto loss = torch::nn::functional::cross_entropy(model(x_), y_);
    fabric_.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    if constexpr (with_progress) {
      const auto before = Clock::now();
      fabric_.log("step_ms", last_ms_, batch_);
      fabric_.call(fabric::hooks::on_train_batch_end, batch_++);
      progress_us_.push_back(std::chrono::duration<double, std::micro>(Clock::now() - before).count());
    }
    last_ms_ = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    return last_ms_;
  }

 private:
  using Wrapped = decltype(std::declval<F&>().setup(std::declval<Mlp&>(), std::declval<torch::optim::AdamW&>()));

  static F make_fabric() {
    if constexpr (with_progress) {
      return F({}, fabric::ProgressBar({.stream = dev_null(), .mode = fabric::ProgressBar::Mode::bar, .width = 120}));
    } else {
      return F{};
    }
  }

  torch::Tensor x_, y_;
  Mlp net_;
  torch::optim::AdamW adamw_;
  F fabric_;
  Wrapped wrapped_;  // the (model, optimizer) that fabric_.setup returned
  std::int64_t batch_ = 0;
  double last_ms_ = 0.0;

 public:
  std::vector<double> progress_us_;  // the time of log() + on_train_batch_end in each step
};

template <class F>
int run(const Config& config) {
  if (config.threads > 0) torch::set_num_threads(config.threads);
  const bool run_raw = config.mode != Mode::fabric;
  const bool run_fabric = config.mode != Mode::raw;

  torch::manual_seed(1);
  const torch::Tensor x = torch::rand({256, 784}) * 0.9 + 0.1;  // in [0.1, 1): no zeros
  const torch::Tensor y = torch::randint(0, 10, {256}, torch::kLong);

  std::optional<RawLoop> raw;
  std::optional<FabricLoop<F>> fab;
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
      "mode {}, {} thread{}{}\n",
      config.steps, config.warmup, config.block, mode_name, torch::get_num_threads(),
      torch::get_num_threads() == 1 ? "" : "s", config.progress ? ", fabric with a ProgressBar" : "");
  Json json = {{"workload", "mlp"},
               {"batch_size", 256},
               {"steps", config.steps},
               {"warmup", config.warmup},
               {"block", config.block},
               {"mode", mode_name},
               {"threads", torch::get_num_threads()},
               {"progress", config.progress}};
  const auto report = [&](std::string_view name, const std::vector<double>& ms) {
    const double med = median(ms);
    const auto [lo, hi] = std::minmax_element(ms.begin(), ms.end());
    fmt::print("  {:<6} median {:9.3f} ms/step  (min {:.3f}, max {:.3f}, {} steps)\n", name, med, *lo, *hi, ms.size());
    json[fmt::format("{}_ms_median", name)] = med;
    json[fmt::format("{}_ms_min", name)] = *lo;
    json[fmt::format("{}_ms_max", name)] = *hi;
    return med;
  };
  double raw_median = 0.0, fabric_median = 0.0;
  if (run_raw) raw_median = report("raw", raw_ms);
  if (run_fabric) fabric_median = report("fabric", fabric_ms);
  if (run_raw && run_fabric) {
    const double ratio = fabric_median / raw_median;
    fmt::print("  ratio fabric/raw {:.4f} (target <= 1.01)\n", ratio);
    json["ratio"] = ratio;
  }
  if (run_fabric && config.progress) {
    // NOTE: the warm-up steps' share is dropped; what is left are the timed steps.
    const std::vector<double> us(fab->progress_us_.end() - static_cast<std::ptrdiff_t>(fabric_ms.size()),
                                 fab->progress_us_.end());
    const double med = median(us);
    fmt::print(
        "  progress bar: log() + on_train_batch_end median {:.2f} us/step, max {:.2f} us, {:.5f}% of the "
        "fabric step\n",
        med, *std::max_element(us.begin(), us.end()), 100.0 * med / 1000.0 / fabric_median);
    json["progress_us_median"] = med;
    json["progress_share"] = med / 1000.0 / fabric_median;
  }
  if (!config.json.empty()) write_json(config.json, json);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_cpu_overhead", [&] {
    const std::optional<Config> config = parse_args(argc, argv);
    if (!config) return 0;
    return config->progress ? run<ProgressFabric>(*config) : run<Fabric>(*config);
  });
}
