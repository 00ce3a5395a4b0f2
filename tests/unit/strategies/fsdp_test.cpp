// fabric::FSDP in one process (rank 0 of 1 over a real Gloo group): Lightning's strategies/test_fsdp.py where
// one process shows it; tests/dist/fsdp_worker.cpp trains on 2 and 3 processes against one.

#include <fabric/distributed.hpp>

#include "unit/solo_ddp.hpp"

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <chrono>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

fabric::FSDP solo(fabric::FSDP::Options options = {}) {
  require_gloo();
  options.cluster_environment = SoloEnvironment{};
  return fabric::FSDP(std::move(options));
}

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(3, 5))), fc2(register_module("fc2", torch::nn::Linear(5, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

Net make_net() {
  torch::manual_seed(3);
  return Net();
}

}  // namespace

// Lightning: tests_fabric/strategies/test_fsdp.py::test_sharding_strategy
TEST_CASE("FSDP's sharding strategy: FULL_SHARD by default, as Lightning's", "[fsdp][options]") {
  CHECK(fabric::FSDP().options().sharding_strategy == fabric::ShardingStrategy::FULL_SHARD);
  CHECK(fabric::FSDP().sharded());
  CHECK(fabric::FSDP().full_shard());
  const fabric::FSDP grads({.sharding_strategy = fabric::ShardingStrategy::SHARD_GRAD_OP});
  CHECK(grads.sharded());
  CHECK_FALSE(grads.full_shard());
  const fabric::FSDP none({.sharding_strategy = fabric::ShardingStrategy::NO_SHARD});
  CHECK_FALSE(none.sharded());
}

// Lightning: tests_fabric/strategies/test_fsdp.py::test_set_timeout
TEST_CASE("FSDP's timeout reaches the parallel base", "[fsdp][options]") {
  const fabric::FSDP fsdp({.timeout = std::chrono::seconds(42)});
  CHECK(fsdp.parallel_options().timeout == std::chrono::seconds(42));
  CHECK(fsdp.options().timeout == std::chrono::seconds(42));
}

// Lightning: tests_fabric/strategies/test_fsdp.py::test_no_backward_sync
TEST_CASE("FSDP's no_backward_sync keeps whole gradients in the parameters until the synced backward",
          "[fsdp][no_backward_sync]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  torch::optim::SGD sgd(net->parameters(), 0.1);
  auto [model, optimizer] = fabric.setup(net, sgd);
  auto& state = *model.strategy_state().fsdp;
  const auto x = torch::ones({4, 3});
  {
    auto guard = fabric.no_backward_sync(model, /*enabled=*/false);
    CHECK(state.sync);
  }
  {
    auto guard = fabric.no_backward_sync(model);
    CHECK_FALSE(state.sync);
    fabric.backward(model(x).sum());
    CHECK(net->fc1->weight.grad().defined());  // unsharded, in the parameter
    CHECK_FALSE(optimizer->param_groups()[0].params()[0].grad().defined());
  }
  CHECK(state.sync);
  fabric.backward(model(x).sum());
  CHECK_FALSE(net->fc1->weight.grad().defined());  // reduced into the shard and freed
  CHECK(optimizer->param_groups()[0].params()[0].grad().defined());
}

// Lightning: tests_fabric/test_connector.py::test_fsdp_unsupported_on_cpu
// (Lightning's FSDP refuses the CPU; fabric's runs there, over Gloo: this test and tests/dist train on it.)
TEST_CASE("FSDP trains on the CPU in one process exactly as one device does", "[fsdp][train]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net reference = make_net();
  Net net = make_net();
  torch::optim::AdamW ref_opt(reference->parameters(), torch::optim::AdamWOptions(0.01));
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(0.01));
  auto [model, optimizer] = fabric.setup(net, adamw);
  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn({4, 3});
    fabric.backward(model(x).pow(2).sum());
    optimizer.step();
    optimizer.zero_grad();
    reference(x).pow(2).sum().backward();
    ref_opt.step();
    ref_opt.zero_grad();
  }
  auto full = fabric.strategy().summon_full_params(model.strategy_state());
  const auto a = net->parameters();
  const auto b = reference->parameters();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(torch::allclose(a[i], b[i], 1e-6, 1e-7));
}

// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_setup_with_orig_params_and_multiple_param_groups
TEST_CASE("FSDP steps an optimizer's parameter groups with their own settings", "[fsdp][optimizer]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  auto model = fabric.setup_module(net);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(net->fc1->parameters(), std::make_unique<torch::optim::SGDOptions>(0.1));
  groups.emplace_back(net->fc2->parameters(), std::make_unique<torch::optim::SGDOptions>(0.0));
  torch::optim::SGD sgd(std::move(groups), torch::optim::SGDOptions(0.1));
  auto optimizer = fabric.setup_optimizers(sgd);
  REQUIRE(optimizer->param_groups().size() == 2);
  auto& fsdp = fabric.strategy();
  const auto [fc1_before, fc2_before] = [&] {
    auto full = fsdp.summon_full_params(model.strategy_state());
    return std::pair{net->fc1->weight.clone(), net->fc2->weight.clone()};
  }();
  fabric.backward(model(torch::ones({2, 3})).sum());
  optimizer.step();
  auto full = fsdp.summon_full_params(model.strategy_state());
  CHECK_FALSE(torch::equal(net->fc1->weight, fc1_before));
  CHECK(torch::equal(net->fc2->weight, fc2_before));  // lr 0
}

TEST_CASE("FSDP refuses an optimizer over parameters no set-up module has, or one that stepped", "[fsdp][optimizer]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  torch::optim::SGD stepped(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (auto& p : net->parameters()) p.mutable_grad() = torch::ones_like(p);
  stepped.step();
  auto model = fabric.setup_module(net);
  auto stranger = torch::zeros({3}, torch::requires_grad());
  torch::optim::SGD foreign({stranger}, 0.1);
  CHECK_THROWS_WITH(fabric.setup_optimizers(foreign),
                    ContainsSubstring("is not a parameter of a module set up with FSDP"));
  CHECK_THROWS_WITH(fabric.setup_optimizers(stepped), ContainsSubstring("set up the optimizer before its first step"));
}

TEST_CASE("FSDP refuses a module with nothing to train", "[fsdp][setup]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  for (auto& p : net->parameters()) p.set_requires_grad(false);
  CHECK_THROWS_WITH(fabric.setup_module(net), ContainsSubstring("expected a module with parameters that require grad"));
}

namespace {

struct BlockImpl : torch::nn::Module {
  BlockImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::tanh(fc(x)); }
  torch::nn::Linear fc;
};
FABRIC_UNIT(Block);

struct PlainBlockImpl : BlockImpl {};
TORCH_MODULE(PlainBlock);

struct DeepImpl : torch::nn::Module {
  DeepImpl() : head(register_module("head", torch::nn::Linear(4, 1))) {
    for (int i = 0; i < 2; ++i) blocks.push_back(register_module("block" + std::to_string(i), Block()));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& b : blocks) x = b(x);
    return head(x);
  }
  std::vector<Block> blocks;
  torch::nn::Linear head;
};
TORCH_MODULE(Deep);

}  // namespace

TEST_CASE("FULL_SHARD holds only the shards at rest and gathers a unit for its forward and backward",
          "[fsdp][full_shard]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo({.units = fabric::module_types<BlockImpl>()}), {});
  fabric.launch();
  torch::manual_seed(5);
  Deep reference;
  torch::manual_seed(5);
  Deep net;
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto [model, optimizer] = fabric.setup(net, sgd);
  auto& state = *model.strategy_state().fsdp;
  REQUIRE(state.units.size() == 3);  // two blocks and the root (head)
  CHECK(state.units[2]->name == "the root module");
  for (const auto& unit : state.units) {
    CHECK_FALSE(unit->gathered);
    CHECK(unit->flat.storage().nbytes() == 0);
  }
  const auto held = fabric.strategy().memory(model.strategy_state());
  CHECK(held.parameters == (2 * 20 + 5) * 4);  // one process: the shards are the parameters
  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn({3, 4});
    fabric.backward(model(x).pow(2).sum());
    for (const auto& unit : state.units) CHECK_FALSE(unit->gathered);  // freed again after backward
    optimizer.step();
    optimizer.zero_grad();
    reference(x).pow(2).sum().backward();
    ref_opt.step();
    ref_opt.zero_grad();
  }
  {
    torch::NoGradGuard no_grad;
    const auto x = torch::randn({3, 4});
    CHECK(torch::allclose(model(x), reference(x), 1e-6, 1e-6));
    for (const auto& unit : state.units) CHECK_FALSE(unit->gathered);
  }
  auto full = fabric.strategy().summon_full_params(model.strategy_state());
  const auto a = net->parameters();
  const auto b = reference->parameters();
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(torch::allclose(a[i], b[i], 1e-6, 1e-7));
}

TEST_CASE("FSDP refuses a module of a unit type that was not made through FABRIC_UNIT", "[fsdp][full_shard]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo({.units = fabric::module_types<BlockImpl>()}), {});
  fabric.launch();
  auto net = std::make_shared<torch::nn::Module>();
  net->register_module("plain", PlainBlock());
  CHECK_THROWS_WITH(fabric.setup_module(net), ContainsSubstring("declare its type with FABRIC_UNIT(Name)"));
}

// Lightning: tests_fabric/strategies/test_fsdp.py::test_save_checkpoint_unknown_state_dict_type
TEST_CASE("FSDP refuses an unknown state_dict_type", "[fsdp][checkpoint]") {
  CHECK_THROWS_WITH((fabric::Fabric<fabric::CPU, fabric::FSDP>({}, solo({.state_dict_type = "foo"}), {})),
                    ContainsSubstring("unknown state_dict_type \"foo\"; expected \"sharded\" or \"full\""));
}

// Lightning: tests_fabric/strategies/test_fsdp.py::test_load_unknown_checkpoint_type
// Lightning: tests_fabric/strategies/test_fsdp.py::test_load_raw_checkpoint_optimizer_unsupported
TEST_CASE("FSDP's load refuses a path that is no checkpoint, and load_raw a sharded optimizer", "[fsdp][checkpoint]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  torch::optim::SGD sgd(net->parameters(), 0.1);
  auto [model, optimizer] = fabric.setup(net, sgd);
  CHECK_THROWS_WITH(fabric.load("/nonexistent/fsdp-checkpoint", {{"model", model}}),
                    ContainsSubstring("does not point to a valid checkpoint"));
  CHECK_THROWS_WITH(fabric.load_raw("/nonexistent/optimizer.pt", optimizer),
                    ContainsSubstring("loading a single optimizer object from a file is not supported with FSDP"));
}

TEST_CASE("FSDP refuses 16-mixed with sharded gradients", "[fsdp][precision]") {
  fabric::Fabric<fabric::CPU, fabric::FSDP, fabric::FP16Mixed> fabric({}, solo(), {});
  fabric.launch();
  Net net = make_net();
  torch::optim::SGD sgd(net->parameters(), 0.1);
  auto [model, optimizer] = fabric.setup(net, sgd);
  fabric.backward(model(torch::ones({2, 3})).sum());
  CHECK_THROWS_WITH(optimizer.step(), ContainsSubstring("use bf16-mixed, or sharding_strategy = NO_SHARD"));
}
