// Step time of the mlp workload with DDP over Gloo against one process on the same global batch
// (bench/README.md, "DDP on the CPU"). One binary, two modes:
//
//     bench_ddp_step --devices 1 [--threads T]     one process, the whole global batch per step
//     bench_ddp_step --devices N [--threads T]     N processes (fabric.launch()), global batch / N each
//
// Prints the median ms/step of rank 0 and, with --json, writes it (bench_ddp_step --help lists the flags).

#include <fabric/distributed.hpp>
#include "common.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

struct Args {
  int devices = 1;
  int steps = 30;
  int warmup = 10;
  int batch = 256;
  int threads = 1;
  std::string json;
};

constexpr std::string_view description = R"(usage: bench_ddp_step [flags]

The step time of the mlp workload with DDP over Gloo (--devices N > 1: N processes started by
fabric.launch(), the global batch split between them) or in one process (--devices 1); prints the
median ms/step of rank 0.)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Args> parse(int argc, char** argv) {
  Args a;
  CLI::App app(std::string(description), "bench_ddp_step");
  bench::configure(app, 17);
  bench::add_int(app, "--devices", a.devices, 1, "processes (default 1)");
  bench::add_int(app, "--steps", a.steps, 1, "timed steps (default 30)");
  bench::add_int(app, "--warmup", a.warmup, 0, "untimed steps first (default 10)");
  bench::add_int(app, "--batch", a.batch, 1, "global batch (default 256)");
  bench::add_int(app, "--threads", a.threads, 1, "intra-op threads of LibTorch per process (default 1)");
  app.add_option("--json", a.json, "rank 0 writes the result to PATH")->type_name("PATH");
  if (!bench::parse(app, argc, argv)) return std::nullopt;
  if (a.batch % a.devices != 0) {
    throw bench::UsageError(fmt::format("expected --batch divisible by --devices = {}, found {}", a.devices, a.batch));
  }
  return a;
}

template <class F>
double run(F& fabric, const Args& a) {
  torch::manual_seed(0);
  auto net = torch::nn::Sequential(torch::nn::Linear(784, 1024), torch::nn::ReLU(), torch::nn::Linear(1024, 1024),
                                   torch::nn::ReLU(), torch::nn::Linear(1024, 10));
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [model, optimizer] = fabric.setup(net, adamw);
  const int local = a.batch / fabric.world_size();
  auto x = torch::randn({local, 784});
  auto y = torch::randint(10, {local});
  std::vector<double> ms;
  for (int step = 0; step < a.warmup + a.steps; ++step) {
    fabric.barrier();
    const auto start = std::chrono::steady_clock::now();
    auto loss = torch::nn::functional::cross_entropy(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    const auto stop = std::chrono::steady_clock::now();
    if (step >= a.warmup) ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_ddp_step", [&] {
    const std::optional<Args> args = parse(argc, argv);
    if (!args) return 0;
    const Args& a = *args;
    torch::set_num_threads(a.threads);
    double median = 0;
    int world = 1;
    if (a.devices == 1) {
      fabric::Fabric<fabric::CPU> fabric;
      median = run(fabric, a);
    } else {
      fabric::Fabric<fabric::CPU, fabric::DDP> fabric({.devices = a.devices});
      fabric.launch();
      median = run(fabric, a);
      world = fabric.world_size();
      if (!fabric.is_global_zero()) return 0;
    }
    std::printf("mlp cpu: %d process(es) x %d thread(s), global batch %d: %.2f ms/step (median of %d)\n", world,
                a.threads, a.batch, median, a.steps);
    if (!a.json.empty()) {
      bench::write_json(
          a.json, {{"processes", world}, {"threads", a.threads}, {"global_batch", a.batch}, {"ms_per_step", median}});
    }
    return 0;
  });
}
