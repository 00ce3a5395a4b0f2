// Precision policies on the CPU: FP32, FP64, BF16Mixed, BF16True, FP16Mixed (float16 autocast on
// the CPU needs LibTorch 2; on 1.13 FP16Mixed falls back to bfloat16), the autocast guard, the init
// contexts and the gradient scaler's logic.
#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

/// Records the dtypes it sees: the input, the hidden activation under autocast, the output.
struct ProbeImpl : torch::nn::Module {
  ProbeImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 32));
    fc2 = register_module("fc2", torch::nn::Linear(32, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    input_dtype = x.scalar_type();
    auto h = fc1(x);
    hidden_dtype = h.scalar_type();
    autocast_on = fabric::detail::autocast_enabled(torch::kCPU);
    if (fail) throw std::runtime_error("forward failed");
    return fc2(torch::relu(h));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::ScalarType input_dtype = torch::kFloat, hidden_dtype = torch::kFloat;
  bool autocast_on = false;
  bool fail = false;
};
TORCH_MODULE(Probe);

template <class P>
using CpuFabric = fabric::Fabric<fabric::CPU, fabric::SingleDevice, P>;

torch::ScalarType expected_compute(c10::ScalarType param, std::string_view name) {
  if (name == "bf16-mixed") return torch::kBFloat16;
  if (name == "16-mixed") return TORCH_VERSION_MAJOR >= 2 ? torch::kHalf : torch::kBFloat16;
  return param;
}

}  // namespace

using CpuPrecisions = std::tuple<fabric::FP32, fabric::FP64, fabric::BF16Mixed, fabric::BF16True, fabric::FP16Mixed>;

// Lightning: tests_fabric/plugins/precision/test_amp_integration.py::test_amp
TEMPLATE_LIST_TEST_CASE("every precision trains on the CPU with the documented dtypes", "[precision]", CpuPrecisions) {
  CpuFabric<TestType> fabric;
  fabric.seed_everything(0);
  Probe net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  const auto param = TestType::param_dtype();
  const auto compute = expected_compute(param, TestType::name);
  CHECK(net->fc1->weight.scalar_type() == param);

  const auto x = torch::randn({64, 8});
  const auto y = (x.narrow(1, 0, 4).sum(1) > 0).to(torch::kLong);
  float first = 0, last = 0;
  for (int step = 0; step < 40; ++step) {
    auto out = model(x);
    CHECK(out.scalar_type() == torch::kFloat);  // outputs always come back as float32
    torch::Tensor loss;
    {
      auto guard = fabric.autocast();
      loss = torch::nn::functional::cross_entropy(out, y);
    }
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    if (step == 0) first = loss.template item<float>();
    last = loss.template item<float>();
  }
  CHECK(net->input_dtype == compute);
  CHECK(net->hidden_dtype == compute);
  CHECK(net->autocast_on == (std::string_view(TestType::name).find("mixed") != std::string_view::npos));
  CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));  // restored after forward
  CHECK(net->fc1->weight.scalar_type() == param);              // mixed keeps float32 weights
  CHECK(last < 0.8f * first);
  // Gradients have the parameters' dtype.
  fabric.backward(torch::nn::functional::cross_entropy(model(x), y));
  CHECK(net->fc1->weight.grad().scalar_type() == param);
}

TEST_CASE("convert_output = false leaves the outputs of forward in the compute dtype", "[precision]") {
  const auto x = torch::randn({4, 8});
  {
    CpuFabric<fabric::BF16Mixed> fabric({}, fabric::SingleDevice{}, fabric::BF16Mixed({.convert_output = false}));
    CHECK_FALSE(fabric.precision().converts_output());
    Probe net;
    auto model = fabric.setup(net);
    CHECK(model(x).scalar_type() == torch::kBFloat16);
  }
  {
    CpuFabric<fabric::BF16True> fabric({}, fabric::SingleDevice{}, fabric::BF16True({.convert_output = false}));
    Probe net;
    auto model = fabric.setup(net);
    CHECK(model(x).scalar_type() == torch::kBFloat16);
  }
  {
    CpuFabric<fabric::BF16Mixed> fabric;  // the default: Lightning's convert_output
    CHECK(fabric.precision().converts_output());
    Probe net;
    auto model = fabric.setup(net);
    CHECK(model(x).scalar_type() == torch::kFloat);
  }
}

TEST_CASE("FP64 converts the module, the inputs and the init contexts", "[precision]") {
  CpuFabric<fabric::FP64> fabric;
  Probe net;
  auto model = fabric.setup(net);
  CHECK(net->fc1->weight.scalar_type() == torch::kDouble);
  const auto ints = torch::arange(8);
  auto out = model(torch::randn({2, 8}));
  CHECK(net->input_dtype == torch::kDouble);
  CHECK(out.scalar_type() == torch::kFloat);
  CHECK(fabric.precision().convert_input(ints).scalar_type() == torch::kLong);  // integers untouched
  {
    auto guard = fabric.init_module();
    torch::nn::Linear fresh(2, 2);
    CHECK(fresh->weight.scalar_type() == torch::kDouble);
  }
  {
    auto guard = fabric.init_tensor();
    CHECK(torch::ones({1}).scalar_type() == torch::kDouble);
  }
  CHECK(torch::ones({1}).scalar_type() == torch::kFloat);  // the default dtype is restored
  CpuFabric<fabric::BF16True> half;
  auto guard = half.init_module();
  CHECK(torch::nn::Linear(2, 2)->weight.scalar_type() == torch::kBFloat16);
}

TEST_CASE("autocast state is restored after an exception in forward", "[precision][autocast]") {
  CpuFabric<fabric::BF16Mixed> fabric;
  Probe net;
  auto model = fabric.setup(net);
  net->fail = true;
  CHECK_THROWS_AS(model(torch::randn({2, 8})), std::runtime_error);
  CHECK(net->autocast_on);
  CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
  net->fail = false;
  CHECK(model(torch::randn({2, 8})).scalar_type() == torch::kFloat);
}

TEST_CASE("autocast guards nest and restore the enclosing state", "[precision][autocast]") {
  const auto dtype0 = fabric::detail::autocast_dtype(torch::kCPU);
  REQUIRE_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
  {
    fabric::AutocastGuard outer(torch::kCPU, torch::kBFloat16);
    CHECK(fabric::detail::autocast_enabled(torch::kCPU));
    CHECK(torch::mm(torch::ones({2, 2}), torch::ones({2, 2})).scalar_type() == torch::kBFloat16);
    {
      fabric::AutocastGuard inner(torch::kCPU, torch::kBFloat16, /*enabled=*/false);
      CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
      CHECK(torch::mm(torch::ones({2, 2}), torch::ones({2, 2})).scalar_type() == torch::kFloat);
    }
    CHECK(fabric::detail::autocast_enabled(torch::kCPU));
    CHECK(torch::mm(torch::ones({2, 2}), torch::ones({2, 2})).scalar_type() == torch::kBFloat16);
  }
  CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
  CHECK(fabric::detail::autocast_dtype(torch::kCPU) == dtype0);
}

// Lightning: tests_fabric/test_connector.py::test_precision_selection_16_on_cpu_warns
// Lightning: tests_fabric/test_connector.py::test_precision_conversion
TEST_CASE("FP16Mixed on a CPU without float16 autocast runs as bfloat16 without a scaler", "[precision]") {
  CpuFabric<fabric::FP16Mixed> fabric;
  if (TORCH_VERSION_MAJOR >= 2) {
    CHECK(fabric.precision().compute_dtype() == torch::kHalf);
    CHECK(fabric.precision().scaler() != nullptr);
  } else {
    CHECK(fabric.precision().compute_dtype() == torch::kBFloat16);
    CHECK(fabric.precision().scaler() == nullptr);
  }
  STATIC_REQUIRE(std::is_same_v<fabric::FP16, fabric::FP16Mixed>);
  STATIC_REQUIRE(std::is_same_v<fabric::BF16, fabric::BF16Mixed>);
  STATIC_REQUIRE(fabric::Precision<fabric::FP64> && fabric::Precision<fabric::BF16> &&
                 fabric::Precision<fabric::FP16True>);
  STATIC_REQUIRE(fabric::FP16Mixed::name == "16-mixed" && fabric::BF16True::name == "bf16-true");
}

namespace {

struct ScalerRig {
  torch::nn::Linear lin{torch::nn::LinearOptions(2, 1).bias(false)};
  torch::optim::SGD sgd{lin->parameters(), torch::optim::SGDOptions(0.1)};
  void grad(float a, float b) { lin->weight.mutable_grad() = torch::tensor({a, b}).reshape({1, 2}); }
};

}  // namespace

TEST_CASE("GradScaler skips inf steps, backs off and grows", "[precision][scaler]") {
  ScalerRig rig;
  fabric::GradScaler scaler({.init_scale = 8.0, .growth_interval = 3});
  const auto loss = (rig.lin(torch::ones({1, 2})) * 0).sum();
  CHECK(scaler.scale(torch::tensor(1.5f)).item<float>() == 12.0f);  // scaled by 8

  // An inf gradient: the step is skipped, the scale halves, the tracker resets.
  const auto w = rig.lin->weight.clone();
  rig.grad(INFINITY, 1.0f);
  CHECK_FALSE(scaler.step(rig.sgd, nullptr).defined());
  CHECK(scaler.last_step_skipped());
  scaler.update();
  CHECK(torch::equal(rig.lin->weight, w));
  CHECK(scaler.get_scale() == 4.0);
  CHECK(scaler.growth_tracker() == 0);

  // Clean steps: gradients are unscaled before the step; after growth_interval the scale doubles.
  std::vector<double> scales;
  for (int i = 0; i < 3; ++i) {
    rig.grad(4.0f * static_cast<float>(scaler.get_scale()), 0.0f);  // a true gradient of 4
    const auto before = rig.lin->weight.clone();
    scaler.step(rig.sgd, nullptr);
    CHECK_FALSE(scaler.last_step_skipped());
    CHECK(torch::allclose(before - rig.lin->weight, torch::tensor({0.4f, 0.0f}).reshape({1, 2})));
    scaler.update();
    scales.push_back(scaler.get_scale());
  }
  CHECK(scales == std::vector<double>{4.0, 4.0, 8.0});
  CHECK(scaler.growth_tracker() == 0);

  // NaN counts as non-finite too.
  rig.grad(NAN, 0.0f);
  scaler.step(rig.sgd, nullptr);
  CHECK(scaler.last_step_skipped());
  scaler.update();
  CHECK(scaler.get_scale() == 4.0);
  (void)loss;
}

TEST_CASE("GradScaler state round trip and misuse", "[precision][scaler]") {
  ScalerRig rig;
  fabric::GradScaler scaler({.init_scale = 16.0, .growth_interval = 5});
  (void)scaler.scale(torch::tensor(1.0f));
  rig.grad(1, 1);
  scaler.step(rig.sgd, nullptr);
  scaler.update();
  const auto state = scaler.state_dict();
  CHECK(state.at("scale").toDouble() == 16.0);
  CHECK(state.at("_growth_tracker").toInt() == 1);
  CHECK(state.at("growth_interval").toInt() == 5);
  CHECK(state.at("growth_factor").toDouble() == 2.0);
  CHECK(state.at("backoff_factor").toDouble() == 0.5);
  fabric::GradScaler restored;
  restored.load_state_dict(state);
  CHECK(restored.get_scale() == 16.0);
  CHECK(restored.growth_tracker() == 1);
  CHECK(restored.options().growth_interval == 5);

  rig.grad(1, 1);
  scaler.unscale_(rig.sgd);
  CHECK_THROWS_WITH(scaler.unscale_(rig.sgd), ContainsSubstring("unscale_ was already called"));
  scaler.update();
  rig.lin->weight.mutable_grad() = torch::ones({1, 2}, torch::kHalf);
  CHECK_THROWS_WITH(scaler.unscale_(rig.sgd), ContainsSubstring("found float16 ones"));
  CHECK_THROWS_WITH(fabric::GradScaler({.growth_factor = 0.5}), ContainsSubstring("expected growth_factor > 1"));
  fabric::GradScaler fresh;
  CHECK_THROWS_WITH(fresh.unscale_(rig.sgd), ContainsSubstring("before any scaled backward"));
  c10::impl::GenericDict partial(c10::StringType::get(), c10::AnyType::get());
  partial.insert("scale", 2.0);
  CHECK_THROWS_WITH(fresh.load_state_dict(partial), ContainsSubstring("\"growth_factor\""));
}

namespace {

/// Runs the pattern of tests/python/grad_scaler_sequence.py on a device and returns the scales.
std::vector<double> scale_sequence(const torch::Device& device) {
  auto param = torch::zeros({2}, torch::TensorOptions().device(device).requires_grad(true));
  torch::optim::SGD sgd({param}, torch::optim::SGDOptions(0.1));
  fabric::GradScaler scaler({.init_scale = 65536.0, .growth_interval = 2});
  std::vector<double> scales;
  for (float g : {1.0f, 1.0f, INFINITY, 1.0f, NAN, 1.0f, 1.0f, 1.0f}) {
    (void)scaler.scale(torch::ones({}, torch::TensorOptions().device(device)));
    param.mutable_grad() = torch::tensor({g, 1.0f}).to(device) * static_cast<float>(scaler.get_scale());
    scaler.step(sgd, nullptr);
    scaler.update();
    scales.push_back(scaler.get_scale());
  }
  std::string line = "fabric scales:";
  for (double s : scales) line += fmt::format(" {:g}", s);
  std::printf("%s (%s)\n", line.c_str(), device.str().c_str());
  return scales;
}

const std::vector<double> pytorch_sequence{65536, 131072, 65536, 65536, 32768, 32768, 65536, 65536};

}  // namespace

TEST_CASE("GradScaler follows PyTorch's scale sequence", "[precision][scaler]") {
  CHECK(scale_sequence(torch::kCPU) == pytorch_sequence);
}

TEST_CASE("GradScaler follows PyTorch's scale sequence on CUDA", "[precision][scaler][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  CHECK(scale_sequence(torch::Device(torch::kCUDA, 0)) == pytorch_sequence);
}

TEST_CASE("the CUDA accelerator fails clearly where there is no CUDA", "[cuda][errors]") {
  if (fabric::CUDA::is_available()) {
    CHECK_THROWS_WITH((fabric::Fabric<fabric::CUDA>({.devices = fabric::CUDA::device_count() + 1})),
                      ContainsSubstring("CUDA devices per node"));
    fabric::Fabric<fabric::CUDA> fabric;
    CHECK(fabric.device() == torch::Device(torch::kCUDA, 0));
  } else {
    CHECK_THROWS_WITH(fabric::Fabric<fabric::CUDA>(), ContainsSubstring("the accelerator \"cuda\" is not available"));
  }
}

using CudaPrecisions =
    std::tuple<fabric::FP32, fabric::FP64, fabric::BF16Mixed, fabric::BF16True, fabric::FP16Mixed, fabric::FP16True>;

TEMPLATE_LIST_TEST_CASE("every precision trains the mlp workload on CUDA", "[precision][cuda]", CudaPrecisions) {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, TestType> fabric;
  fabric.seed_everything(0);
  torch::nn::Sequential net(torch::nn::Linear(784, 1024), torch::nn::ReLU(), torch::nn::Linear(1024, 1024),
                            torch::nn::ReLU(), torch::nn::Linear(1024, 10));
  // NOTE: eps 1e-4: AdamW's default 1e-8 is zero in float16, which makes FP16True divide by zero.
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-3).eps(1e-4));
  auto [model, optimizer] = fabric.setup(net, adamw);
  CHECK(net->parameters()[0].device().is_cuda());
  CHECK(net->parameters()[0].scalar_type() == TestType::param_dtype());
  const auto x = torch::randn({256, 784}, torch::kCUDA);
  const auto y = x.narrow(1, 0, 10).argmax(1);
  float first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    auto out = model(x);
    CHECK(out.scalar_type() == torch::kFloat);
    torch::Tensor loss;
    {
      auto guard = fabric.autocast();
      loss = torch::nn::functional::cross_entropy(out, y);
    }
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    if (step == 0) first = loss.template item<float>();
    last = loss.template item<float>();
  }
  CHECK(last < 0.5f * first);
}

TEST_CASE("FP16Mixed on CUDA: an injected inf gradient skips the step and halves the scale", "[precision][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::FP16Mixed> fabric;
  torch::nn::Linear net(8, 2);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  auto* scaler = fabric.precision().scaler();
  REQUIRE(scaler != nullptr);
  // NOTE: a mean loss keeps the scaled float16 gradients finite (a sum of 2^16-scaled outputs overflows).
  const auto x = 0.1 * torch::randn({4, 8}, torch::kCUDA);
  fabric.backward(model(x).mean());
  optimizer.step();
  optimizer.zero_grad();
  CHECK(scaler->get_scale() == 65536.0);
  fabric.backward(model(x).mean());
  net->weight.mutable_grad()[0][0] = INFINITY;
  const auto before = net->weight.clone();
  optimizer.step();
  CHECK(scaler->last_step_skipped());
  CHECK(torch::equal(before, net->weight));
  CHECK(scaler->get_scale() == 32768.0);
  // clip_gradients unscales first (once per step).
  optimizer.zero_grad();
  fabric.backward(model(x).mean());
  auto norm = fabric.clip_gradients(model, optimizer, {.max_norm = 1e6});
  CHECK(norm->item<double>() < 1e3);  // unscaled, not multiplied by 32768
  optimizer.step();
  CHECK_FALSE(scaler->last_step_skipped());
}

TEST_CASE("a GradScaler's state is saved and restored with checkpoints", "[precision][scaler][checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  ScalerRig rig;
  fabric::GradScaler scaler({.init_scale = 1024.0, .growth_interval = 7});
  (void)scaler.scale(torch::tensor(1.0f));
  rig.grad(INFINITY, 0);
  scaler.step(rig.sgd, nullptr);
  scaler.update();  // 512
  rig.grad(1, 0);
  scaler.step(rig.sgd, nullptr);
  scaler.update();  // tracker 1
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("fabric_scaler_{}", ::getpid());
  fabric.save(dir / "s.ckpt", {{"scaler", scaler}, {"step", 2}});
  fabric::GradScaler restored;
  fabric::State state{{"scaler", restored}};
  const auto rest = fabric.load(dir / "s.ckpt", state);
  CHECK(restored.get_scale() == 512.0);
  CHECK(restored.growth_tracker() == 1);
  CHECK(restored.options().growth_interval == 7);
  CHECK(rest.at("step").get<int>() == 2);
  // The file holds PyTorch's keys.
  const auto raw = fabric.load(dir / "s.ckpt");
  const auto dict = raw.at("scaler").value().toGenericDict();
  for (const char* key : {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}) {
    CHECK(dict.contains(key));
  }
  // A plain value where a scaler's state is expected is reported before anything changes.
  fabric.save(dir / "bad.ckpt", {{"scaler", 3}});
  CHECK_THROWS_WITH(fabric.load(dir / "bad.ckpt", state), ContainsSubstring("\"scaler\": expected a dictionary"));
  CHECK(restored.get_scale() == 512.0);
  std::filesystem::remove_all(dir);
}

namespace {

/// Holds every kind of state a conversion meets: float parameters (one frozen), a BatchNorm (float
/// running stats, int64 num_batches_tracked), an int, a bool and a complex buffer, a complex parameter.
struct StatefulImpl : torch::nn::Module {
  StatefulImpl() {
    fc = register_module("fc", torch::nn::Linear(2, 2));
    bn = register_module("bn", torch::nn::BatchNorm1d(2));
    frozen = register_parameter("frozen", torch::ones({2}), /*requires_grad=*/false);
    rotation = register_parameter("rotation", torch::complex(torch::ones({2}), torch::full({2}, 3.0)));
    steps = register_buffer("steps", torch::tensor({7}, torch::kLong));
    mask = register_buffer("mask", torch::tensor({true, false}));
    phase = register_buffer("phase", torch::complex(torch::ones({2}), torch::full({2}, 2.0)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return bn(fc(x)); }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  torch::Tensor frozen, rotation, steps, mask, phase;
};
TORCH_MODULE(Stateful);

}  // namespace

using TruePrecisions = std::tuple<fabric::FP64, fabric::BF16True, fabric::FP16True>;

// Lightning: tests_fabric/plugins/precision/test_double.py::test_convert_module
// Lightning: tests_fabric/plugins/precision/test_half.py::test_convert_module
TEMPLATE_LIST_TEST_CASE("the true precisions convert floating-point state only, as Lightning", "[precision][lightning]",
                        TruePrecisions) {
  Stateful net;
  const auto* weight_impl = net->fc->weight.unsafeGetTensorImpl();
  TestType precision;
  precision.convert_module(*net);  // the plugin itself, as Lightning's test (no device: FP16True runs on the CPU)
  const auto dtype = TestType::param_dtype();
  CHECK(net->fc->weight.scalar_type() == dtype);
  CHECK(net->fc->bias.scalar_type() == dtype);
  CHECK(net->bn->weight.scalar_type() == dtype);
  CHECK(net->bn->running_mean.scalar_type() == dtype);
  CHECK(net->bn->running_var.scalar_type() == dtype);
  CHECK(net->frozen.scalar_type() == dtype);
  // Parameters stay the same tensors and keep requires_grad.
  CHECK(net->fc->weight.unsafeGetTensorImpl() == weight_impl);
  CHECK(net->fc->weight.requires_grad());
  CHECK_FALSE(net->frozen.requires_grad());
  CHECK(net->fc->weight.is_leaf());
  // Integer, bool and complex state keeps its dtype and values (module.double() semantics).
  CHECK(net->bn->num_batches_tracked.scalar_type() == torch::kLong);
  CHECK(net->steps.scalar_type() == torch::kLong);
  CHECK(net->steps.item<int64_t>() == 7);
  CHECK(net->mask.scalar_type() == torch::kBool);
  CHECK(net->phase.scalar_type() == torch::kComplexFloat);
  CHECK(torch::equal(torch::imag(net->phase), torch::full({2}, 2.0)));
  CHECK(net->rotation.scalar_type() == torch::kComplexFloat);
  CHECK(net->rotation.requires_grad());
  CHECK(torch::equal(torch::imag(net->rotation.detach()), torch::full({2}, 3.0)));
}

// Lightning: tests_fabric/plugins/precision/test_double.py::test_convert_module
TEST_CASE("FP64 setup keeps the optimizer's parameters and BatchNorm's counter", "[precision][lightning]") {
  CpuFabric<fabric::FP64> fabric;
  Stateful net;
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  CHECK(net->fc->weight.scalar_type() == torch::kDouble);
  const auto before = net->fc->weight.detach().clone();
  auto out = model(torch::randn({4, 2}));
  fabric.backward(out.sum() + out.pow(2).sum());
  optimizer.step();
  CHECK_FALSE(torch::equal(before, net->fc->weight.detach()));  // the optimizer steps the converted weight
  CHECK(net->fc->weight.scalar_type() == torch::kDouble);
  CHECK(net->bn->num_batches_tracked.scalar_type() == torch::kLong);
  CHECK(net->bn->num_batches_tracked.item<int64_t>() == 1);
}

// ---- Lightning's tests_fabric/plugins/precision/ and the precision choice of test_connector.py -----

// Lightning: tests_fabric/plugins/precision/test_all.py::test_default_dtype_is_restored
// Lightning: tests_fabric/plugins/precision/test_utils.py::test_dtype_context_manager
TEST_CASE("the dtype guards restore the default dtype, also on an exception", "[precision][lightning]") {
  const auto throws_inside = [](auto make_guard, torch::ScalarType expected) {
    REQUIRE(torch::ones({1}).scalar_type() == torch::kFloat);
    try {
      auto guard = make_guard();
      CHECK(torch::ones({1}).scalar_type() == expected);
      throw std::runtime_error("foo");
    } catch (const std::runtime_error& e) {
      CHECK(std::string(e.what()) == "foo");
    }
    CHECK(torch::ones({1}).scalar_type() == torch::kFloat);
  };
  throws_inside([] { return fabric::DefaultDtypeGuard(torch::kHalf); }, torch::kHalf);
  // The contexts of the true precisions: forward's and init_module's.
  throws_inside([] { return fabric::FP64{}.forward_context(); }, torch::kDouble);
  throws_inside([] { return fabric::FP16True{}.forward_context(); }, torch::kHalf);
  throws_inside([] { return fabric::BF16True{}.forward_context(); }, torch::kBFloat16);
  CpuFabric<fabric::FP64> fabric;
  throws_inside([&] { return fabric.init_module(); }, torch::kDouble);
  throws_inside([&] { return fabric.init_tensor(); }, torch::kDouble);
}

// Lightning: tests_fabric/plugins/precision/test_double.py::test_double_precision_forward_context
// Lightning: tests_fabric/plugins/precision/test_half.py::test_forward_context
// Lightning: tests_fabric/plugins/precision/test_half.py::test_selected_dtype
TEST_CASE("the true precisions' dtype and forward context", "[precision][lightning]") {
  STATIC_REQUIRE(fabric::FP64::name == "64-true");
  STATIC_REQUIRE(fabric::FP64::param_dtype() == torch::kDouble);
  STATIC_REQUIRE(fabric::BF16True::name == "bf16-true");
  STATIC_REQUIRE(fabric::BF16True::param_dtype() == torch::kBFloat16);
  STATIC_REQUIRE(fabric::FP16True::name == "16-true");
  STATIC_REQUIRE(fabric::FP16True::param_dtype() == torch::kHalf);
  const auto in_context = [](const auto& precision) {
    auto guard = precision.forward_context();
    return torch::ones({1}).scalar_type();
  };
  CHECK(in_context(fabric::FP64{}) == torch::kDouble);
  CHECK(in_context(fabric::BF16True{}) == torch::kBFloat16);
  CHECK(in_context(fabric::FP16True{}) == torch::kHalf);
  CHECK(torch::ones({1}).scalar_type() == torch::kFloat);
  // The input the wrapped forward gets: floating tensors in the dtype, integers untouched.
  CHECK(fabric::BF16True{}.convert_input(torch::ones({2})).scalar_type() == torch::kBFloat16);
  CHECK(fabric::FP16True{}.convert_input(torch::ones({2})).scalar_type() == torch::kHalf);
  CHECK(fabric::FP16True{}.convert_input(torch::arange(2)).scalar_type() == torch::kLong);
}

// Lightning: tests_fabric/plugins/precision/test_half.py::test_module_init_context
TEST_CASE("init_module creates modules in the half dtypes", "[precision][lightning]") {
  {
    CpuFabric<fabric::BF16True> fabric;
    torch::nn::Linear model{nullptr};
    {
      auto guard = fabric.init_module();
      model = torch::nn::Linear(2, 2);
      CHECK(torch::ones({1}).scalar_type() == torch::kBFloat16);
    }
    CHECK(model->weight.scalar_type() == torch::kBFloat16);
  }
  // 16-true: Fabric::init_module is this guard (FP16True cannot run on the CPU of LibTorch 1.13, so the guard
  // is made directly, as Lightning's test calls the plugin's context).
  torch::nn::Linear model{nullptr};
  {
    fabric::DefaultDtypeGuard guard(fabric::FP16True::param_dtype());
    model = torch::nn::Linear(2, 2);
  }
  CHECK(model->weight.scalar_type() == torch::kHalf);
}

namespace {

/// A mixed-precision module that checks, inside forward, what Lightning's MixedPrecisionModule checks.
struct DoubleModuleImpl : torch::nn::Module {
  DoubleModuleImpl() {
    layer = register_module("layer", torch::nn::Linear(32, 2));
    complex_buffer = register_buffer("complex_buffer", torch::complex(torch::rand({10}), torch::rand({10})));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    input_dtype = x.scalar_type();
    new_tensor_dtype = torch::tensor({0.0}).scalar_type();  // the default dtype inside forward
    return layer(x);
  }
  torch::nn::Linear layer{nullptr};
  torch::Tensor complex_buffer;
  torch::ScalarType input_dtype = torch::kFloat, new_tensor_dtype = torch::kFloat;
};
TORCH_MODULE(DoubleModule);

/// Counts the init contexts Fabric asks it for (Lightning's test wraps the strategy's in a Mock).
struct CountingStrategy : fabric::SingleDevice {
  CountingStrategy() = default;
  mutable int module_contexts = 0;
  mutable int tensor_contexts = 0;
  template <class P>
  fabric::DefaultDtypeGuard module_init_context(const P& /*precision*/) const {
    ++module_contexts;
    return fabric::DefaultDtypeGuard(P::param_dtype());
  }
  template <class P>
  fabric::DefaultDtypeGuard tensor_init_context(const P& /*precision*/) const {
    ++tensor_contexts;
    return fabric::DefaultDtypeGuard(P::param_dtype());
  }
};

}  // namespace

// Lightning: tests_fabric/plugins/precision/test_double_integration.py::test_double_precision
TEST_CASE("64-true: a module built under init_module trains in float64, its complex buffer complex128",
          "[precision][lightning]") {
  CpuFabric<fabric::FP64> fabric;
  DoubleModule net{nullptr};
  {
    auto guard = fabric.init_module();
    net = DoubleModule();
  }
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, adam);
  const auto batch = torch::rand({2, 32});
  CHECK(net->layer->weight.scalar_type() == torch::kDouble);
  CHECK(net->layer->bias.scalar_type() == torch::kDouble);
  CHECK(net->complex_buffer.scalar_type() == torch::kComplexDouble);
  CHECK(batch.scalar_type() == torch::kFloat);
  const auto output = model(batch);
  CHECK(net->input_dtype == torch::kDouble);
  CHECK(net->new_tensor_dtype == torch::kDouble);
  CHECK(output.scalar_type() == torch::kFloat);
  fabric.backward(torch::mse_loss(output, torch::ones_like(output)));
  CHECK(net->layer->weight.grad().scalar_type() == torch::kDouble);
  optimizer.step();
  optimizer.zero_grad();
}

// Lightning: tests_fabric/test_fabric.py::test_init_module_context
// Lightning: tests_fabric/test_fabric.py::test_init_tensor_context
TEST_CASE("init_module and init_tensor: the strategy's context where it makes one, else the precision's dtype",
          "[precision][lightning]") {
  fabric::Fabric<fabric::CPU, CountingStrategy, fabric::FP64> fabric;
  STATIC_REQUIRE(fabric::ProvidesModuleInitContext<CountingStrategy, fabric::FP64>);
  STATIC_REQUIRE_FALSE(fabric::ProvidesModuleInitContext<fabric::SingleDevice, fabric::FP64>);
  {
    auto guard = fabric.init_module();
    CHECK(torch::ones({1}).scalar_type() == torch::kDouble);
  }
  CHECK(fabric.strategy().module_contexts == 1);
  CHECK(fabric.strategy().tensor_contexts == 0);
  {
    auto guard = fabric.init_tensor();
    CHECK(torch::ones({1}).scalar_type() == torch::kDouble);
  }
  CHECK(fabric.strategy().module_contexts == 1);
  CHECK(fabric.strategy().tensor_contexts == 1);
  CHECK(torch::ones({1}).scalar_type() == torch::kFloat);
  // Without one, the precision's dtype (fp32 keeps the default).
  CpuFabric<fabric::FP32> plain;
  auto guard = plain.init_module();
  CHECK(torch::ones({1}).scalar_type() == torch::kFloat);
}

// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_default_scaler
// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_scaler_with_bf16
TEST_CASE("16-mixed scales with a GradScaler where float16 autocasts; bf16-mixed has none and refuses one",
          "[precision][scaler][lightning]") {
  fabric::FP16Mixed half;
  half.setup_device(torch::Device(torch::kCPU));
  CHECK((half.scaler() != nullptr) == (half.compute_dtype() == torch::kHalf));
  fabric::BF16Mixed bf16;
  bf16.setup_device(torch::Device(torch::kCPU));
  CHECK(bf16.scaler() == nullptr);
  CHECK_NOTHROW(fabric::BF16Mixed(fabric::BF16Mixed::Options{}));
  CHECK_THROWS_WITH(fabric::BF16Mixed({.scaler = {.init_scale = 1024.0}}),
                    ContainsSubstring("bf16-mixed does not use a gradient scaler"));
  CHECK_NOTHROW(fabric::FP16Mixed({.scaler = {.init_scale = 1024.0}}));
  if (fabric::CUDA::is_available()) {
    fabric::FP16Mixed cuda;
    cuda.setup_device(torch::Device(torch::kCUDA, 0));
    CHECK(cuda.scaler() != nullptr);
  }
}

// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_forward_context
TEST_CASE("the mixed precisions' forward context autocasts to their dtype", "[precision][autocast][lightning]") {
  fabric::BF16Mixed bf16;
  bf16.setup_device(torch::Device(torch::kCPU));
  CHECK(torch::ones({1}).scalar_type() == torch::kFloat);
  CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
  {
    auto guard = bf16.forward_context();
    CHECK(fabric::detail::autocast_enabled(torch::kCPU));
    CHECK(fabric::detail::autocast_dtype(torch::kCPU) == torch::kBFloat16);
    CHECK(torch::ones({1}).scalar_type() == torch::kFloat);  // autocast, not the default dtype
  }
  CHECK_FALSE(fabric::detail::autocast_enabled(torch::kCPU));
  if (fabric::CUDA::is_available()) {
    fabric::FP16Mixed half;
    half.setup_device(torch::Device(torch::kCUDA, 0));
    auto guard = half.forward_context();
    CHECK(fabric::detail::autocast_enabled(torch::kCUDA));
    CHECK(fabric::detail::autocast_dtype(torch::kCUDA) == torch::kHalf);
  }
}

namespace {

/// A one-weight problem: the gradient of sum(w * x) is x.
struct Rig {
  torch::Tensor w = torch::ones({3}, torch::requires_grad());
  torch::optim::SGD sgd{std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(0.5)};
  torch::Tensor loss() const { return (w * torch::tensor({1.0f, 2.0f, 3.0f})).sum(); }
};

template <class P>
P on_cpu() {
  P precision;
  precision.setup_device(torch::Device(torch::kCPU));
  return precision;
}

}  // namespace

// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_backward
TEST_CASE("the mixed precisions' backward scales the loss with a scaler and passes backward's arguments",
          "[precision][scaler][lightning]") {
  const auto check = [](auto precision) {
    Rig rig;
    auto loss = rig.loss();
    precision.backward(loss, torch::Tensor(), /*retain_graph=*/true);
    const double scale = precision.scaler() != nullptr ? precision.scaler()->get_scale() : 1.0;
    CHECK(torch::allclose(rig.w.grad(), torch::tensor({1.0f, 2.0f, 3.0f}) * scale));
    precision.backward(loss);  // the graph was retained: a second backward accumulates
    CHECK(torch::allclose(rig.w.grad(), torch::tensor({2.0f, 4.0f, 6.0f}) * scale));
  };
  check(on_cpu<fabric::BF16Mixed>());
  check(on_cpu<fabric::FP16Mixed>());
}

// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_optimizer_step_with_scaler
TEST_CASE("16-mixed steps through its scaler: the step unscales, and the scale is updated",
          "[precision][scaler][lightning]") {
  auto precision = on_cpu<fabric::FP16Mixed>();
  if (precision.scaler() == nullptr) SKIP("float16 does not autocast on this LibTorch's CPU (no scaler)");
  Rig rig;
  precision.backward(rig.loss());
  precision.optimizer_step(rig.sgd, nullptr);
  // scaler.step unscales before stepping: w - 0.5 * x, not w - 0.5 * scale * x.
  CHECK(torch::allclose(rig.w.detach(), torch::tensor({0.5f, 0.0f, -0.5f})));
  // scaler.update ran: an inf gradient halves the scale at the next step.
  const double before = precision.scaler()->get_scale();
  rig.w.mutable_grad() = torch::full({3}, std::numeric_limits<float>::infinity());
  precision.optimizer_step(rig.sgd, nullptr);
  CHECK(precision.scaler()->get_scale() == before / 2);
  CHECK(torch::allclose(rig.w.detach(), torch::tensor({0.5f, 0.0f, -0.5f})));  // the inf step was skipped
}

// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_optimizer_step_without_scaler
TEST_CASE("bf16-mixed steps the optimizer itself", "[precision][lightning]") {
  auto precision = on_cpu<fabric::BF16Mixed>();
  Rig rig;
  precision.backward(rig.loss());
  precision.optimizer_step(rig.sgd, nullptr);
  CHECK(torch::allclose(rig.w.detach(), torch::tensor({0.5f, 0.0f, -0.5f})));
}

// Lightning: tests_fabric/test_connector.py::test_precision_selection
TEST_CASE("each precision type is the policy of Lightning's precision string", "[precision][lightning]") {
  // Lightning picks DoublePrecision, Precision, HalfPrecision and MixedPrecision from the strings; fabric's
  // precision is the type: each of them is a policy with that name.
  STATIC_REQUIRE(fabric::Precision<fabric::FP64> && fabric::FP64::name == "64-true");
  STATIC_REQUIRE(fabric::Precision<fabric::FP32> && fabric::FP32::name == "32-true");
  STATIC_REQUIRE(fabric::Precision<fabric::FP16True> && fabric::FP16True::name == "16-true");
  STATIC_REQUIRE(fabric::Precision<fabric::BF16True> && fabric::BF16True::name == "bf16-true");
  STATIC_REQUIRE(fabric::Precision<fabric::FP16Mixed> && fabric::FP16Mixed::name == "16-mixed");
  STATIC_REQUIRE(fabric::Precision<fabric::BF16Mixed> && fabric::BF16Mixed::name == "bf16-mixed");
  CHECK(CpuFabric<fabric::FP64>().precision().param_dtype() == torch::kDouble);
  CHECK(CpuFabric<fabric::BF16Mixed>().precision().compute_dtype() == torch::kBFloat16);
}

namespace {

/// A user's mixed precision derived from fabric's (Lightning's MyAMP).
struct MyAMP : fabric::FP16Mixed {
  static constexpr std::string_view name = "my-amp";
};

}  // namespace

// Lightning: tests_fabric/test_connector.py::test_precision_selection_amp_ddp
TEST_CASE("16-mixed and a user's subclass of it under DDP on the CPU", "[precision][lightning]") {
  fabric::Fabric<fabric::CPU, fabric::DDP, fabric::FP16Mixed> amp({.devices = 2});
  CHECK(amp.world_size() == 2);
  STATIC_REQUIRE(std::is_same_v<decltype(amp)::precision_type, fabric::FP16Mixed>);
  fabric::Fabric<fabric::CPU, fabric::DDP, MyAMP> mine({.devices = 2});
  STATIC_REQUIRE(std::is_same_v<decltype(mine)::precision_type, MyAMP>);
  CHECK(mine.precision().compute_dtype() == amp.precision().compute_dtype());
}

// Lightning left out: tests_fabric/plugins/precision/test_amp_integration.py::test_amp_fused_optimizer_parity - LibTorch's C++ Adam has no fused implementation to compare with
// Lightning left out: tests_fabric/plugins/precision/test_utils.py::test_class_replacement_context_manager - swaps classes in Python modules (torch.nn.Linear) for a scope; C++ classes cannot be replaced at run time
// Lightning left out: tests_fabric/test_connector.py::test_precision_and_precision_plugin_raises - the precision is one template argument of Fabric: there is no second way to give it, so nothing to conflict
// Lightning left out: tests_fabric/test_connector.py::test_precision_from_environment - LT_PRECISION comes from Lightning's CLI; fabric's precision is a template argument fixed at compile time, and fabric-run has no --precision
// Lightning left out: tests_fabric/test_connector.py::test_precision_selection_model_parallel - fabric has no ModelParallel strategy (it builds on DTensor and torch.distributed.tensor.parallel, which LibTorch's C++ API lacks)
// Lightning left out: tests_fabric/test_connector.py::test_bitsandbytes_precision_cuda_required - bitsandbytes is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_bitsandbytes.py::test_bitsandbytes_plugin - bitsandbytes is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_bitsandbytes.py::test_bitsandbytes_layers - bitsandbytes is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_bitsandbytes.py::test_bitsandbytes_layers_meta_device - bitsandbytes is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_bitsandbytes.py::test_load_quantized_checkpoint - bitsandbytes is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_invalid_precision_with_deepspeed_precision - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_deepspeed_precision_backward - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_deepspeed_engine_is_steppable - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_deepspeed_precision_optimizer_step - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_selected_dtype - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_module_init_context - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed.py::test_convert_module - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_deepspeed_integration.py::test_deepspeed_precision_choice - DeepSpeed is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_transformer_engine.py::test_transformer_engine_plugin - Transformer Engine is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_transformer_engine.py::test_convert_module_handles_linear_without_bias - Transformer Engine is a Python library
// Lightning left out: tests_fabric/plugins/precision/test_xla.py::test_precision_input_validation - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/plugins/precision/test_xla.py::test_selected_dtype - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/plugins/precision/test_xla.py::test_teardown - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/plugins/precision/test_xla_integration.py::test_xla_precision - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_module_init_context - FSDPPrecision's init context; fabric has no FSDP precision plugin: init_module under FSDP is the precision policy's own (see this file's init_module tests)
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_default_scaler - FSDPPrecision's ShardedGradScaler; fabric::FSDP refuses 16-mixed with sharded gradients (each process would check only its shard for infinities): see tests/unit/strategies/fsdp_test.cpp
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_scaler_with_bf16 - FSDPPrecision's scaler argument; fabric's BF16Mixed has no scaler by type, and fabric has no FSDP precision plugin
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_forward_context_f16 - FSDPPrecision's forward context; fabric::FSDP uses the precision policy's forward_context, tested in this file for 16-mixed
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_forward_context_bf16 - FSDPPrecision's forward context; fabric::FSDP uses the precision policy's forward_context, tested in this file for bf16-mixed
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_backward - FSDPPrecision's backward; fabric::FSDP runs backward through the precision policy (ParallelStrategy::backward), tested in this file
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_optimizer_step_with_scaler - FSDPPrecision's ShardedGradScaler step; fabric::FSDP refuses 16-mixed with sharded gradients: see tests/unit/strategies/fsdp_test.cpp
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_fsdp_precision_optimizer_step_without_scaler - FSDPPrecision's step; fabric::FSDP steps through the precision policy's optimizer_step, tested in this file
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_invalid_precision_with_fsdp_precision - FSDPPrecision rejects precision strings; fabric's precisions are types, checked at compile time
// Lightning left out: tests_fabric/plugins/precision/test_fsdp.py::test_convert_module - FSDPPrecision's convert_module; fabric::FSDP takes the module as the precision policy converted it (convert_module tests in this file)
