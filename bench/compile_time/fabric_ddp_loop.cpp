// bench/compile_time.sh, fabric DDP side: fabric_loop.cpp with fabric::DDP (fabric/distributed.hpp). Its twin,
// torch_loop.cpp, does the same with LibTorch alone; only their compile times are compared.

#include <torch/torch.h>
#include <fabric/distributed.hpp>
#include "workload.hpp"

#include <cstddef>
#include <string>

using bench_compile::Net;
using bench_compile::RandomData;

/// Trains for some epochs and saves a checkpoint; returns the last loss.
double train_with_fabric_ddp(int epochs, const std::string& checkpoint) {
  fabric::Fabric<fabric::CPU, fabric::DDP, fabric::FP32> fabric({.devices = 2});
  fabric.launch();
  fabric.seed_everything(42);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [model, optimizer] = fabric.setup(net, adamw);
  auto loader =
      fabric.dataloader(RandomData().map(torch::data::transforms::Stack<>()), {.batch_size = 64, .shuffle = true});
  double last = 0.0;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    model->train();
    for (auto& batch : loader) {
      const auto loss = torch::nn::functional::cross_entropy(model(batch.data), batch.target);
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();
      last = loss.item<double>();
    }
    fabric.print("epoch {} loss {:.4f}", epoch, last);
    fabric.save(checkpoint, {{"model", model}, {"optimizer", optimizer}, {"epoch", epoch}});
  }
  return last;
}
