// A temporary module object cannot be kept alive by the wrapper.
// EXPECT: fabric: setup cannot keep a temporary module object alive
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>

int main() {
  fabric::Fabric<> fabric;
  auto model = fabric.setup(torch::nn::LinearImpl(2, 2));
  return 0;
}
