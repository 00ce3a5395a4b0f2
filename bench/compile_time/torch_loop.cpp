// bench/compile_time.sh, LibTorch side: the training loop of fabric_loop.cpp written by hand with
// LibTorch alone; only their compile times are compared.

#include <torch/torch.h>
#include "workload.hpp"

#include <cstddef>
#include <cstdio>
#include <string>

using bench_compile::Net;
using bench_compile::RandomData;

/// Trains for some epochs and saves a checkpoint; returns the last loss.
double train_with_torch(int epochs, const std::string& checkpoint) {
  torch::manual_seed(42);
  torch::Device device(torch::kCPU);
  Net net;
  net->to(device);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3));
  auto loader = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
      RandomData().map(torch::data::transforms::Stack<>()), torch::data::DataLoaderOptions().batch_size(64));
  double last = 0.0;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    net->train();
    for (auto& batch : *loader) {
      const auto data = batch.data.to(device);
      const auto target = batch.target.to(device);
      const auto loss = torch::nn::functional::cross_entropy(net->forward(data), target);
      loss.backward();
      adamw.step();
      adamw.zero_grad();
      last = loss.item<double>();
    }
    std::printf("epoch %d loss %.4f\n", epoch, last);
    torch::serialize::OutputArchive archive;
    net->save(archive);
    torch::serialize::OutputArchive optimizer_archive;
    adamw.save(optimizer_archive);
    archive.write("optimizer", optimizer_archive);
    archive.write("epoch", torch::tensor(epoch));
    archive.save_to(checkpoint);
  }
  return last;
}
