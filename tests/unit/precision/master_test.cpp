// fabric::BF16Master ("bf16-master"): bfloat16 weights and compute, float32 masters in the optimizer.
// Lightning has no such precision (its closest is "bf16-true", which has no masters), so no test of
// Lightning's mirrors these; each checks a rule of the policy against a hand-written reference.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include "unit/temp_dir.hpp"

#include <cmath>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

template <class P>
using CpuFabric = fabric::Fabric<fabric::CPU, fabric::SingleDevice, P>;

struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 16));
    bn = register_module("bn", torch::nn::BatchNorm1d(16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(Net);

/// A net with the weights every test starts from.
Net make_net() {
  torch::manual_seed(7);
  return Net();
}

std::vector<torch::Tensor> float_copies(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().to(torch::kFloat).clone());
  return out;
}

torch::Tensor batch_x(int i) { return torch::randn({8, 6}, torch::TensorOptions().dtype(torch::kFloat)) * (1 + i); }

/// One training step on the bf16-master fabric; returns the loss.
template <class F, class M, class O>
float train_step(F& fabric, M& model, O& optimizer, int i) {
  torch::manual_seed(100 + i);
  auto x = batch_x(i);
  auto y = torch::randint(0, 3, {8});
  auto loss = torch::nn::functional::cross_entropy(model(x), y);
  fabric.backward(loss);
  optimizer.step();
  optimizer.zero_grad();
  return loss.template item<float>();
}

struct TempDir : fabric_test::TempDir {
  TempDir() : fabric_test::TempDir("fabric-master") {}
};

/// A precision with one of the four optional hooks only: it records each checkpoint it scopes and whether
/// it loads; the optimizer's setup, zero_grad and clipping stay fabric's.
struct ScopedCheckpoints : fabric::FP32 {
  static constexpr std::string_view name = "scoped-checkpoints";
  std::vector<bool> scopes;
  template <class Fn>
  decltype(auto) checkpoint_scope(bool loads, Fn&& fn) {
    scopes.push_back(loads);
    return std::forward<Fn>(fn)();
  }
};

}  // namespace

TEST_CASE("bf16-master: a policy whose module lives in bfloat16 and whose optimizer holds float32 masters",
          "[precision][master]") {
  STATIC_REQUIRE(fabric::Precision<fabric::BF16Master>);
  STATIC_REQUIRE(fabric::SetsUpOptimizers<fabric::BF16Master>);
  STATIC_REQUIRE(fabric::ZeroesGradients<fabric::BF16Master>);
  STATIC_REQUIRE(fabric::ClipsGradients<fabric::BF16Master>);
  STATIC_REQUIRE(fabric::ScopesCheckpoints<fabric::BF16Master>);
  STATIC_REQUIRE(!fabric::SetsUpOptimizers<fabric::BF16True>);
  STATIC_REQUIRE(!fabric::ZeroesGradients<fabric::BF16True>);
  STATIC_REQUIRE(!fabric::ClipsGradients<fabric::BF16True>);
  STATIC_REQUIRE(!fabric::ScopesCheckpoints<fabric::BF16True>);
  STATIC_REQUIRE(fabric::BF16Master::name == "bf16-master");
  STATIC_REQUIRE(fabric::BF16Master::param_dtype() == torch::kFloat);

  auto net = make_net();
  const auto original = float_copies(net->parameters());
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3));
  CpuFabric<fabric::BF16Master> fabric;
  auto [model, optimizer] = fabric.setup(net, adamw);

  // The module: parameters and floating buffers in bfloat16 (the integer num_batches_tracked kept).
  for (const auto& p : model->parameters()) CHECK(p.scalar_type() == torch::kBFloat16);
  CHECK(model->bn->running_mean.scalar_type() == torch::kBFloat16);
  CHECK(model->bn->num_batches_tracked.scalar_type() == torch::kLong);
  // The optimizer: float32 masters, the original values exactly; the module holds their rounding.
  const auto params = model->parameters();
  const auto& masters = optimizer.param_groups()[0].params();
  REQUIRE(masters.size() == params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    CHECK(masters[i].scalar_type() == torch::kFloat);
    CHECK(masters[i].equal(original[i]));
    CHECK(fabric.precision().master_of(params[i]).is_same(masters[i]));
    CHECK(params[i].equal(original[i].to(torch::kBFloat16)));
  }
  // Forward runs on the bfloat16 weights without autocast and returns float32 (convert_output).
  torch::manual_seed(1);
  auto out = model(torch::randn({4, 6}));
  CHECK(out.scalar_type() == torch::kFloat);

  // Backward leaves bf16 gradients on the module; the step leaves no float32 gradient behind, and
  // zero_grad clears the module's gradients.
  fabric.backward(out.sum());
  for (const auto& p : params) CHECK(p.grad().scalar_type() == torch::kBFloat16);
  optimizer.step();
  for (const auto& m : masters) CHECK(!m.grad().defined());
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i].equal(masters[i].to(torch::kBFloat16)));
  optimizer.zero_grad(/*set_to_none=*/true);
  for (const auto& p : params) CHECK(!p.grad().defined());
}

TEST_CASE("bf16-master: one step equals a float32 step of the masters with the upcast bf16 gradient, then rounding",
          "[precision][master]") {
  using Make = std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;
  const std::vector<std::pair<std::string, Make>> optimizers = {
      {"Adam",
       [](std::vector<torch::Tensor> ps) {
         return std::make_unique<torch::optim::Adam>(ps, torch::optim::AdamOptions(1e-2).weight_decay(0.1));
       }},
      {"AdamW",
       [](std::vector<torch::Tensor> ps) {
         return std::make_unique<torch::optim::AdamW>(ps, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
       }},
      {"SGD", [](std::vector<torch::Tensor> ps) {
         return std::make_unique<torch::optim::SGD>(ps, torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true));
       }}};
  for (const auto& [name, make] : optimizers) {
    CAPTURE(name);
    auto net = make_net();
    // The reference: float32 copies of the original weights, stepped by the optimizer's own step().
    auto reference = float_copies(net->parameters());
    auto ref_opt = make(reference);
    std::shared_ptr<torch::optim::Optimizer> opt = make(net->parameters());
    CpuFabric<fabric::BF16Master> fabric;
    auto [model, optimizer] = fabric.setup(net, opt);
    const auto params = model->parameters();
    for (int step = 0; step < 3; ++step) {
      torch::manual_seed(step);
      auto loss = model(torch::randn({8, 6})).pow(2).mean();
      fabric.backward(loss);
      for (std::size_t i = 0; i < params.size(); ++i) reference[i].mutable_grad() = params[i].grad().to(torch::kFloat);
      optimizer.step();
      ref_opt->step();
      optimizer.zero_grad();
      const auto& masters = optimizer.param_groups()[0].params();
      for (std::size_t i = 0; i < params.size(); ++i) {
        CAPTURE(step, i);
        CHECK(torch::allclose(masters[i], reference[i], /*rtol=*/1e-6, /*atol=*/1e-7));
        CHECK(params[i].equal(masters[i].to(torch::kBFloat16)));
      }
    }
  }
}

TEST_CASE("bf16-master: updates below bfloat16's resolution accumulate in the masters, which bf16-true loses",
          "[precision][master]") {
  // w = 1 and d(loss)/dw = 1: each SGD step subtracts lr = 1e-3, a quarter of bfloat16's spacing at 1 (2^-7).
  const auto train = [](auto& fabric) {
    auto net = torch::nn::Linear(torch::nn::LinearOptions(1, 1).bias(false));
    {
      torch::NoGradGuard no_grad;
      net->weight.fill_(1.0);
    }
    torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(1e-3));
    auto [model, optimizer] = fabric.setup(net, sgd);
    for (int i = 0; i < 200; ++i) {
      auto loss = model(torch::ones({1, 1})).sum();
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();
    }
    return std::pair{model->weight.detach().to(torch::kFloat).template item<float>(),
                     optimizer.param_groups()[0].params()[0].template item<float>()};
  };
  CpuFabric<fabric::FP32> fp32;
  CpuFabric<fabric::BF16True> bf16_true;
  CpuFabric<fabric::BF16Master> bf16_master;
  const auto [fp32_weight, fp32_opt] = train(fp32);
  const auto [true_weight, true_opt] = train(bf16_true);
  const auto [master_weight, master] = train(bf16_master);
  CHECK(std::abs(fp32_weight - 0.8f) < 1e-4);    // float32 moves by 200 * 1e-3
  CHECK(true_weight == 1.0f);                    // bf16-true: every update rounds away
  CHECK(std::abs(master - fp32_weight) < 1e-5);  // the master moves as float32 does
  CHECK(master_weight == torch::tensor(master).to(torch::kBFloat16).to(torch::kFloat).item<float>());
  CHECK(master_weight < 0.81f);
}

TEST_CASE("bf16-master: clip_gradients clips the bf16 gradients before the step, the norm in float32",
          "[precision][master]") {
  auto net = make_net();
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  CpuFabric<fabric::BF16Master> fabric;
  auto [model, optimizer] = fabric.setup(net, sgd);
  torch::manual_seed(3);
  fabric.backward(model(torch::randn({8, 6})).pow(2).sum() * 100);
  std::vector<torch::Tensor> grads;
  for (const auto& p : model->parameters()) grads.push_back(p.grad().to(torch::kFloat));
  std::vector<torch::Tensor> norms;
  for (const auto& g : grads) norms.push_back(g.norm());
  const auto expected = torch::stack(norms).norm();
  const auto total = fabric.clip_gradients(model, optimizer, {.max_norm = 1.0});
  REQUIRE(total.has_value());
  CHECK(total->scalar_type() == torch::kFloat);
  CHECK(torch::allclose(*total, expected, 1e-5));
  REQUIRE(expected.item<float>() > 1.0f);
  double clipped = 0;
  for (const auto& p : model->parameters()) {
    CHECK(p.grad().scalar_type() == torch::kBFloat16);
    clipped += p.grad().to(torch::kFloat).pow(2).sum().item<double>();
  }
  CHECK(std::abs(std::sqrt(clipped) - 1.0) < 1e-2);  // bfloat16 rounding of the rescaled gradients

  fabric.clip_gradients(model, optimizer, {.clip_val = 1e-3});
  for (const auto& p : model->parameters()) CHECK(p.grad().abs().max().item<float>() <= 1.0001e-3f);
}

TEST_CASE("bf16-master: checkpoints hold the float32 masters; save, load and continue equals uninterrupted training",
          "[precision][master]") {
  TempDir dir;
  const auto path = dir.path() / "master.ckpt";
  const auto adamw = [](Net& net) { return torch::optim::AdamW(net->parameters(), torch::optim::AdamWOptions(1e-2)); };

  // Uninterrupted: 4 steps, a save after the second.
  auto net = make_net();
  auto opt = adamw(net);
  CpuFabric<fabric::BF16Master> fabric;
  auto [model, optimizer] = fabric.setup(net, opt);
  for (int i = 0; i < 2; ++i) train_step(fabric, model, optimizer, i);
  fabric.save(path, {{"model", model}, {"optimizer", optimizer}});
  const auto masters_at_save = float_copies(optimizer.param_groups()[0].params());
  std::vector<float> losses;
  for (int i = 2; i < 4; ++i) losses.push_back(train_step(fabric, model, optimizer, i));

  // The file: the module's parameters are the float32 masters, not the rounded bf16 copies.
  auto saved = CpuFabric<fabric::FP32>().load(path);
  const auto& dict = saved.at("model").value().toGenericDict();
  const auto names = model->named_parameters();
  bool differs_from_copy = false;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto t = dict.at(names[i].key()).toTensor();
    CHECK(t.scalar_type() == torch::kFloat);
    CHECK(t.equal(masters_at_save[i]));
    differs_from_copy = differs_from_copy || !t.equal(t.to(torch::kBFloat16).to(torch::kFloat));
  }
  CHECK(differs_from_copy);

  // Resumed: a fresh run (other initial weights) loads the checkpoint and trains the last 2 steps.
  torch::manual_seed(99);
  Net net2;
  auto opt2 = adamw(net2);
  CpuFabric<fabric::BF16Master> fabric2;
  auto [model2, optimizer2] = fabric2.setup(net2, opt2);
  fabric2.load(path, {{"model", model2}, {"optimizer", optimizer2}});
  for (std::size_t i = 0; i < names.size(); ++i) {
    CHECK(optimizer2.param_groups()[0].params()[i].equal(masters_at_save[i]));
    CHECK(model2->parameters()[i].equal(masters_at_save[i].to(torch::kBFloat16)));
  }
  std::vector<float> resumed;
  for (int i = 2; i < 4; ++i) resumed.push_back(train_step(fabric2, model2, optimizer2, i));
  CHECK(resumed == losses);
  for (std::size_t i = 0; i < names.size(); ++i) {
    CHECK(optimizer2.param_groups()[0].params()[i].equal(optimizer.param_groups()[0].params()[i]));
    CHECK(model2->parameters()[i].equal(model->parameters()[i]));
  }
  for (const auto& item : model->named_buffers()) CHECK(model2->named_buffers()[item.key()].equal(item.value()));

  // The checkpoint loads into a float32 run, which gets the masters exactly.
  auto net3 = make_net();
  auto opt3 = adamw(net3);
  CpuFabric<fabric::FP32> fp32;
  auto [model3, optimizer3] = fp32.setup(net3, opt3);
  fp32.load(path, {{"model", model3}, {"optimizer", optimizer3}});
  for (std::size_t i = 0; i < names.size(); ++i) CHECK(model3->parameters()[i].equal(masters_at_save[i]));
}

TEST_CASE("bf16-master: refuses optimizers it cannot give masters", "[precision][master]") {
  SECTION("a tensor that is no parameter of a set-up module") {
    auto net = make_net();
    auto stray = torch::zeros({3}, torch::requires_grad());
    torch::optim::SGD sgd(std::vector<torch::Tensor>{stray}, torch::optim::SGDOptions(0.1));
    CpuFabric<fabric::BF16Master> fabric;
    auto model = fabric.setup_module(net);
    CHECK_THROWS_WITH(fabric.setup_optimizers(sgd),
                      ContainsSubstring("bf16-master: the optimizer's parameter 0 (shape [3], Float) is not a "
                                        "parameter of a module set up by this fabric"));
  }
  SECTION("an optimizer that has stepped") {
    auto net = make_net();
    torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(0.1));
    net->forward(torch::randn({4, 6})).sum().backward();
    adam.step();
    adam.zero_grad();
    CpuFabric<fabric::BF16Master> fabric;
    auto model = fabric.setup_module(net);
    CHECK_THROWS_WITH(fabric.setup_optimizers(adam),
                      ContainsSubstring("bf16-master: expected an optimizer that has not stepped yet"));
  }
  SECTION("weights changed between setup_module and setup_optimizers") {
    auto net = make_net();
    CpuFabric<fabric::BF16Master> fabric;
    auto model = fabric.setup_module(net);
    {
      torch::NoGradGuard no_grad;
      model->fc1->weight.add_(1.0);
    }
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
    CHECK_THROWS_WITH(fabric.setup_optimizers(sgd), ContainsSubstring("changed since setup converted it"));
  }
  SECTION("setup_module then setup_optimizers works as setup") {
    auto net = make_net();
    CpuFabric<fabric::BF16Master> fabric;
    auto model = fabric.setup_module(net);
    torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
    auto optimizer = fabric.setup_optimizers(sgd);
    CHECK(optimizer.param_groups()[0].params()[0].scalar_type() == torch::kFloat);
  }
}

TEST_CASE("bf16-master: LBFGS's closure evaluates the loss on the copies of the masters it is at",
          "[precision][master]") {
  auto net = torch::nn::Linear(4, 1);
  torch::optim::LBFGS lbfgs(net->parameters(), torch::optim::LBFGSOptions(0.5).max_iter(5));
  CpuFabric<fabric::BF16Master> fabric;
  auto [model, optimizer] = fabric.setup(net, lbfgs);
  torch::manual_seed(5);
  const auto x = torch::randn({32, 4});
  const auto y = x.matmul(torch::tensor({1.0f, -2.0f, 0.5f, 3.0f})).unsqueeze(1);
  const auto closure = [&] {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::mse_loss(model(x), y);
    fabric.backward(loss);
    return loss;
  };
  const float first = closure().item<float>();
  for (int i = 0; i < 5; ++i) optimizer.step(closure);
  CHECK(closure().item<float>() < first * 0.1f);
  CHECK(model->weight.equal(optimizer.param_groups()[0].params()[0].to(torch::kBFloat16)));
}

TEST_CASE("bf16-master on CUDA: the fused AdamW step runs on the float32 masters", "[precision][master][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no CUDA device");
  auto net = make_net();
  auto reference = float_copies(net->parameters());
  for (auto& r : reference) r = r.cuda();
  torch::optim::AdamW ref_opt(reference, torch::optim::AdamWOptions(1e-2));
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Master> fabric;
  auto [model, optimizer] = fabric.setup(net, adamw);
  const auto params = model->parameters();
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(step);
    auto loss = model(torch::randn({8, 6}).to(fabric.device())).pow(2).mean();
    fabric.backward(loss);
    for (std::size_t i = 0; i < params.size(); ++i) reference[i].mutable_grad() = params[i].grad().to(torch::kFloat);
    optimizer.step();
#if TORCH_VERSION_MAJOR >= 2
    CHECK(fabric::detail::last_optimizer_step_path() == fabric::detail::StepPath::fused);
#endif
    fabric::detail::optimizer_step(ref_opt, nullptr);  // the same kernels on plain float32 tensors
    optimizer.zero_grad();
    const auto& masters = optimizer.param_groups()[0].params();
    for (std::size_t i = 0; i < params.size(); ++i) {
      CAPTURE(step, i);
      CHECK(masters[i].is_cuda());
      CHECK(masters[i].equal(reference[i]));
      CHECK(params[i].equal(masters[i].to(torch::kBFloat16)));
    }
  }
}

TEST_CASE(
    "precision hooks are found one by one: checkpoint_scope alone keeps fabric's optimizer setup, zero_grad "
    "and clipping",
    "[precision][master]") {
  STATIC_REQUIRE(fabric::Precision<ScopedCheckpoints>);
  STATIC_REQUIRE(fabric::ScopesCheckpoints<ScopedCheckpoints>);
  STATIC_REQUIRE(!fabric::SetsUpOptimizers<ScopedCheckpoints>);
  STATIC_REQUIRE(!fabric::ZeroesGradients<ScopedCheckpoints>);
  STATIC_REQUIRE(!fabric::ClipsGradients<ScopedCheckpoints>);
  TempDir dir;
  auto net = make_net();
  const auto params = net->parameters();
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(0.1));
  CpuFabric<ScopedCheckpoints> fabric;
  auto [model, optimizer] = fabric.setup(net, sgd);
  // The optimizer steps the module's own parameters (no rewrite).
  REQUIRE(optimizer.param_groups()[0].params().size() == params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    CHECK(optimizer.param_groups()[0].params()[i].unsafeGetTensorImpl() == params[i].unsafeGetTensorImpl());
  }
  torch::manual_seed(3);
  fabric.backward(model(torch::randn({8, 6})).pow(2).sum() * 100);
  std::vector<torch::Tensor> norms;
  for (const auto& p : params) norms.push_back(p.grad().norm());
  const auto expected = torch::stack(norms).norm();
  const auto total = fabric.clip_gradients(model, optimizer, {.max_norm = 1.0});
  REQUIRE(total.has_value());
  CHECK(torch::allclose(*total, expected, 1e-5));
  optimizer.zero_grad(false);
  for (const auto& p : params) CHECK(p.grad().abs().sum().item<float>() == 0.0f);
  CHECK(fabric.precision().scopes.empty());

  const auto path = dir.path() / "scoped.ckpt";
  fabric.save(path, {{"model", model}});
  const auto saved = params[0].detach().clone();
  {
    torch::NoGradGuard no_grad;
    params[0].add_(1.0);
  }
  fabric.load(path, {{"model", model}});
  CHECK(torch::equal(params[0], saved));
  CHECK(fabric.precision().scopes == std::vector<bool>{false, true});
}
