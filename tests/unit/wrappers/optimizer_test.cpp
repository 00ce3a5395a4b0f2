// fabric::Optimizer: what its members hand to the strategy (Lightning's test_wrappers.py), and the step
// check: a step of the LibTorch optimizer behind a set-up optimizer is an error at the next backward
// where it would skip the gradient scaler or the on_after_optimizer_step hooks.

#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <string>
#include <type_traits>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

/// A strategy that records what the wrappers hand it (Lightning's Mock(spec=Strategy)), then does
/// SingleDevice's work.
struct Recording : fabric::SingleDevice {
  static constexpr std::string_view name = "recording";
  std::vector<const torch::optim::Optimizer*> stepped{};
  std::vector<bool> with_closure{};
  int saves = 0;
  template <class O, class P, class Closure>
  at::Tensor optimizer_step(O& optimizer, P& precision, Closure&& closure) {
    stepped.push_back(&optimizer);
    with_closure.push_back(static_cast<bool>(closure));
    (void)fabric::SingleDevice::optimizer_step(optimizer, precision, std::forward<Closure>(closure));
    return torch::tensor(123);
  }
  void save_checkpoint(const std::filesystem::path& path, const fabric::State& state) {
    ++saves;
    fabric::SingleDevice::save_checkpoint(path, state);
  }
};

using CpuFabric = fabric::Fabric<fabric::CPU>;

}  // namespace

// Lightning: tests_fabric/test_wrappers.py::test_fabric_optimizer_wraps
TEST_CASE("the optimizer wrapper gives the original optimizer and is named by its type", "[wrappers][optimizer]") {
  // NOTE: Lightning's wrapper imitates the class (isinstance, the name "FabricSGD"); fabric's wrapper
  // keeps the type: fabric::OptimizerOf<W, torch::optim::SGD> takes it.
  CpuFabric fabric;
  torch::nn::Linear net(1, 1);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  CHECK(&optimizer.optimizer() == &sgd);
  CHECK(&*optimizer == &sgd);
  CHECK(optimizer.operator->() == &sgd);
  STATIC_REQUIRE(fabric::OptimizerOf<decltype(optimizer), torch::optim::SGD>);
  STATIC_REQUIRE(fabric::OptimizerOf<decltype(optimizer), torch::optim::Optimizer>);
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<decltype(optimizer), torch::optim::Adam>);
  STATIC_REQUIRE(std::is_same_v<decltype(optimizer)::optimizer_type, torch::optim::SGD>);
  (void)model;
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_optimizer_state_dict
TEST_CASE("a set-up optimizer's state is saved through the strategy", "[wrappers][optimizer][checkpoint]") {
  // NOTE: LibTorch optimizers have no state_dict(); their state goes to a checkpoint as an entry of
  // fabric.save, which the strategy writes (Lightning's strategy.get_optimizer_state).
  fabric_test::TempDir dir("optimizer-state");
  fabric::Fabric<fabric::CPU, Recording> fabric;
  torch::nn::Linear net(1, 1);
  torch::optim::Adam adam(net->parameters());
  auto [model, optimizer] = fabric.setup(net, adam);
  fabric.backward(model(torch::rand({2, 1})).sum());
  optimizer.step();
  fabric.save(dir / "opt.ckpt", {{"optimizer", optimizer}});
  CHECK(fabric.strategy().saves == 1);
  CHECK(&optimizer.state() == &adam.state());
  CHECK(optimizer.state().size() == 2);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_optimizer_load_state_dict
TEST_CASE("a set-up optimizer loads a state into the optimizer it wraps", "[wrappers][optimizer][checkpoint]") {
  fabric_test::TempDir dir("optimizer-load");
  CpuFabric fabric;
  torch::nn::Linear net(1, 1);
  torch::optim::Adam trained(net->parameters());
  CHECK(trained.state().empty());  // a fresh optimizer has no state
  net(torch::rand({1, 1})).sum().backward();
  trained.step();
  CHECK_FALSE(trained.state().empty());
  fabric.save(dir / "adam.ckpt", {{"optimizer", trained}});

  torch::optim::Adam fresh(net->parameters());
  auto [model, optimizer] = fabric.setup(net, fresh);
  CHECK(optimizer.state().empty());
  fabric.load(dir / "adam.ckpt", {{"optimizer", optimizer}});
  REQUIRE(optimizer.state().size() == trained.state().size());
  // NOTE: both optimizers are over the same parameters, so their states have the same keys.
  for (const auto& [key, state] : trained.state()) {
    REQUIRE(fresh.state().count(key) == 1);
    const auto& got = static_cast<const torch::optim::AdamParamState&>(*fresh.state().at(key));
    const auto& want = static_cast<const torch::optim::AdamParamState&>(*state);
    CHECK(got.step() == want.step());
    CHECK(torch::equal(got.exp_avg(), want.exp_avg()));
    CHECK(torch::equal(got.exp_avg_sq(), want.exp_avg_sq()));
  }
  (void)model;
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_optimizer_steps
TEST_CASE("the optimizer wrapper's step is the strategy's, with the closure, and returns its result",
          "[wrappers][optimizer]") {
  // NOTE: Lightning's DeepSpeed case (the strategy's model steps) has no fabric strategy.
  fabric::Fabric<fabric::CPU, Recording> fabric;
  torch::nn::Linear net(1, 1);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  fabric.backward(model(torch::rand({2, 1})).sum());
  CHECK(optimizer.step().item<int>() == 123);
  REQUIRE(fabric.strategy().stepped.size() == 1);
  CHECK(fabric.strategy().stepped[0] == &sgd);
  CHECK_FALSE(fabric.strategy().with_closure[0]);
  int closures = 0;
  auto closure = [&] {
    ++closures;
    optimizer.zero_grad();
    auto loss = model(torch::rand({2, 1})).sum();
    fabric.backward(loss);
    return loss;
  };
  CHECK(optimizer.step(closure).item<int>() == 123);
  CHECK(fabric.strategy().with_closure[1]);
  CHECK(closures == 1);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_optimizer_zero_grad_kwargs
TEST_CASE("the optimizer wrapper's zero_grad takes LibTorch's default or set_to_none", "[wrappers][optimizer]") {
  // NOTE: Lightning adapts to zero_grad signatures of other Python libraries; a LibTorch optimizer's
  // zero_grad is not virtual, so the wrapper resets the parameters' gradients itself (without
  // detach_(), keeping DDP's bucket views).
  CpuFabric fabric;
  torch::nn::Linear net(1, 1);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  auto run = [&] { fabric.backward(model(torch::rand({2, 1})).sum()); };
  run();
  optimizer.zero_grad();
  CHECK(net->weight.grad().defined() == !fabric::detail::torch_zero_grad_sets_none);
  run();
  optimizer.zero_grad(false);
  REQUIRE(net->weight.grad().defined());
  CHECK(net->weight.grad().abs().sum().item<double>() == 0.0);
  run();
  optimizer.zero_grad(true);
  CHECK_FALSE(net->weight.grad().defined());
}

// ---- the step check ---------------------------------------------------------------------------------

namespace {

struct StepHook {
  int steps = 0;
  void on_after_optimizer_step(auto& /*optimizer*/) { ++steps; }
};
struct OtherHook {
  void on_train_epoch_end() {}
};

const std::string raw_step =
    "the parameters of a set-up optimizer changed since the last backward, but no step of "
    "a set-up optimizer ran";

/// A model and an Adam set up by fabric, with a batch.
template <class F>
struct Setup {
  explicit Setup(F& f) : fabric(f), net(4, 2), adam(net->parameters()) {}
  F& fabric;
  torch::nn::Linear net;
  torch::optim::Adam adam;
  decltype(std::declval<F&>().setup(net, adam)) wrapped = fabric.setup(net, adam);
  torch::Tensor loss() { return std::get<0>(wrapped)(torch::rand({3, 4})).sum(); }
  auto& optimizer() { return std::get<1>(wrapped); }
};

}  // namespace

TEST_CASE("the step check is on where a raw step would skip something, and costs nothing elsewhere",
          "[wrappers][optimizer][step]") {
  STATIC_REQUIRE(fabric::NeedsFabricStep<fabric::FP16Mixed>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricStep<fabric::BF16Mixed>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricStep<fabric::FP32>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricStep<fabric::SingleDevice>);
  STATIC_REQUIRE(fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed>::checks_optimizer_step);
  STATIC_REQUIRE(fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, StepHook>::checks_optimizer_step);
  STATIC_REQUIRE_FALSE(
      fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, OtherHook>::checks_optimizer_step);
  STATIC_REQUIRE_FALSE(CpuFabric::checks_optimizer_step);

  // FP32 without such a callback: a raw step computes the same, and nothing is checked.
  CpuFabric fabric;
  Setup s(fabric);
  for (int i = 0; i < 3; ++i) {
    fabric.backward(s.loss());
    s.adam.step();
  }
}

TEST_CASE("a raw optimizer step under 16-mixed fails at the next backward", "[wrappers][optimizer][step]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed> fabric;
  Setup s(fabric);
  fabric.backward(s.loss());
  s.optimizer()->step();  // `->` reaches the LibTorch optimizer: no scaler
  s.optimizer().zero_grad();
  try {
    fabric.backward(s.loss());
    FAIL("the raw step passed");
  } catch (const fabric::Error& e) {
    CHECK(std::string(e.what()) ==
          "fabric: backward: the parameters of a set-up optimizer changed since the last backward, but no step of a "
          "set-up optimizer ran: optimizer->step() (the LibTorch optimizer behind the wrapper) skips the step of "
          "the precision (16-mixed); call optimizer.step() on the wrapper setup() returned");
  }
  // The raw object itself is the same bypass.
  Setup t(fabric);
  s.optimizer().step();
  fabric.backward(t.loss());
  t.adam.step();
  CHECK_THROWS_WITH(fabric.backward(t.loss()), ContainsSubstring(raw_step));
}

TEST_CASE("a raw optimizer step skips the on_after_optimizer_step hooks: an error at the next backward",
          "[wrappers][optimizer][step]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, StepHook> fabric({}, StepHook{});
  Setup s(fabric);
  fabric.backward(s.loss());
  s.optimizer().step();
  CHECK(fabric.callback<StepHook>().steps == 1);
  fabric.backward(s.loss());
  s.adam.step();
  CHECK_THROWS_WITH(fabric.backward(s.loss()),
                    ContainsSubstring(raw_step) && ContainsSubstring("skips the callbacks' on_after_optimizer_step"));
}

TEST_CASE("the step check raises no false alarm for accumulation, edits after a step, closures and two optimizers",
          "[wrappers][optimizer][step]") {
  using F = fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed, StepHook>;
  SECTION("gradient accumulation: several backwards, one step") {
    F fabric({}, StepHook{});
    Setup s(fabric);
    for (int step = 0; step < 3; ++step) {
      for (int micro = 0; micro < 4; ++micro) fabric.backward(s.loss() / 4);
      s.optimizer().step();
      s.optimizer().zero_grad();
    }
    CHECK(fabric.callback<StepHook>().steps == 3);
  }
  SECTION("in-place edits after fabric's step (weight clipping), and before the first backward") {
    F fabric({}, StepHook{});
    Setup s(fabric);
    torch::nn::init::normal_(s.net->weight);  // a new initialisation after setup
    for (int i = 0; i < 3; ++i) {
      fabric.backward(s.loss());
      s.optimizer().step();
      torch::NoGradGuard no_grad;
      for (auto& p : s.net->parameters()) p.clamp_(-0.01, 0.01);
    }
  }
  SECTION("a closure's backwards inside fabric's step") {
    fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed, StepHook> fabric({}, StepHook{});
    torch::nn::Linear net(4, 2);
    torch::optim::LBFGS lbfgs(net->parameters(), torch::optim::LBFGSOptions(0.1).max_iter(5));
    auto [model, optimizer] = fabric.setup(net, lbfgs);
    const auto x = torch::rand({3, 4});
    for (int i = 0; i < 2; ++i) {
      optimizer.step([&] {
        optimizer.zero_grad();
        auto loss = model(x).pow(2).sum();
        fabric.backward(loss);
        return loss;
      });
    }
    fabric.backward(model(x).sum());
  }
  SECTION("two models and two optimizers stepped in turn (a GAN)") {
    F fabric({}, StepHook{});
    Setup generator(fabric);
    Setup discriminator(fabric);
    for (int i = 0; i < 3; ++i) {
      fabric.backward(discriminator.loss());
      discriminator.optimizer().step();
      fabric.backward(generator.loss());
      generator.optimizer().step();
    }
    // The raw step of one of them is still caught.
    fabric.backward(discriminator.loss());
    discriminator.adam.step();
    CHECK_THROWS_WITH(fabric.backward(generator.loss()), ContainsSubstring(raw_step));
  }
  SECTION("SGD with momentum: its momentum buffers show the raw step") {
    F fabric({}, StepHook{});
    torch::nn::Linear net(4, 2);
    torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    auto [model, optimizer] = fabric.setup(net, sgd);
    for (int i = 0; i < 2; ++i) {
      fabric.backward(model(torch::rand({2, 4})).sum());
      optimizer.step();
    }
    fabric.backward(model(torch::rand({2, 4})).sum());
    sgd.step();
    CHECK_THROWS_WITH(fabric.backward(model(torch::rand({2, 4})).sum()), ContainsSubstring(raw_step));
  }
  SECTION("an optimizer whose wrapper is gone is no longer watched") {
    F fabric({}, StepHook{});
    torch::nn::Linear net(4, 2);
    {
      torch::optim::Adam adam(net->parameters());
      auto [model, optimizer] = fabric.setup(net, adam);
      fabric.backward(model(torch::rand({2, 4})).sum());
      adam.step();
    }
    torch::nn::Linear other(4, 2);
    auto model = fabric.setup(other);
    CHECK_NOTHROW(fabric.backward(model(torch::rand({2, 4})).sum()));
  }
}
