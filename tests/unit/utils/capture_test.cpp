// Fabric::capture (fabric::CapturedStep): a training step recorded in one CUDA graph after warm-up and
// replayed per batch. Lightning has no counterpart (Python reaches it through
// torch.compile(mode="reduce-overhead")), so no Lightning test is mirrored. The CPU build checks the
// refusals and the eager fallback; the [cuda] tests check the captured step against the eager loop.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;
namespace F = torch::nn::functional;

namespace {

torch::nn::Sequential mlp(int in, int hidden, int out) {
  return torch::nn::Sequential(torch::nn::Linear(in, hidden), torch::nn::ReLU(), torch::nn::Linear(hidden, hidden),
                               torch::nn::ReLU(), torch::nn::Linear(hidden, out));
}

/// Batches of random inputs and class targets on the device (never zeros).
std::vector<std::pair<at::Tensor, at::Tensor>> batches(int n, int rows, int in, int classes, const c10::Device& d) {
  torch::manual_seed(123);
  std::vector<std::pair<at::Tensor, at::Tensor>> out;
  for (int i = 0; i < n; ++i) {
    out.emplace_back(torch::randn({rows, in}).to(d), torch::randint(classes, {rows}, torch::kLong).to(d));
  }
  return out;
}

/// How the step function clears the gradients: zeros in place (zero_grad(false)) or LibTorch's default,
/// setting them to none (zero_grad()).
enum class Zero { in_place, to_none };

/// The step function of the tests: forward, loss, fabric.backward, step, zero_grad.
template <class Fab, class M, class O>
auto train_step(Fab& fabric, M& model, O& optimizer, Zero zero = Zero::in_place) {
  return [&fabric, &model, &optimizer, zero](const at::Tensor& x, const at::Tensor& y) {
    auto loss = F::cross_entropy(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad(/*set_to_none=*/zero == Zero::to_none);
    return loss;
  };
}

/// Trains a fresh seeded mlp on the batches, with `run(step)` deciding how steps run; returns the
/// losses and the final parameters.
template <class Opt = torch::optim::SGD, class Fab, class Run>
std::pair<std::vector<float>, std::vector<at::Tensor>> train(Fab& fabric, int in, int hidden,
                                                             const std::vector<std::pair<at::Tensor, at::Tensor>>& data,
                                                             Run run, Zero zero = Zero::in_place) {
  torch::manual_seed(0);
  auto net = mlp(in, hidden, 10);
  auto make = [&] {
    if constexpr (std::is_same_v<Opt, torch::optim::AdamW>) {
      return Opt(net->parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.01));
    } else {
      return Opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    }
  };
  Opt opt = make();
  auto [model, optimizer] = fabric.setup(net, opt);
  auto step = train_step(fabric, model, optimizer, zero);
  std::vector<float> losses = run(step, data);
  std::vector<at::Tensor> params;
  for (const auto& p : net->parameters()) params.push_back(p.detach().clone());
  if constexpr (std::is_same_v<Opt, torch::optim::AdamW>) {
    // The host step counts follow the replays (what state_dict and checkpoints hold).
    for (const auto& [key, state] : opt.state()) {
      CHECK(static_cast<const torch::optim::AdamWParamState&>(*state).step() == static_cast<std::int64_t>(data.size()));
    }
  }
  return {losses, params};
}

const auto eager_run = [](auto& step, const auto& data) {
  std::vector<float> losses;
  for (const auto& [x, y] : data) losses.push_back(step(x, y).template item<float>());
  return losses;
};

}  // namespace

TEST_CASE("capture refuses the CPU device, and runs the step eagerly with fallback", "[utils][capture]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(6, 16, 8, 10, fabric.device());
  auto fn = [](const at::Tensor& x, const at::Tensor&) { return x.sum(); };
  REQUIRE_THROWS_WITH(fabric.capture(fn), ContainsSubstring("capture: expected a CUDA device, found cpu") &&
                                              ContainsSubstring("{.fallback = true}"));

  const auto [eager_losses, eager_params] = train(fabric, 8, 16, data, eager_run);
  const auto [fallback_losses, fallback_params] = train(fabric, 8, 16, data, [&](auto& step, const auto& batches) {
    auto captured = fabric.capture(step, {.fallback = true});
    CHECK(captured.eager());
    std::vector<float> losses;
    for (const auto& [x, y] : batches) losses.push_back(captured(x, y).template item<float>());
    CHECK_FALSE(captured.captured());
    return losses;
  });
  CHECK(fallback_losses == eager_losses);
  for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(fallback_params[i], eager_params[i]));
}

TEST_CASE("capture refuses no warm-up and a gradient scaler before any step", "[utils][capture]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32> fabric;
  auto fn = [](const at::Tensor& x) { return x.sum(); };
  REQUIRE_THROWS_WITH(fabric.capture(fn, {.warmup_steps = 0}),
                      ContainsSubstring("expected warmup_steps >= 1, found 0"));

  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed> half;
  REQUIRE_THROWS_WITH(half.capture(fn), ContainsSubstring("expected a precision without a gradient scaler, found") &&
                                            ContainsSubstring("16-mixed"));
  CHECK(half.capture(fn, {.fallback = true}).eager());
}

TEST_CASE("captured step on CUDA: bit-identical to the eager loop over 20 steps, refuses another shape",
          "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(20, 64, 32, 10, fabric.device());
  const auto [eager_losses, eager_params] = train(fabric, 32, 64, data, eager_run);
  bool replayed = false;
  const auto [graph_losses, graph_params] = train(fabric, 32, 64, data, [&](auto& step, const auto& batches) {
    auto captured = fabric.capture(step);
    std::vector<float> losses;
    for (const auto& [x, y] : batches) losses.push_back(captured(x, y).template item<float>());
    replayed = captured.captured();
    const auto& [x, y] = batches.front();
    REQUIRE_THROWS_WITH(captured(x.narrow(0, 0, 32), y.narrow(0, 0, 32)),
                        ContainsSubstring("captured step: expected a batch of [64, 32] Float on cuda:0") &&
                            ContainsSubstring("found [32, 32] Float on cuda:0"));
    return losses;
  });
  CHECK(replayed);
  CHECK(graph_losses == eager_losses);
  for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(graph_params[i], eager_params[i]));
}

TEST_CASE("captured step on CUDA: AdamW's fused step bit-identical to the eager loop over 20 steps",
          "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(20, 64, 32, 10, fabric.device());
  const auto [eager_losses, eager_params] = train<torch::optim::AdamW>(fabric, 32, 64, data, eager_run);
  const auto [graph_losses, graph_params] =
      train<torch::optim::AdamW>(fabric, 32, 64, data, [&](auto& step, const auto& batches) {
        auto captured = fabric.capture(step);
        std::vector<float> losses;
        for (const auto& [x, y] : batches) losses.push_back(captured(x, y).template item<float>());
        CHECK(captured.captured());
        return losses;
      });
  CHECK(graph_losses == eager_losses);
  for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(graph_params[i], eager_params[i]));
}

TEST_CASE("captured step on CUDA: zero_grad() setting the gradients to none, bit-identical over 20 steps",
          "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(20, 64, 32, 10, fabric.device());
  // The recording sees no gradients (the warm-up's last zero_grad dropped them): its backward writes them
  // into the graph's memory rather than adding to them, so each replay's gradients are that step's alone.
  const auto captured_run = [&](auto& step, const auto& batches) {
    auto captured = fabric.capture(step);
    std::vector<float> losses;
    for (const auto& [x, y] : batches) losses.push_back(captured(x, y).template item<float>());
    CHECK(captured.captured());
    return losses;
  };
  SECTION("SGD with momentum") {
    const auto [eager_losses, eager_params] = train(fabric, 32, 64, data, eager_run, Zero::to_none);
    const auto [graph_losses, graph_params] = train(fabric, 32, 64, data, captured_run, Zero::to_none);
    CHECK(graph_losses == eager_losses);
    for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(graph_params[i], eager_params[i]));
  }
  SECTION("AdamW's fused step, against the eager loop that zeros in place") {
    const auto [eager_losses, eager_params] = train<torch::optim::AdamW>(fabric, 32, 64, data, eager_run);
    const auto [graph_losses, graph_params] =
        train<torch::optim::AdamW>(fabric, 32, 64, data, captured_run, Zero::to_none);
    CHECK(graph_losses == eager_losses);
    for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(graph_params[i], eager_params[i]));
  }
}

TEST_CASE("captured step on CUDA: refuses a learning rate changed after the recording, replays at the recorded one",
          "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(7, 64, 32, 10, fabric.device());
  torch::manual_seed(0);
  auto net = mlp(32, 64, 10);
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-3));
  auto [model, optimizer] = fabric.setup(net, opt);
  auto captured = fabric.capture(train_step(fabric, model, optimizer));
  // A rate changed during the warm-up is the one recorded.
  for (int i = 0; i < 5; ++i) {
    if (i == 1) opt.param_groups()[0].options().set_lr(2e-3);
    captured(data[i].first, data[i].second);
  }
  REQUIRE(captured.captured());
  opt.param_groups()[0].options().set_lr(5e-4);  // what an LR scheduler's step does
  const at::Tensor before = net->parameters()[0].detach().clone();
  CHECK_THROWS_WITH(captured(data[5].first, data[5].second),
                    ContainsSubstring("expected the learning rate the step was recorded with, 0.002, found 0.0005 in "
                                      "param group 0 of torch::optim::AdamW"));
  CHECK(torch::equal(net->parameters()[0], before));  // nothing was replayed
  opt.param_groups()[0].options().set_lr(2e-3);
  captured(data[6].first, data[6].second);
  CHECK_FALSE(torch::equal(net->parameters()[0], before));
}

TEST_CASE("captured step on CUDA: bf16-mixed bit-identical to the eager loop over 20 steps", "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  const auto data = batches(20, 64, 32, 10, fabric.device());
  const auto [eager_losses, eager_params] = train(fabric, 32, 64, data, eager_run);
  const auto [graph_losses, graph_params] = train(fabric, 32, 64, data, [&](auto& step, const auto& batches) {
    auto captured = fabric.capture(step);
    std::vector<float> losses;
    for (const auto& [x, y] : batches) losses.push_back(captured(x, y).template item<float>());
    CHECK(captured.captured());
    return losses;
  });
  CHECK(graph_losses == eager_losses);
  for (std::size_t i = 0; i < eager_params.size(); ++i) CHECK(torch::equal(graph_params[i], eager_params[i]));
}

TEST_CASE("captured step on CUDA: refuses a host sync in the step and optimizers whose step is not capturable",
          "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(3, 16, 8, 10, fabric.device());
  {
    torch::manual_seed(0);
    auto net = mlp(8, 16, 10);
    torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05));
    auto [model, optimizer] = fabric.setup(net, sgd);
    float seen = 0;
    auto step = fabric.capture(
        [&](const at::Tensor& x, const at::Tensor& y) {
          auto loss = F::cross_entropy(model(x), y);
          seen = loss.item<float>();
          fabric.backward(loss);
          optimizer.step();
          optimizer.zero_grad(false);
          return loss;
        },
        {.warmup_steps = 1});
    step(data[0].first, data[0].second);
    REQUIRE_THROWS_WITH(step(data[1].first, data[1].second),
                        ContainsSubstring("expected a step function without host synchronisation"));
    // The device is usable after the broken capture.
    CHECK(torch::equal(data[2].first + 0, data[2].first));
  }
  {
    torch::manual_seed(0);
    auto net = mlp(8, 16, 10);
    torch::optim::RMSprop rmsprop(net->parameters(), torch::optim::RMSpropOptions(1e-3));
    auto [model, optimizer] = fabric.setup(net, rmsprop);
    auto step = fabric.capture(train_step(fabric, model, optimizer));
    REQUIRE_THROWS_WITH(step(data[0].first, data[0].second),
                        ContainsSubstring("torch::optim::RMSprop: its own step() reads host state") &&
                            ContainsSubstring("this step ran eagerly"));
    auto fallback = fabric.capture(train_step(fabric, model, optimizer), {.fallback = true});
    for (const auto& [x, y] : data) fallback(x, y);
    CHECK(fallback.eager());
  }
  {
    // AdamW through the foreach kernels (FABRIC_FOREACH_STEP=foreach) computes its corrections on the host.
    auto& kernels = fabric::detail::optimizer_step_kernels();
    const auto saved = std::exchange(kernels, fabric::detail::StepPath::foreach);
    torch::manual_seed(0);
    auto net = mlp(8, 16, 10);
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3));
    auto [model, optimizer] = fabric.setup(net, adamw);
    auto step = fabric.capture(train_step(fabric, model, optimizer));
    CHECK_THROWS_WITH(step(data[0].first, data[0].second),
                      ContainsSubstring("torch::optim::AdamW through the foreach step: its bias corrections are host"));
    kernels = saved;
  }
}

TEST_CASE("captured step on CUDA: ms/step of the mlp workload, eager against captured", "[utils][capture][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP32> fabric;
  const auto data = batches(8, 256, 784, 10, fabric.device());
  const auto time = [&](auto& step) {
    for (int i = 0; i < 10; ++i) step(data[i % 8].first, data[i % 8].second);
    std::vector<double> blocks;
    for (int block = 0; block < 7; ++block) {
      torch::cuda::synchronize();
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < 50; ++i) step(data[i % 8].first, data[i % 8].second);
      torch::cuda::synchronize();
      blocks.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
                       50);
    }
    std::sort(blocks.begin(), blocks.end());
    return blocks[blocks.size() / 2];
  };
  const auto measure = [&](auto make_optimizer, const char* name) {
    double ms[2] = {0, 0};
    for (int captured = 0; captured < 2; ++captured) {
      torch::manual_seed(0);
      auto net = mlp(784, 1024, 10);
      auto opt = make_optimizer(net->parameters());
      auto [model, optimizer] = fabric.setup(net, opt);
      auto step = train_step(fabric, model, optimizer);
      if (captured) {
        auto graph = fabric.capture(step);
        ms[1] = time(graph);
        CHECK(graph.captured());
      } else {
        ms[0] = time(step);
      }
    }
    std::printf(
        "capture timing (mlp 784-1024-1024-10, batch 256, fp32, %s, median of 7 blocks of 50): "
        "eager %.3f ms/step, captured %.3f ms/step (%.2fx)\n",
        name, ms[0], ms[1], ms[0] / ms[1]);
  };
  measure([](auto params) { return torch::optim::SGD(params, torch::optim::SGDOptions(0.01).momentum(0.9)); },
          "SGD momentum");
  measure([](auto params) { return torch::optim::AdamW(params, torch::optim::AdamWOptions(1e-3)); }, "fused AdamW");
}
