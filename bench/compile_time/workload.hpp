#pragma once
// bench/compile_time.sh: the model and data set its translation units share (they differ only in the
// training loop around them).

#include <torch/torch.h>

#include <cstddef>

namespace bench_compile {

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

}  // namespace bench_compile
