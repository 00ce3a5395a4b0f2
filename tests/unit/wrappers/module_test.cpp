// fabric::Module's holder-like members, the concepts for user functions' parameters (ModelOf,
// OptimizerOf, SetUpLoader), model.call (Lightning's mark_forward_method), the backward check against a
// forward that bypassed the wrapper, and the backward guard against loss.backward().

#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include "unit/solo_ddp.hpp"
#include "unit/temp_dir.hpp"

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

// ---- Lightning's test_wrappers.py: the module wrapper ------------------------------------------

namespace {

/// Lightning's OriginalModule of the wrapper tests: a layer, a plain attribute and methods.
struct OriginalImpl : torch::nn::Module {
  OriginalImpl() { layer = register_module("layer", torch::nn::Linear(2, 3)); }
  torch::Tensor forward(const torch::Tensor& x) { return layer(x); }
  int method() const { return 2; }
  int method_without_module_invocation() const { return 100; }
  int method_with_submodule_invocation() {
    layer(torch::rand({2, 2}));
    return 101;
  }
  torch::Tensor loss_from_submodule(const torch::Tensor& x) { return layer(x).sum(); }
  torch::nn::Linear layer{nullptr};
  int attribute = 1;
};
TORCH_MODULE(Original);

/// Lightning's LightningModule of test_step_method_redirection: step methods that call forward.
struct StepsImpl : torch::nn::Module {
  StepsImpl() { fc = register_module("fc", torch::nn::Linear(2, 1)); }
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::Tensor training_step(const torch::Tensor& x, const torch::Tensor& y) {
    ++steps;
    return torch::mse_loss(forward(x), y);  // the module's own forward, inside the wrapper's context
  }
  std::pair<torch::Tensor, double> validation_step(const torch::Tensor& x) const { return {x * 2, 0.5}; }
  void marked_method() { ++steps; }
  torch::nn::Linear fc{nullptr};
  int steps = 0;
};
TORCH_MODULE(Steps);

/// A precision that counts the contexts it gives (Lightning's Mock(wraps=Precision())).
struct CountingPrecision : fabric::PrecisionBase {
  static constexpr std::string_view name = "counting";
  static inline int contexts = 0;
  fabric::NullGuard forward_context() const noexcept {
    ++contexts;
    return {};
  }
};

using SoloDDPFabric = fabric::Fabric<fabric::CPU, fabric::DDP>;
fabric::DDP solo_ddp() {
  require_gloo();
  return fabric::DDP({.cluster_environment = SoloEnvironment{}});
}

}  // namespace

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_wraps
TEST_CASE("the module wrapper gives the original module", "[wrappers]") {
  CpuFabric fabric;
  Original net;
  auto model = fabric.setup(net);
  CHECK(&model.module() == net.get());
  CHECK(model.ptr() == net.ptr());
  CHECK(&*model == net.get());
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_attribute_lookup
TEST_CASE("the original module's members are reached through the wrapper", "[wrappers]") {
  // NOTE: a member the module lacks (Lightning's AttributeError) does not compile: `->` is typed.
  CpuFabric fabric;
  Original net;
  auto model = fabric.setup(net);
  CHECK(model->attribute == 1);
  CHECK(model->layer.ptr() == net->layer.ptr());
  CHECK(model->method() == 2);
  // The wrapper's forward is its own: it goes through the precision and the strategy.
  STATIC_REQUIRE(std::is_same_v<decltype(model.forward(torch::ones({1, 2}))), torch::Tensor>);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_setattr
TEST_CASE("writing through the wrapper writes the original module", "[wrappers]") {
  // NOTE: Python's setattr, properties and monkeypatching of forward or __repr__ have no C++ counterpart;
  // a write through `->` is a write to the original, and so is registering a submodule.
  CpuFabric fabric;
  Original net;
  auto model = fabric.setup(net);
  model->attribute = 101;
  CHECK(net->attribute == 101);
  auto linear = torch::nn::Linear(2, 2);
  model->register_module("linear", linear);
  CHECK(net->named_children().contains("linear"));
  bool found = false;
  for (const auto& m : model->modules()) found = found || m.get() == linear.get();
  CHECK(found);
  CHECK(model.parameters().size() == 4);  // the new submodule's parameters are the module's
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_state_dict_access
// Lightning: tests_fabric/test_wrappers.py::test_unwrap_objects
TEST_CASE("a set-up module's state is the original module's, without a prefix", "[wrappers][checkpoint]") {
  // NOTE: LibTorch modules have no state_dict(); their state is named_parameters and named_buffers,
  // which the wrapper gives as they are, and fabric.save/load unwrap set-up objects as Lightning's
  // _unwrap_objects does: a checkpoint of the wrappers loads into the raw objects and back.
  fabric_test::TempDir dir("module-state");
  CpuFabric fabric;
  Original net;
  torch::optim::Adam adam(net->parameters());
  auto [model, optimizer] = fabric.setup(net, adam);
  CHECK(model.named_parameters().keys() == std::vector<std::string>{"layer.weight", "layer.bias"});
  fabric.backward(model(torch::rand({4, 2})).sum());
  optimizer.step();
  fabric.save(dir / "wrapped.ckpt", {{"model", model}, {"optimizer", optimizer}, {"int", 1}});

  Original raw;
  torch::optim::Adam raw_adam(raw->parameters());
  auto rest = fabric.load(dir / "wrapped.ckpt", {{"model", *raw}, {"optimizer", raw_adam}});
  CHECK(torch::equal(raw->layer->weight, net->layer->weight));
  CHECK(torch::equal(raw->layer->bias, net->layer->bias));
  CHECK(raw_adam.state().size() == 2);
  CHECK(rest.contains("int"));

  // And into a wrapper: the original module changes.
  const auto weight = torch::rand({3, 2});
  const auto bias = torch::rand({3});
  {
    torch::NoGradGuard no_grad;
    raw->layer->weight.copy_(weight);
    raw->layer->bias.copy_(bias);
  }
  fabric.save(dir / "raw.ckpt", {{"model", *raw}});
  fabric.load(dir / "raw.ckpt", {{"model", model}});
  CHECK(torch::equal(net->layer->weight, weight));
  CHECK(torch::equal(model->layer->bias, bias));
}

namespace {
/// Records the dtype of forward's input and whether CPU autocast was on (Lightning's Mock(wraps=Identity)).
struct RecordImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) {
    input_dtype = x.scalar_type();
    autocast = fabric::detail::autocast_enabled(c10::DeviceType::CPU);
    return x;
  }
  c10::ScalarType input_dtype = c10::ScalarType::Undefined;
  bool autocast = false;
};
TORCH_MODULE(Record);

template <class P>
void check_forward_conversion(c10::ScalarType input, c10::ScalarType expected, bool autocast) {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, P> fabric;
  Record net;
  auto model = fabric.setup(net);
  const auto out = model(torch::tensor({1, 2, 3}).to(input));
  CHECK(net->input_dtype == expected);
  CHECK(net->autocast == autocast);
  CHECK((out.scalar_type() == input || out.scalar_type() == torch::kFloat));
  CHECK_FALSE(fabric::detail::autocast_enabled(c10::DeviceType::CPU));  // restored after forward
}
}  // namespace

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_forward_conversion
TEST_CASE("the wrapper's forward casts floating inputs to the precision and autocasts", "[wrappers][precision]") {
  // Lightning's cases on CUDA; fabric's on the CPU (32-true, bf16-mixed).
  check_forward_conversion<fabric::FP32>(torch::kHalf, torch::kHalf, false);
  check_forward_conversion<fabric::FP32>(torch::kFloat, torch::kFloat, false);
  check_forward_conversion<fabric::FP32>(torch::kDouble, torch::kDouble, false);
  check_forward_conversion<fabric::FP32>(torch::kInt, torch::kInt, false);
  check_forward_conversion<fabric::BF16Mixed>(torch::kFloat, torch::kBFloat16, true);
  check_forward_conversion<fabric::BF16Mixed>(torch::kDouble, torch::kBFloat16, true);
  check_forward_conversion<fabric::BF16Mixed>(torch::kBool, torch::kBool, true);
  check_forward_conversion<fabric::BF16Mixed>(torch::kLong, torch::kLong, true);
  check_forward_conversion<fabric::BF16True>(torch::kFloat, torch::kBFloat16, false);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_device_dtype_propagation
TEST_CASE("the wrapper's device and dtype follow the module and its submodules", "[wrappers]") {
  // NOTE: LibTorch modules keep no device or dtype of their own: the wrapper reads them from the
  // module's tensors (a module without tensors reports the fabric's device and the default dtype).
  for (const auto dtype : {torch::kFloat, torch::kHalf}) {
    CpuFabric fabric;
    Original net;
    auto model = fabric.setup(net);
    model->to(torch::Device(torch::kCPU));
    CHECK(model.device() == torch::Device(torch::kCPU));
    CHECK(net->layer->weight.device() == model.device());
    model->to(dtype);
    CHECK(model.dtype() == dtype);
    CHECK(net->layer->weight.scalar_type() == dtype);  // the submodule follows
  }
}

// Lightning: tests_fabric/test_wrappers.py::test_is_wrapped
TEST_CASE("is_wrapped_v tells the wrappers from the objects they wrap", "[wrappers]") {
  // NOTE: Lightning's is_wrapped(None) and torch.compile's OptimizedModule have no C++ counterpart.
  STATIC_REQUIRE_FALSE(fabric::is_wrapped_v<Net>);
  STATIC_REQUIRE_FALSE(fabric::is_wrapped_v<NetImpl>);
  STATIC_REQUIRE(fabric::is_wrapped_v<ModelW>);
  STATIC_REQUIRE(fabric::is_wrapped_v<const ModelW&>);
  STATIC_REQUIRE_FALSE(fabric::is_wrapped_v<torch::optim::AdamW>);
  STATIC_REQUIRE(fabric::is_wrapped_v<AdamWW>);
  STATIC_REQUIRE_FALSE(fabric::is_wrapped_v<RawLoader>);
  STATIC_REQUIRE(fabric::is_wrapped_v<LoaderW>);
  STATIC_REQUIRE_FALSE(fabric::is_wrapped_v<int>);
}

// Lightning left out: tests_fabric/test_wrappers.py::test_unwrap_compiled - torch.compile is Python-only

// ---- model.call: Lightning's mark_forward_method ------------------------------------------------

// Lightning: tests_fabric/test_wrappers.py::test_step_method_redirection
TEST_CASE("model.call runs another method of the module in forward's context", "[wrappers][call]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, CountingPrecision> fabric;
  Steps net;
  auto model = fabric.setup(net);
  const auto x = torch::rand({4, 2});
  const auto y = torch::rand({4, 1});
  CountingPrecision::contexts = 0;
  const auto loss = model.call(&StepsImpl::training_step, x, y);
  CHECK(model.call(&StepsImpl::training_step, x, y).item<float>() == loss.item<float>());  // a 2nd time
  CHECK(CountingPrecision::contexts == 2);
  CHECK(net->steps == 2);
  CHECK(torch::allclose(loss, torch::mse_loss(net->forward(x), y)));
  // Any return type: the tensors in it are converted as forward's output, the rest kept.
  const auto [doubled, weight] = model.call(&StepsImpl::validation_step, x);
  CHECK(torch::equal(doubled, x * 2));
  CHECK(weight == 0.5);
  // A method that returns nothing, and a callable that takes the module first.
  model.call(&StepsImpl::marked_method);
  CHECK(net->steps == 3);
  CHECK(model.call([](StepsImpl& m, int k) { return m.steps + k; }, 1) == 4);
  CHECK(CountingPrecision::contexts == 5);
  // The module's own methods stay callable through `->`, outside the context.
  net->marked_method();
  CHECK(CountingPrecision::contexts == 5);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_mark_forward_method
TEST_CASE("model.call takes methods, not data members, and needs no marking", "[wrappers][call]") {
  // NOTE: Lightning marks methods by name and raises for forward itself, a missing name or an attribute.
  // In C++ a method is named by its member pointer: a missing one does not compile, a data member is a
  // static_assert (tests/compile_fail/call_data_member.cpp), and no marking is needed: every method
  // (Lightning's pre-marked training_step, validation_step, test_step, predict_step too) can be called.
  // model.call(&Net::forward, x) is model(x).
  CpuFabric fabric;
  Steps net;
  auto model = fabric.setup(net);
  const auto x = torch::rand({3, 2});
  CHECK(torch::equal(model.call(&StepsImpl::forward, x), model(x)));
  CHECK(torch::equal(model.call(&StepsImpl::forward, x), net->forward(x)));
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_module_method_lookup
TEST_CASE("a method that runs submodules outside forward is caught at backward; model.call runs it",
          "[wrappers][call][backward]") {
  // NOTE: Lightning intercepts the call (a Python attribute lookup) and raises when the strategy wraps
  // the module; C++ cannot intercept `model->method()`, so where forward's context matters
  // (checks_bypassed_forward) fabric.backward rejects the loss such a method produced.
  {
    // Nothing wraps the module: the method runs as it is, no error (Lightning's regular case).
    CpuFabric fabric;
    Original net;
    auto model = fabric.setup(net);
    CHECK(model->method_without_module_invocation() == 100);
    CHECK(model->method_with_submodule_invocation() == 101);
    CHECK_NOTHROW(fabric.backward(model->loss_from_submodule(torch::rand({2, 2}))));
  }
  {
    fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
    Original net;
    auto model = fabric.setup(net);
    CHECK(model->method_without_module_invocation() == 100);
    const auto x = torch::rand({2, 2});
    CHECK_THROWS_WITH(fabric.backward(model->loss_from_submodule(x)),
                      ContainsSubstring("did not come through a set-up module's forward"));
    CHECK_NOTHROW(fabric.backward(model.call(&OriginalImpl::loss_from_submodule, x)));
    CHECK(net->layer->weight.grad().defined());
  }
}

TEST_CASE("model.call under DDP prepares the Reducer as forward does", "[wrappers][call][ddp]") {
  SoloDDPFabric fabric({}, solo_ddp(), {});
  fabric.launch();
  fabric.seed_everything(3);
  Steps net;
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  const auto x = torch::rand({8, 2});
  const auto y = x.sum(1, true);
  std::vector<float> losses;
  for (int i = 0; i < 5; ++i) {
    auto loss = model.call(&StepsImpl::training_step, x, y);
    fabric.backward(loss);  // the Reducer expects this backward: no "finish the reduction" error next time
    optimizer.step();
    optimizer.zero_grad();
    losses.push_back(loss.item<float>());
  }
  CHECK(losses.back() < losses.front());
  // The method's loss bypassing the wrapper (`->`) is caught as a bypassed forward is.
  CHECK_THROWS_WITH(fabric.backward(net->training_step(x, y)), ContainsSubstring("the strategy (ddp)"));
}

// ---- the backward guard: fabric.backward(loss), not loss.backward() ---------------------------------

namespace {

/// Lightning's DictReturnModel: a loss and a tensor that does not require grad.
struct DictReturnImpl : torch::nn::Module {
  DictReturnImpl() { fc = register_module("fc", torch::nn::Linear(2, 2)); }
  std::map<std::string, torch::Tensor> forward(const torch::Tensor& x) {
    return {{"loss", fc(x).sum()}, {"other", torch::rand({2, 2})}};
  }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(DictReturn);

const std::string raw_backward =
    "requires you to call fabric.backward(loss) (or model.backward(loss)) instead of "
    "loss.backward()";

/// Lightning's test_backward_required for one fabric, with setup or setup_module.
template <class F>
void check_backward_required(F& fabric, bool error_expected, bool use_setup_module) {
  auto setup = [&](auto& net) { return use_setup_module ? fabric.setup_module(net) : fabric.setup(net); };
  auto raw_backward_of = [&](const torch::Tensor& loss) {
    if (error_expected) {
      CHECK_THROWS_WITH(loss.backward(), ContainsSubstring(raw_backward));
    } else {
      CHECK_NOTHROW(loss.backward());
    }
  };
  const auto batch = torch::rand({2, 2});
  // One model.
  torch::nn::Linear net1(2, 2);
  auto model1 = setup(net1);
  raw_backward_of(model1(batch).sum());
  CHECK_NOTHROW(fabric.backward(model1(batch).sum()));
  CHECK(fabric::detail::fabric_backward_depth.load() == 0);
  // Two models chained.
  torch::nn::Linear net2(2, 2);
  auto model2 = setup(net2);
  raw_backward_of(model2(model1(batch)).sum());
  CHECK_NOTHROW(fabric.backward(model2(model1(batch)).sum()));
  // Two independent models.
  raw_backward_of(model1(batch).sum());
  raw_backward_of(model2(batch).sum());
  CHECK_NOTHROW(fabric.backward(model1(batch).sum()));
  CHECK_NOTHROW(fabric.backward(model2(batch).sum()));
  // A model returning a structure of tensors: the one that requires grad is guarded.
  DictReturn net3;
  auto model3 = setup(net3);
  auto output = model3(batch);
  CHECK_FALSE(output.at("other").requires_grad());
  CHECK_NOTHROW((output.at("other") * 2).sum().template item<float>());
  raw_backward_of(output.at("loss") * 2);
  CHECK_NOTHROW(fabric.backward(model3(batch).at("loss") * 2));
  CHECK_NOTHROW(model3.backward(model3(batch).at("loss") * 2));  // the wrapper's backward is fabric's
}

}  // namespace

// Lightning: tests_fabric/test_fabric.py::test_backward_required
TEST_CASE("loss.backward() on a set-up module's output is an error where a policy must run the backward",
          "[wrappers][backward]") {
  for (const bool use_setup_module : {false, true}) {
    {
      fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32> fabric;  // "32-true": no error
      check_backward_required(fabric, false, use_setup_module);
    }
    {
      fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16True> fabric;  // "bf16-true": no error
      check_backward_required(fabric, false, use_setup_module);
    }
    {
      fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;  // "bf16-mixed": error
      check_backward_required(fabric, true, use_setup_module);
    }
    {
      fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed> fabric;  // "16-mixed": its scaler
      check_backward_required(fabric, true, use_setup_module);
    }
    {
      SoloDDPFabric fabric({}, solo_ddp(), {});  // fabric's DDP reports failed synchronisation in backward
      fabric.launch();
      check_backward_required(fabric, true, use_setup_module);
    }
  }
  STATIC_REQUIRE_FALSE(CpuFabric::checks_fabric_backward);
  STATIC_REQUIRE(fabric::NeedsFabricBackward<fabric::BF16Mixed>);
  STATIC_REQUIRE(fabric::NeedsFabricBackward<fabric::FP16Mixed>);
  STATIC_REQUIRE(fabric::NeedsFabricBackward<fabric::DDP>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricBackward<fabric::FP64>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricBackward<fabric::BF16True>);
  STATIC_REQUIRE_FALSE(fabric::NeedsFabricBackward<fabric::DP>);
}

TEST_CASE("the backward guard's message names the policies and reaches the user as fabric::Error",
          "[wrappers][backward]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP16Mixed> fabric;
  torch::nn::Linear net(2, 2);
  auto model = fabric.setup(net);
  try {
    model(torch::rand({2, 2})).sum().backward();
    FAIL("loss.backward() passed");
  } catch (const fabric::Error& e) {
    CHECK(std::string(e.what()) ==
          "fabric: loss.backward() on the output of a set-up module skips the backward of the precision (16-mixed): "
          "the current strategy and precision selection requires you to call fabric.backward(loss) (or "
          "model.backward(loss)) instead of loss.backward()");
  }
  CHECK_FALSE(net->weight.grad().defined());  // nothing reached the parameters
  // No grad, no hook: evaluation code is untouched.
  {
    torch::NoGradGuard no_grad;
    CHECK_FALSE(model(torch::rand({2, 2})).requires_grad());
  }
  // A graph kept by fabric's backward may be reused by fabric's backward only.
  auto out = model(torch::rand({2, 2})).sum();
  fabric.backward(out, torch::Tensor{}, /*retain_graph=*/true);
  CHECK_THROWS_AS(out.backward(), fabric::Error);
}
