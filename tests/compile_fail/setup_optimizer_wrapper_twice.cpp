// Passing a set-up optimizer to setup_optimizers again is rejected at compile time.
// EXPECT: fabric: this optimizer is already set up
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

int main() {
  fabric::Fabric<> fabric;
  torch::nn::Linear net(2, 2);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto optimizer = fabric.setup_optimizers(sgd);
  auto again = fabric.setup_optimizers(optimizer);
  return 0;
}
