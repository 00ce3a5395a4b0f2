// fabric::DP: one process, the batch split across the GPUs by LibTorch's data_parallel.

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fabric/fabric.hpp>

#include <torch/torch.h>

using Catch::Matchers::ContainsSubstring;

TEST_CASE("DP refuses a CPU device at construction, naming DDP", "[dp]") {
  if (fabric::CUDA::is_available()) SKIP("a GPU is visible: Auto picks CUDA here");
  try {
    fabric::Fabric<fabric::Auto, fabric::DP> fabric;
    FAIL("Fabric<Auto, DP> on a machine without GPU must throw");
  } catch (const fabric::Error& e) {
    CHECK_THAT(e.what(), ContainsSubstring("DP splits batches across GPUs: expected a CUDA device, found cpu") &&
                             ContainsSubstring("fabric::DDP"));
  }
}

TEST_CASE("DP refuses several machines", "[dp]") {
  fabric::DP dp;
  CHECK_THROWS_WITH(dp.setup_environment({.devices = 1, .num_nodes = 2}),
                    ContainsSubstring("expected num_nodes = 1, found 2"));
}

TEST_CASE("DP's collectives are those of one process (Lightning's dp)", "[dp]") {
  const fabric::DP dp;
  const auto t = torch::tensor({1.0, 2.0, 6.0});
  CHECK(dp.all_reduce(t, fabric::ReduceOp::mean).item<double>() == 3.0);
  CHECK(dp.all_reduce(t, fabric::ReduceOp::sum).item<double>() == 9.0);
  CHECK(dp.all_reduce(t, fabric::ReduceOp::max).item<double>() == 6.0);
  CHECK(dp.all_reduce(torch::tensor({1, 2}), fabric::ReduceOp::mean).item<double>() == 1.5);
  CHECK(torch::equal(dp.all_gather(t), t));
  CHECK(dp.broadcast(7, 0) == 7);
  CHECK_FALSE(dp.shards_data());
  CHECK(dp.world_size() == 1);
}

TEST_CASE("DP trains across every visible GPU and gathers outputs on the first", "[dp][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  const int gpus = fabric::CUDA::device_count();
  fabric::Fabric<fabric::CUDA, fabric::DP> fabric({.devices = gpus});
  torch::manual_seed(0);
  torch::nn::Sequential net(torch::nn::Linear(16, 32), torch::nn::ReLU(), torch::nn::Linear(32, 1));
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05));
  auto [model, optimizer] = fabric.setup(net, sgd);
  const auto x = torch::randn({64, 16});
  const auto y = x.sum(1, true).tanh();
  double first = 0;
  double last = 0;
  for (int step = 0; step < 100; ++step) {
    auto out = model(x);
    REQUIRE(out.device() == fabric.device());
    auto loss = torch::mse_loss(out, y.to(out.device()));
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  CHECK(last < 0.5 * first);
  {
    auto guard = fabric.no_backward_sync(model, true);  // warns once, does nothing
  }
  CHECK(net->parameters()[0].device() == fabric.device());
}
