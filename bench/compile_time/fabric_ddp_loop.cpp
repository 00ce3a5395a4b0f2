// bench/compile_time.sh, fabric DDP side: fabric_loop.cpp with fabric::DDP (fabric/distributed.hpp). Its twin,
// torch_loop.cpp, does the same with LibTorch alone; only their compile times are compared.

#include <torch/torch.h>
#include <fabric/distributed.hpp>

#include <cstddef>
#include <string>

namespace {

/// A map-style dataset of random samples.
struct RandomData : torch::data::datasets::Dataset<RandomData> {
  torch::data::Example<> get(std::size_t /*index*/) override {
    return {torch::randn({784}), torch::randint(0, 10, {}, torch::kLong)};
  }
  c10::optional<std::size_t> size() const override { return 1024; }
};

/// A two-layer perceptron.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(784, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

}  // namespace

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
