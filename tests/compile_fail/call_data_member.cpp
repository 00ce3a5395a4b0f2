// model.call takes a method of the module (Lightning's mark_forward_method refuses an attribute too).
// EXPECT: fabric: model.call\(method, args...\) runs a method of the module; a data member is no method
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>

struct NetImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
  int attribute = 1;
};

int main() {
  fabric::Fabric<> fabric;
  NetImpl net;
  auto model = fabric.setup(net);
  return model.call(&NetImpl::attribute);
}
