// Step time of the mlp workload with DDP over Gloo against one process on the same global batch
// (bench/README.md, "DDP on the CPU"). One binary, two modes:
//
//     bench_ddp_step --devices 1 [--threads T]     one process, the whole global batch per step
//     bench_ddp_step --devices N [--threads T]     N processes (fabric.launch()), global batch / N each
//
// Prints the median ms/step of rank 0 and, with --json, writes it.

#include <fabric/distributed.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
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

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto next = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      return std::string(argv[++i]);
    };
    if (flag == "--devices") {
      a.devices = std::stoi(next());
    } else if (flag == "--steps") {
      a.steps = std::stoi(next());
    } else if (flag == "--warmup") {
      a.warmup = std::stoi(next());
    } else if (flag == "--batch") {
      a.batch = std::stoi(next());
    } else if (flag == "--threads") {
      a.threads = std::stoi(next());
    } else if (flag == "--json") {
      a.json = next();
    } else {
      throw std::invalid_argument("unknown flag " + flag +
                                  "; flags: --devices N --steps N --warmup N --batch N --threads N --json PATH");
    }
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

int main(int argc, char** argv) try {
  const Args a = parse(argc, argv);
  if (a.batch % a.devices != 0) throw std::invalid_argument("--batch must be divisible by --devices");
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
    std::ofstream(a.json) << "{\"processes\": " << world << ", \"threads\": " << a.threads
                          << ", \"global_batch\": " << a.batch << ", \"ms_per_step\": " << median << "}\n";
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_ddp_step: %s\n", e.what());
  return 1;
}
