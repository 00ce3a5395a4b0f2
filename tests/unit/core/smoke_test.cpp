#include <fabric/fabric.hpp>
#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>

TEST_CASE("smoke") {
  fabric::Fabric<> fabric;
  torch::nn::Linear net(4, 2);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  auto x = torch::randn({8, 4});
  auto loss = model(x).pow(2).mean();
  fabric.backward(loss);
  optimizer.step();
  optimizer.zero_grad();
  fabric.save("/tmp/fab/last.ckpt", {{"model", model}, {"optimizer", optimizer}, {"epoch", 3}});
  fabric::State st{{"model", model}, {"optimizer", optimizer}, {"epoch", 0}};
  auto rest = fabric.load("/tmp/fab/last.ckpt", st);
  CHECK(st.at("epoch").get<int>() == 3);
}
