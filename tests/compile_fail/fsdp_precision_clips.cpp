// FSDP clips the sharded gradients over every process's shards: a precision with its own clip_gradients
// (fabric::ClipsGradients) is refused there rather than skipped.
// EXPECT: fabric: FSDP clips the sharded gradients itself
#include <fabric/distributed.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <optional>
#include <string_view>

struct OwnClip : fabric::FP32 {
  static constexpr std::string_view name = "own-clip";
  template <class O>
  std::optional<at::Tensor> clip_gradients(O& /*optimizer*/, const fabric::ClipOptions& /*options*/,
                                           const c10::Device& /*device*/) {
    return std::nullopt;
  }
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::FSDP, OwnClip> fabric;
  torch::nn::Linear net(2, 2);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  fabric.clip_gradients(model, optimizer, {.max_norm = 1.0});
  return 0;
}
