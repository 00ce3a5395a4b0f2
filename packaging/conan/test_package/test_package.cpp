// One training step of a tiny model on the CPU through an installed fabric.
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <cstdio>

int main() {
  fabric::Fabric<fabric::CPU> fabric;
  torch::nn::Linear net(4, 1);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05));
  auto [model, optimizer] = fabric.setup(net, sgd);

  const auto x = torch::ones({8, 4});
  const float before = model(x).pow(2).mean().item<float>();
  auto loss = model(x).pow(2).mean();
  fabric.backward(loss);
  optimizer.step();
  optimizer.zero_grad();
  const float after = model(x).pow(2).mean().item<float>();

  std::printf("test_package: fabric %s, loss %.4f -> %.4f after one step\n", fabric::version().data(), before, after);
  return after < before ? 0 : 1;
}
