// DP clones the module onto every GPU: a module that is not Cloneable is rejected at setup.
// EXPECT: fabric: DP replicates the module on every GPU with clone.*derive the module from torch::nn::Cloneable<M>
#include <fabric/fabric.hpp>

struct PlainImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Plain);

int main() {
  fabric::Fabric<fabric::CUDA, fabric::DP> fabric;
  Plain net;
  auto model = fabric.setup(net);
  return model(torch::ones({1})).numel() > 0 ? 0 : 1;
}
