// no_backward_sync needs the wrapper setup() returned.
// EXPECT: fabric: no_backward_sync needs the module returned by setup
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>

int main() {
  fabric::Fabric<> fabric;
  torch::nn::Linear net(2, 2);
  auto guard = fabric.no_backward_sync(net);
  return 0;
}
