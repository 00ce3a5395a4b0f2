#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cstdio>

int second_world_size();

int main() {
  fabric::Fabric<> fabric;
  torch::nn::Linear net(3, 1);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  const auto x = torch::ones({4, 3});
  const float before = model(x).pow(2).mean().item<float>();
  for (int i = 0; i < 20; ++i) {
    auto loss = model(x).pow(2).mean();
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
  }
  const float after = model(x).pow(2).mean().item<float>();
  std::printf("consumer: fabric %s, loss %.4f -> %.4f\n", fabric::version().data(), before, after);
  return after < before && second_world_size() == 1 ? 0 : 1;
}
