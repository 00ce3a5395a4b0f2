// fabric::Module's holder-like members, the concepts for user functions' parameters (ModelOf,
// OptimizerOf, SetUpLoader), and the backward check against a forward that bypassed the wrapper.

#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    bn = register_module("bn", torch::nn::BatchNorm1d(16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(bn(fc1(x)))); }
  torch::nn::Linear fc1{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  torch::nn::Linear fc2{nullptr};
};
TORCH_MODULE(Net);

struct DerivedImpl : NetImpl {};
TORCH_MODULE(Derived);

struct OtherImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(Other);

using CpuFabric = fabric::Fabric<fabric::CPU>;
using ModelW = fabric::Module<NetImpl, CpuFabric>;
using DerivedW = fabric::Module<DerivedImpl, CpuFabric>;
using AdamWW = fabric::Optimizer<torch::optim::AdamW, CpuFabric>;
using SgdW = fabric::Optimizer<torch::optim::SGD, CpuFabric>;
auto make_raw_loader() {
  return torch::data::make_data_loader(torch::data::datasets::TensorDataset(torch::randn({6, 8}))
                                           .map(torch::data::transforms::Stack<torch::data::TensorExample>()),
                                       torch::data::DataLoaderOptions().batch_size(4));
}
using RawLoader = decltype(make_raw_loader())::element_type;
using LoaderW = fabric::DataLoader<RawLoader>;

// A helper function of a ported program: only its parameter types name fabric.
double train_step(fabric::ModelOf<Net> auto& model, fabric::OptimizerOf<torch::optim::Optimizer> auto& optimizer,
                  const torch::Tensor& x, const torch::Tensor& y) {
  model.train();
  optimizer.zero_grad();
  auto loss = torch::nn::functional::cross_entropy(model(x), y);
  model.backward(loss);
  optimizer.step();
  return loss.template item<double>();
}

}  // namespace

TEST_CASE("ModelOf takes set-up modules of Net, named by holder or Impl, and rejects the rest", "[wrappers]") {
  STATIC_REQUIRE(fabric::ModelOf<ModelW, Net>);
  STATIC_REQUIRE(fabric::ModelOf<ModelW, NetImpl>);
  STATIC_REQUIRE(fabric::ModelOf<ModelW&, Net>);
  STATIC_REQUIRE(fabric::ModelOf<const ModelW&, Net>);
  STATIC_REQUIRE(fabric::ModelOf<ModelW, torch::nn::Module>);  // any set-up module
  STATIC_REQUIRE(fabric::ModelOf<DerivedW, Net>);              // a class derived from Net
  STATIC_REQUIRE(fabric::ModelOf<DerivedW, Derived>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<ModelW, Derived>);  // a Net is not a Derived
  STATIC_REQUIRE_FALSE(fabric::ModelOf<ModelW, Other>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<ModelW, OtherImpl>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<Net, Net>);  // the raw module is not set up
  STATIC_REQUIRE_FALSE(fabric::ModelOf<NetImpl, Net>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<std::shared_ptr<NetImpl>, Net>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<AdamWW, Net>);
  STATIC_REQUIRE_FALSE(fabric::ModelOf<LoaderW, Net>);
}

TEST_CASE("OptimizerOf takes set-up optimizers of Opt or a class derived from it", "[wrappers]") {
  STATIC_REQUIRE(fabric::OptimizerOf<AdamWW, torch::optim::AdamW>);
  STATIC_REQUIRE(fabric::OptimizerOf<AdamWW&, torch::optim::AdamW>);
  STATIC_REQUIRE(fabric::OptimizerOf<AdamWW, torch::optim::Optimizer>);
  STATIC_REQUIRE(fabric::OptimizerOf<SgdW, torch::optim::Optimizer>);
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<AdamWW, torch::optim::SGD>);
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<SgdW, torch::optim::AdamW>);
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<torch::optim::AdamW, torch::optim::AdamW>);  // not set up
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<std::shared_ptr<torch::optim::AdamW>, torch::optim::Optimizer>);
  STATIC_REQUIRE_FALSE(fabric::OptimizerOf<ModelW, torch::optim::Optimizer>);
}

TEST_CASE("SetUpLoader takes the loaders setup_dataloaders returns and nothing else", "[wrappers]") {
  STATIC_REQUIRE(fabric::SetUpLoader<LoaderW>);
  STATIC_REQUIRE(fabric::SetUpLoader<LoaderW&>);
  STATIC_REQUIRE(fabric::SetUpLoader<const LoaderW&>);
  STATIC_REQUIRE_FALSE(fabric::SetUpLoader<RawLoader>);
  STATIC_REQUIRE_FALSE(fabric::SetUpLoader<std::unique_ptr<RawLoader>>);
  STATIC_REQUIRE_FALSE(fabric::SetUpLoader<ModelW>);
  STATIC_REQUIRE_FALSE(fabric::SetUpLoader<AdamWW>);

  CpuFabric fabric;
  auto loader = fabric.setup_dataloaders(make_raw_loader());
  STATIC_REQUIRE(fabric::SetUpLoader<decltype(loader)>);
  auto count = [](fabric::SetUpLoader auto& l) {
    int batches = 0;
    for ([[maybe_unused]] auto& batch : l) ++batches;
    return batches;
  };
  CHECK(count(loader) == 2);
}

TEST_CASE("a helper function constrained by the concepts takes the wrappers, not the raw objects", "[wrappers]") {
  auto helper = [](fabric::ModelOf<Net> auto& model, fabric::OptimizerOf<torch::optim::Optimizer> auto& opt) {
    return model.is_training() && !opt.param_groups().empty();
  };
  STATIC_REQUIRE(std::is_invocable_v<decltype(helper), ModelW&, AdamWW&>);
  STATIC_REQUIRE(std::is_invocable_v<decltype(helper), ModelW&, SgdW&>);
  STATIC_REQUIRE_FALSE(std::is_invocable_v<decltype(helper), Net&, AdamWW&>);
  STATIC_REQUIRE_FALSE(std::is_invocable_v<decltype(helper), ModelW&, torch::optim::AdamW&>);
  STATIC_REQUIRE_FALSE(std::is_invocable_v<decltype(helper), AdamWW&, ModelW&>);

  CpuFabric fabric;
  fabric.seed_everything(0);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  CHECK(helper(model, optimizer));
  const auto x = torch::randn({32, 8});
  const auto y = (x.narrow(1, 0, 4).sum(1) > 0).to(torch::kLong);
  const double first = train_step(model, optimizer, x, y);
  double last = first;
  for (int i = 0; i < 30; ++i) last = train_step(model, optimizer, x, y);
  CHECK(last < 0.8 * first);
}

TEST_CASE("the wrapper's train, eval, parameters and buffers are the module's", "[wrappers]") {
  CpuFabric fabric;
  Net net;
  auto model = fabric.setup(net);
  CHECK(model.is_training());
  model.eval();
  CHECK_FALSE(model.is_training());
  CHECK_FALSE(net->is_training());
  CHECK_FALSE(net->bn->is_training());  // submodules too
  model.train();
  CHECK(net->bn->is_training());
  model.train(false);
  CHECK_FALSE(net->fc1->is_training());
  model.train(true);

  const auto params = model.parameters();
  REQUIRE(params.size() == net->parameters().size());
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i].is_same(net->parameters()[i]));
  CHECK(model.parameters(false).empty());  // all parameters live in submodules
  CHECK(model.named_parameters().keys() == net->named_parameters().keys());
  CHECK(model.named_parameters().contains("fc1.weight"));
  CHECK(model.named_parameters(false).is_empty());
  CHECK(model.buffers().size() == net->buffers().size());  // BatchNorm: mean, var, count
  CHECK(model.buffers().size() == 3);
  CHECK(model.buffers(false).empty());
}

TEST_CASE("the wrapper's zero_grad has LibTorch's default and never detaches a bucket view", "[wrappers]") {
  CpuFabric fabric;
  Net net;
  auto model = fabric.setup(net);
  const auto x = torch::randn({4, 8});
  auto run = [&] { fabric.backward(model(x).sum()); };

  // The reference: LibTorch's own Module::zero_grad() with its default.
  run();
  net->zero_grad();
  const bool torch_sets_none = !net->fc1->weight.grad().defined();
  CHECK(torch_sets_none == fabric::detail::torch_zero_grad_sets_none);

  run();
  model.zero_grad();
  CHECK(net->fc1->weight.grad().defined() == !torch_sets_none);
  run();
  model.zero_grad(false);
  REQUIRE(net->fc1->weight.grad().defined());
  CHECK(net->fc1->weight.grad().abs().sum().item<double>() == 0.0);
  CHECK_FALSE(net->fc1->weight.grad().requires_grad());
  run();
  model.zero_grad(true);
  for (const auto& p : net->parameters()) CHECK_FALSE(p.grad().defined());
  model.zero_grad(false);  // nothing to reset
  for (const auto& p : net->parameters()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("the wrapper's device and dtype follow the precision", "[wrappers]") {
  {
    CpuFabric fabric;
    Net net;
    auto model = fabric.setup(net);
    CHECK(model.device() == c10::Device(c10::kCPU));
    CHECK(model.dtype() == torch::kFloat);
  }
  {
    fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP64> fabric;
    Net net;
    auto model = fabric.setup(net);
    CHECK(model.dtype() == torch::kDouble);
  }
  {
    fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16True> fabric;
    Net net;
    auto model = fabric.setup(net);
    CHECK(model.dtype() == torch::kBFloat16);
  }
  {
    fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
    Net net;
    auto model = fabric.setup(net);
    CHECK(model.dtype() == torch::kFloat);  // mixed keeps float32 weights
  }
  {
    CpuFabric fabric;
    Other empty;
    auto model = fabric.setup(empty);
    CHECK(model.device() == fabric.device());  // no tensors: the fabric's device
    CHECK(model.dtype() == torch::kFloat);     // no floating parameters: the default dtype
  }
}

TEST_CASE("the wrappers add no size and no virtual call", "[wrappers]") {
  STATIC_REQUIRE(sizeof(ModelW) == sizeof(std::shared_ptr<NetImpl>) + sizeof(void*));  // the members add nothing
  STATIC_REQUIRE_FALSE(std::is_polymorphic_v<ModelW>);
  STATIC_REQUIRE_FALSE(std::is_polymorphic_v<AdamWW>);
}

// ---- the backward check -----------------------------------------------------------------------

namespace {
/// A user precision that says nothing: false.
struct Quiet : fabric::PrecisionBase {
  static constexpr std::string_view name = "quiet";
};
/// A user precision that works in forward and says so.
struct Casting : fabric::PrecisionBase {
  static constexpr std::string_view name = "casting";
  static constexpr bool needs_wrapped_forward = true;
};
}  // namespace

TEST_CASE("each policy says whether it works in the wrapper's forward", "[wrappers][backward]") {
  STATIC_REQUIRE_FALSE(fabric::NeedsWrappedForward<fabric::FP32>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::FP64>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::BF16True>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::FP16True>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::BF16Mixed>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::FP16Mixed>);
  STATIC_REQUIRE_FALSE(fabric::NeedsWrappedForward<fabric::SingleDevice>);
  STATIC_REQUIRE(fabric::NeedsWrappedForward<fabric::DP>);
  STATIC_REQUIRE_FALSE(fabric::NeedsWrappedForward<fabric::CPU>);  // a policy without the member: false
  STATIC_REQUIRE_FALSE(fabric::NeedsWrappedForward<Quiet>);        // user policies default to false
  STATIC_REQUIRE(fabric::NeedsWrappedForward<Casting>);
  STATIC_REQUIRE_FALSE(CpuFabric::checks_bypassed_forward);
  STATIC_REQUIRE(fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed>::checks_bypassed_forward);
}

namespace {

using CheckedPrecisions =
    std::tuple<fabric::FP64, fabric::BF16Mixed, fabric::FP16Mixed, fabric::BF16True, fabric::FP16True>;

template <class P>
bool runs_on_cpu() {
  return !std::is_same_v<P, fabric::FP16True> || fabric::detail::torch_cpu_half_matmul;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("a bypassed forward fails at backward under a precision that works in forward",
                        "[wrappers][backward]", CheckedPrecisions) {
  if (!runs_on_cpu<TestType>()) SKIP("16-true needs float16 matmuls on the CPU (LibTorch 2.1)");
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, TestType> fabric;
  Net net;
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  const auto x = torch::randn({4, 8});
  const std::string message = fmt::format(
      "backward: the loss did not come through a set-up module's forward; model->forward(x) skips the precision "
      "({}): call the wrapper, model(x) or model.forward(x)",
      TestType::name);

  // The bypass: `->` reaches the raw module, which casts nothing and autocasts nothing.
  auto raw = [&] { return model->forward(x.to(TestType::param_dtype())).sum(); };
  CHECK_THROWS_AS(fabric.backward(raw()), fabric::Error);
  CHECK_THROWS_WITH(fabric.backward(raw()), ContainsSubstring(message));
  CHECK_THROWS_WITH(model.backward(raw()), ContainsSubstring(message));     // the wrapper's backward too
  for (const auto& p : net->parameters()) CHECK_FALSE(p.grad().defined());  // nothing ran

  // The wrapper path passes, by call and by forward, through Fabric and through the wrapper.
  CHECK_NOTHROW(fabric.backward(model(x).sum()));
  CHECK(net->fc1->weight.grad().defined());
  CHECK_NOTHROW(model.backward(model.forward(x).sum()));
  optimizer.step();

  // The count starts again at each backward: a wrapped forward, a backward, then a bypass fails.
  auto wrapped = model(x).sum();
  fabric.backward(wrapped);
  CHECK_THROWS_WITH(fabric.backward(raw()), ContainsSubstring(message));

  // Two wrapped forwards, one loss: one backward.
  CHECK_NOTHROW(fabric.backward(model(x).sum() + model(x).sum()));
  // A backward that retains the graph keeps the count for the next backward of the same graph.
  auto out = model(x);
  fabric.backward(out.sum(), torch::Tensor{}, /*retain_graph=*/true);
  CHECK_NOTHROW(fabric.backward(out.mean()));
  CHECK_THROWS_WITH(fabric.backward(out.mean()), ContainsSubstring(message));
  // create_graph retains it too (retain_graph defaults to create_graph).
  auto again = model(x);
  fabric.backward(again.sum(), torch::Tensor{}, c10::nullopt, /*create_graph=*/true);
  CHECK_NOTHROW(fabric.backward(again.mean()));
  net->zero_grad();
}

TEST_CASE("under FP32 and SingleDevice a bypassed forward is no error (it computes the same)", "[wrappers][backward]") {
  CpuFabric fabric;
  Net net;
  auto model = fabric.setup(net);
  const auto x = torch::randn({4, 8});
  CHECK_NOTHROW(fabric.backward(model->forward(x).sum()));
  CHECK_NOTHROW(model.backward(model->forward(x).sum()));
  CHECK_NOTHROW(fabric.backward(model(x).sum()));
  CHECK(net->fc1->weight.grad().defined());
}

TEST_CASE("the backward check waits for a set-up module", "[wrappers][backward]") {
  // No module set up: a loss from plain tensors is nobody's bypass.
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  auto w = torch::randn({3}, torch::requires_grad());
  CHECK_NOTHROW(fabric.backward((w * 2).sum()));
  CHECK(w.grad().defined());
  Net net;
  auto model = fabric.setup(net);
  CHECK_THROWS_AS(fabric.backward((w * 2).sum()), fabric::Error);
  // The check comes after the other argument checks.
  CHECK_THROWS_WITH(fabric.backward(torch::Tensor{}), ContainsSubstring("found an undefined tensor"));
}

TEST_CASE("a bypassed forward fails at backward under DP", "[wrappers][backward][dp][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  fabric::Fabric<fabric::CUDA, fabric::DP> fabric({.devices = 1});
  torch::nn::Sequential net(torch::nn::Linear(8, 4));
  auto model = fabric.setup(net);
  const auto x = torch::randn({4, 8}).to(fabric.device());
  CHECK_THROWS_WITH(fabric.backward(model->forward(x).sum()),
                    ContainsSubstring("model->forward(x) skips the strategy (dp): call the wrapper"));
  CHECK_NOTHROW(fabric.backward(model(x).sum()));
}
