// bench_optim_step: the optimizer step alone, LibTorch's own step() against fabric's multi-tensor
// step (fabric::detail::optimizer_step), on the parameter list of GPT-2 small (148 tensors, 124.5 M
// parameters: wte 50304x768, wpe 1024x768, 12 blocks of LayerNorm, attention 768x2304 + 768x768,
// MLP 768x3072 + 3072x768 with biases, final LayerNorm).
//
// Both optimizers own an identical copy of the parameters and get the same random gradients, drawn
// once. The two steps run in alternating blocks (the one that goes first flips every round); each
// step is timed with a steady clock after synchronizing the device. It prints the median ms/step of
// each and the ratio fast/own.
//
//     bench_optim_step                                  # AdamW (wd 0.1) on the CPU, 10 steps each
//     bench_optim_step --device cuda --steps 50 --optimizer adam
//     bench_optim_step --layers 2 --vocab 4096          # a smaller model

#include "common.hpp"

#include <torch/cuda.h>
#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Config {
  int steps = 10;
  int warmup = 2;
  int block = 2;
  int layers = 12;
  int vocab = 50304;
  int threads = 0;
  std::string device = "cpu";
  std::string optimizer = "adamw";
};

constexpr std::string_view description = R"(usage: bench_optim_step [flags]

Times the optimizer step alone on GPT-2 small's parameters: LibTorch's own step() against fabric's
multi-tensor step, in alternating blocks; prints the median ms/step of each and the ratio fast/own.)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Config> parse(int argc, char** argv) {
  Config c;
  CLI::App app(std::string(description), "bench_optim_step");
  bench::configure(app, 33);
  bench::add_choice(app, "--device", c.device, {"cpu", "cuda"}, "where the parameters live (default cpu)")
      ->type_name("cpu|cuda");
  bench::add_choice(app, "--optimizer", c.optimizer, {"adamw", "adam", "sgd"},
                    "AdamW lr 6e-4 wd 0.1 (default), Adam lr 6e-4, SGD lr 0.1 momentum 0.9 nesterov")
      ->type_name("adamw|adam|sgd");
  bench::add_int(app, "--steps", c.steps, 1, "timed steps of each (default 10)");
  bench::add_int(app, "--warmup", c.warmup, 0, "untimed steps of each first (default 2)");
  bench::add_int(app, "--block", c.block, 1, "steps per block of the alternation (default 2)");
  bench::add_int(app, "--layers", c.layers, 0, "transformer blocks (default 12)");
  bench::add_int(app, "--vocab", c.vocab, 1, "vocabulary size (default 50304)");
  bench::add_int(app, "--threads", c.threads, 0, "intra-op threads of LibTorch (default: LibTorch's choice)");
  if (!bench::parse(app, argc, argv)) return std::nullopt;
  return c;
}

/// The shapes of GPT-2 small's parameters (head tied to wte).
std::vector<std::vector<int64_t>> gpt2_shapes(int layers, int vocab) {
  constexpr int64_t width = 768, context = 1024;
  std::vector<std::vector<int64_t>> shapes{{vocab, width}, {context, width}};
  for (int l = 0; l < layers; ++l) {
    for (const auto& s : std::vector<std::vector<int64_t>>{{width},
                                                           {width},
                                                           {3 * width, width},
                                                           {3 * width},
                                                           {width, width},
                                                           {width},
                                                           {width},
                                                           {width},
                                                           {4 * width, width},
                                                           {4 * width},
                                                           {width, 4 * width},
                                                           {width}}) {
      shapes.push_back(s);
    }
  }
  shapes.push_back({width});
  shapes.push_back({width});
  return shapes;
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name, std::vector<torch::Tensor> params) {
  if (name == "adam") return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(6e-4));
  if (name == "sgd") {
    return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true));
  }
  return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(6e-4).weight_decay(0.1));
}

int run(const Config& config) {
  if (config.threads > 0) torch::set_num_threads(config.threads);
  const bool cuda = config.device == "cuda";
  if (cuda && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device here");
  const torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  auto sync = [&] {
    if (cuda) torch::cuda::synchronize();
  };

  torch::manual_seed(0);
  std::vector<torch::Tensor> own_params, fast_params;
  int64_t numel = 0;
  for (const auto& shape : gpt2_shapes(config.layers, config.vocab)) {
    auto p = (torch::randn(shape, device) * 0.02).requires_grad_();
    auto q = p.detach().clone().requires_grad_();
    auto g = torch::randn(shape, device) * 1e-3;
    p.mutable_grad() = g;
    q.mutable_grad() = g.clone();
    numel += p.numel();
    own_params.push_back(p);
    fast_params.push_back(q);
  }
  auto own = make_optimizer(config.optimizer, own_params);
  auto fast = make_optimizer(config.optimizer, fast_params);

  using Clock = std::chrono::steady_clock;
  auto time_own = [&] {
    sync();
    const auto start = Clock::now();
    own->step();
    sync();
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  };
  auto time_fast = [&] {
    sync();
    const auto start = Clock::now();
    fabric::detail::optimizer_step(*fast, nullptr);
    sync();
    return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  };
  for (int i = 0; i < config.warmup; ++i) {
    time_own();
    time_fast();
  }
  const std::string path = bench::kernels_name();
  std::vector<double> own_ms, fast_ms;
  for (int round = 0; static_cast<int>(own_ms.size()) < config.steps; ++round) {
    const int n = std::min(config.block, config.steps - static_cast<int>(own_ms.size()));
    auto run_own = [&] {
      for (int i = 0; i < n; ++i) own_ms.push_back(time_own());
    };
    auto run_fast = [&] {
      for (int i = 0; i < n; ++i) fast_ms.push_back(time_fast());
    };
    if (round % 2 == 0) {
      run_own();
      run_fast();
    } else {
      run_fast();
      run_own();
    }
  }
  double max_diff = 0;
  for (std::size_t i = 0; i < own_params.size(); ++i) {
    max_diff = std::max(max_diff, (own_params[i] - fast_params[i]).abs().max().item<double>());
  }
  std::printf("optimizer step, %s, %s, %zu tensors, %.1f M parameters, %d threads, LibTorch %s\n",
              config.optimizer.c_str(), config.device.c_str(), own_params.size(), numel / 1e6, torch::get_num_threads(),
              TORCH_VERSION);
  std::printf("own step():        %9.2f ms/step (median of %zu)\n", bench::median(own_ms), own_ms.size());
  std::printf("fabric fast step:  %9.2f ms/step (median of %zu, %s kernels)\n", bench::median(fast_ms), fast_ms.size(),
              path.c_str());
  std::printf("ratio fast/own:    %9.3f\n", bench::median(fast_ms) / bench::median(own_ms));
  std::printf("max |param difference| after %zu steps: %.3g\n", own_ms.size() + config.warmup, max_diff);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_optim_step", [&] {
    const std::optional<Config> config = parse(argc, argv);
    return config ? run(*config) : 0;
  });
}
