// Passing a set-up wrapper to setup again is rejected at compile time.
// EXPECT: fabric: this module is already set up
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>

int main() {
  fabric::Fabric<> fabric;
  torch::nn::Linear net(2, 2);
  auto model = fabric.setup(net);
  auto again = fabric.setup(model);
  return 0;
}
