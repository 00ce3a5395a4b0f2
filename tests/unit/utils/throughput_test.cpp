// Throughput, ThroughputMonitor, get_available_flops, measure_flops and transformer_flops: the cases of
// Lightning's tests_fabric/utilities/test_throughput.py, one by one (each names its Lightning test), and
// fabric's error paths.

// NOTE: only the umbrella header: CI builds the tests against the single header too.
#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <catch2/catch_all.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

#if FABRIC_TORCH_AT_LEAST(2, 0)
namespace warning_utils = c10::WarningUtils;
#else
namespace warning_utils = c10::Warning;
#endif

/// Collects the warnings of c10's TORCH_WARN while it lives.
class WarningCapture : public c10::WarningHandler {
 public:
  WarningCapture() : guard_(this) {}
#if FABRIC_TORCH_AT_LEAST(2, 0)
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
#else
  void process(const c10::SourceLocation& /*where*/, const std::string& msg, const bool /*verbatim*/) override {
    messages.push_back(msg);
  }
#endif
  /// True when a captured warning contains text.
  bool saw(const std::string& text) const {
    for (const auto& m : messages) {
      if (m.find(text) != std::string::npos) return true;
    }
    return false;
  }
  std::vector<std::string> messages;

 private:
  warning_utils::WarningHandlerGuard guard_;
};

/// A logger that keeps every log_metrics call.
class RecordingLogger : public fabric::Logger {
 public:
  std::string name() const override { return "recording"; }
  std::string version() const override { return "0"; }
  void log_metrics(const fabric::Metrics& metrics, std::optional<std::int64_t> step) override {
    calls.emplace_back(metrics, step);
  }
  void log_hyperparams(const fabric::Hyperparameters& /*params*/) override {}
  std::vector<std::pair<fabric::Metrics, std::optional<std::int64_t>>> calls;
};

/// A stand-in for Fabric (Lightning's tests use a Mock): a world size, a rank and the log_dict calls.
struct FakeFabric {
  int world = 1;
  int rank = 0;
  std::vector<std::pair<fabric::Metrics, std::optional<std::int64_t>>> logged;
  c10::Device device() const { return c10::Device(c10::DeviceType::CPU); }
  int world_size() const { return world; }
  bool is_global_zero() const { return rank == 0; }
  void log_dict(const fabric::Metrics& metrics, std::optional<std::int64_t> step) {
    logged.emplace_back(metrics, step);
  }
};

/// Lightning's mock_train_loop: a lit-gpt style loop of five iterations with fake times.
template <class Monitor>
void mock_train_loop(Monitor& monitor) {
  std::int64_t total_lengths = 0;
  const double total_t0 = 0.0;
  const std::int64_t micro_batch_size = 3;
  for (std::int64_t iter_num = 1; iter_num < 6; ++iter_num) {
    const double t1 = static_cast<double>(iter_num) + 0.5;
    total_lengths += 3 * 2;
    monitor.update({.time = t1 - total_t0,
                    .batches = iter_num,
                    .samples = iter_num * micro_batch_size,
                    .lengths = total_lengths,
                    .flops = 10});
    monitor.compute_and_log();
  }
}

using M = fabric::Metrics;
using Calls = std::vector<std::pair<M, std::optional<std::int64_t>>>;

/// The metrics of each logged call.
std::vector<M> metrics_of(const Calls& calls) {
  std::vector<M> out;
  for (const auto& c : calls) out.push_back(c.first);
  return out;
}
/// The step of each logged call (-100 for none).
std::vector<std::int64_t> steps_of(const Calls& calls) {
  std::vector<std::int64_t> out;
  for (const auto& c : calls) out.push_back(c.second.value_or(-100));
  return out;
}

}  // namespace

// Lightning: tests_fabric/utilities/test_throughput.py::test_measure_flops
// Lightning's BoringModel is a Linear(32, 2), batch 2; here with the exact counts.
TEST_CASE("measure_flops: a Linear forward is 2*B*in*out, forward and backward more", "[throughput]") {
  torch::nn::Linear model(32, 2);
  const auto x = torch::randn({2, 32});
  const auto model_fwd = [&] { return model(x); };
  const auto model_loss = [](const at::Tensor& y) { return y.sum(); };

  const std::uint64_t fwd_flops = fabric::measure_flops(model, model_fwd);
  CHECK(fwd_flops == 2 * 2 * 32 * 2);
  const std::uint64_t fwd_and_bwd_flops = fabric::measure_flops(model, model_fwd, model_loss);
  CHECK(fwd_flops < fwd_and_bwd_flops);
  // The input needs no gradient: the backward computes the weight's only (one more product), as
  // FlopCounterMode counts it.
  CHECK(fwd_and_bwd_flops == 2 * fwd_flops);
  // The forms without the model.
  CHECK(fabric::measure_flops(model_fwd) == fwd_flops);
  CHECK(fabric::measure_flops(model_fwd, model_loss) == fwd_and_bwd_flops);
}

TEST_CASE("measure_flops: forward and backward of a Linear whose input needs a gradient is 3x the forward",
          "[throughput]") {
  const std::int64_t batch = 4, in = 32, out = 16;
  torch::nn::Linear linear(in, out);
  const auto x = torch::randn({batch, in}).requires_grad_();
  const std::uint64_t fwd = fabric::measure_flops([&] { return linear(x); });
  CHECK(fwd == static_cast<std::uint64_t>(2 * batch * in * out));
  const std::uint64_t all =
      fabric::measure_flops([&] { return linear(x); }, [](const at::Tensor& y) { return y.sum(); });
  CHECK(all == 3 * fwd);
}

TEST_CASE("measure_flops: tensors on the meta device count the same (nothing is computed)", "[throughput]") {
  // Lightning builds the model on the meta device; LibTorch 1.13 cannot move a module there
  // (variable.set_data refuses), but functional operators on meta tensors are profiled from their shapes.
  const auto meta = torch::TensorOptions().device(c10::Device(c10::DeviceType::Meta));
  const auto w = torch::empty({16, 32}, meta).requires_grad_();
  const auto b = torch::empty({16}, meta).requires_grad_();
  const auto x = torch::empty({4, 32}, meta).requires_grad_();
  const auto fwd = [&] { return torch::nn::functional::linear(x, w, b); };
  CHECK(fabric::measure_flops(fwd) == 2 * 4 * 32 * 16);
  CHECK(fabric::measure_flops(fwd, [](const at::Tensor& y) { return y.sum(); }) == 3 * 2 * 4 * 32 * 16);
}

TEST_CASE("measure_flops: an MLP's forward and backward, layer by layer", "[throughput]") {
  const std::int64_t b = 4, d0 = 32, d1 = 64, d2 = 8;
  torch::nn::Sequential mlp(torch::nn::Linear(d0, d1), torch::nn::ReLU(), torch::nn::Linear(d1, d2));
  const auto x = torch::randn({b, d0});
  const std::uint64_t fwd = fabric::measure_flops(mlp, [&] { return mlp->forward(x); });
  CHECK(fwd == static_cast<std::uint64_t>(2 * b * (d0 * d1 + d1 * d2)));
  // Backward: the first layer's weight gradient; the second layer's weight and input gradients.
  const std::uint64_t all = fabric::measure_flops(
      mlp, [&] { return mlp->forward(x); }, [](const at::Tensor& y) { return y.sum(); });
  CHECK(all == fwd + static_cast<std::uint64_t>(2 * b * d0 * d1 + 2 * 2 * b * d1 * d2));
}

TEST_CASE("measure_flops: a stack of bias-free Linears trains at 6 FLOPs per parameter and sample", "[throughput]") {
  // 6·N·tokens of transformer_flops, checked against the profiler: 2 N B forward, 4 N B backward.
  const std::int64_t b = 5;
  torch::nn::Sequential net(torch::nn::Linear(torch::nn::LinearOptions(16, 32).bias(false)),
                            torch::nn::Linear(torch::nn::LinearOptions(32, 8).bias(false)));
  std::int64_t n = 0;
  for (const auto& p : net->parameters()) n += p.numel();
  const auto x = torch::randn({b, 16}).requires_grad_();
  const std::uint64_t all =
      fabric::measure_flops([&] { return net->forward(x); }, [](const at::Tensor& y) { return y.sum(); });
  CHECK(all == static_cast<std::uint64_t>(6 * n * b));
}

TEST_CASE("measure_flops: matrix products count, elementwise operators do not (as FlopCounterMode)", "[throughput]") {
  const auto a = torch::randn({2, 4, 8, 8});
  CHECK(fabric::measure_flops([&] { return torch::matmul(a, a); }) == 2 * 8 * 8 * 8 * 8);  // bmm of 8 batches
  CHECK(fabric::measure_flops([&] { return a + a; }) == 0);
  CHECK(fabric::measure_flops([&] { return a * a; }) == 0);
  CHECK(fabric::measure_flops([&] { return torch::relu(a); }) == 0);
}

TEST_CASE("measure_flops: under autocast a matrix product counts once", "[throughput]") {
  // Autocast casts the inputs and calls aten::addmm again; the profiler records both calls.
  torch::nn::Linear linear(32, 16);
  const auto x = torch::randn({4, 32});
  const std::uint64_t fwd = fabric::measure_flops([&] {
    fabric::AutocastGuard autocast(c10::DeviceType::CPU, c10::ScalarType::BFloat16);
    return linear(x);
  });
  CHECK(fwd == 2 * 4 * 32 * 16);
}

TEST_CASE("measure_flops: repeated identical products each count", "[throughput]") {
  const auto a = torch::randn({2, 2});
  const std::uint64_t flops = fabric::measure_flops([&] {
    at::Tensor y = a;
    for (int i = 0; i < 200; ++i) y = torch::mm(a, a);
    return y;
  });
  CHECK(flops == 200 * 2 * 2 * 2 * 2);
}

TEST_CASE("measure_flops: errors", "[throughput]") {
  SECTION("a forward that throws leaves no profiler running") {
    CHECK_THROWS_WITH(fabric::measure_flops([]() -> at::Tensor { throw std::runtime_error("boom"); }), "boom");
    CHECK_FALSE(torch::profiler::impl::profilerEnabled());
    torch::nn::Linear linear(8, 4);
    const auto x = torch::randn({3, 8});
    CHECK(fabric::measure_flops([&] { return linear(x); }) == 2 * 3 * 8 * 4);
  }
  SECTION("inside a running profiler") {
    const auto a = torch::randn({4, 4});
    const std::uint64_t outer = fabric::detail::profile_flops([&] {
      CHECK_THROWS_WITH(fabric::measure_flops([&] { return torch::mm(a, a); }),
                        ContainsSubstring("measure_flops: expected no profiler running on this thread, found one"));
      (void)torch::mm(a, a);
    });
    CHECK(outer == 2 * 4 * 4 * 4);
  }
}

TEST_CASE("measure_flops: a CUDA Linear's forward and backward (the backward runs on autograd's device thread)",
          "[throughput][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no CUDA device");
  const std::int64_t batch = 8, in = 64, out = 32;
  torch::nn::Linear linear(in, out);
  linear->to(torch::kCUDA);
  const auto x = torch::randn({batch, in}, torch::kCUDA).requires_grad_();
  const std::uint64_t fwd = fabric::measure_flops([&] { return linear(x); });
  CHECK(fwd == static_cast<std::uint64_t>(2 * batch * in * out));
  CHECK(fabric::measure_flops([&] { return linear(x); }, [](const at::Tensor& y) { return y.sum(); }) == 3 * fwd);
  // bf16-mixed: autocast's second aten::addmm is not counted again.
  const auto autocast_fwd = [&] {
    fabric::AutocastGuard autocast(c10::DeviceType::CUDA, c10::ScalarType::BFloat16);
    return linear(x);
  };
  CHECK(fabric::measure_flops(autocast_fwd) == fwd);
  CHECK(fabric::measure_flops(autocast_fwd, [](const at::Tensor& y) { return y.to(at::kFloat).sum(); }) == 3 * fwd);
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_get_available_flops
// The XLA cases have no counterpart: fabric has no TPU accelerator.
TEST_CASE("get_available_flops: a known name, an unknown one, an unsupported dtype", "[throughput]") {
  CHECK(fabric::get_available_flops("NVIDIA H100 PCIe", c10::ScalarType::BFloat16) == 756e12);

  {
    WarningCapture warnings;
    CHECK_FALSE(fabric::get_available_flops("CocoNut", c10::ScalarType::BFloat16).has_value());
    CHECK(warnings.saw("not found for 'CocoNut'"));
  }
  {
    WarningCapture warnings;
    CHECK_FALSE(fabric::get_available_flops("t4", c10::ScalarType::BFloat16).has_value());
    CHECK(warnings.saw("t4' does not support torch.bfloat16"));
  }
  {
    WarningCapture warnings;
    CHECK_FALSE(fabric::get_available_flops("NVIDIA GeForce RTX 3070 Ti", c10::ScalarType::Float).has_value());
    CHECK(warnings.saw("chip is 'rtx 3070 ti'"));
  }
  // No peak for the CPU, and no warning either.
  WarningCapture warnings;
  CHECK_FALSE(fabric::get_available_flops(c10::Device(c10::DeviceType::CPU), c10::ScalarType::Float).has_value());
  CHECK(warnings.messages.empty());
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_get_available_flops_cuda_mapping_exists
// With Lightning's _is_ampere_or_later patched to False (tf32 = false).
TEST_CASE("get_available_flops: Lightning's known CUDA device names", "[throughput]") {
  const char* name = GENERATE(
      "NVIDIA H200 SXM1", "NVIDIA H200 NVL1", "h100-nvl", "h100-hbm3", "NVIDIA H100 PCIe", "h100-hbm2e",
      "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4080", "Tesla L40", "NVIDIA L4", "NVIDIA A100 80GB PCIe",
      "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 3080",
      "NVIDIA GeForce RTX 3080 Ti", "NVIDIA GeForce RTX 3070", "NVIDIA A6000", "NVIDIA A40", "NVIDIA A10G",
      "NVIDIA GeForce RTX 2080 SUPER", "NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 2080",
      "NVIDIA GeForce RTX 2070 Super", "Quadro RTX 5000 with Max-Q Design", "Tesla T4", "TITAN RTX",
      "Tesla V100-SXm2-32GB", "Tesla V100-PCIE-32GB", "Tesla V100S-PCIE-32GB",
      // the names the driver gives (beyond Lightning's list)
      "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA RTX A6000", "NVIDIA A10G");
  CAPTURE(name);
  CHECK(fabric::get_available_flops(name, c10::ScalarType::Float, false).has_value());
}

// The xfail cases of Lightning's test_get_available_flops_cuda_mapping_exists: parsed, but no figures.
TEST_CASE("get_available_flops: devices without figures", "[throughput]") {
  const char* name = GENERATE("NVIDIA GeForce RTX 3070 Ti", "NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 3060 Ti",
                              "NVIDIA GeForce RTX 3050", "NVIDIA GeForce RTX 3050 Ti", "NVIDIA L40S");
  CAPTURE(name);
  WarningCapture warnings;
  CHECK_FALSE(fabric::get_available_flops(name, c10::ScalarType::Float, false).has_value());
  CHECK(warnings.saw("chip is"));
}

TEST_CASE("get_available_flops: the H200 has the H100 SXM's peaks; float32 counts as TF32 where allowed",
          "[throughput]") {
  for (auto dtype : {c10::ScalarType::Double, c10::ScalarType::Float, c10::ScalarType::BFloat16, c10::ScalarType::Half,
                     c10::ScalarType::Char}) {
    CHECK(fabric::get_available_flops("NVIDIA H200", dtype) ==
          fabric::get_available_flops("NVIDIA H100 80GB HBM3", dtype));
  }
  CHECK(fabric::get_available_flops("NVIDIA H200", c10::ScalarType::BFloat16) == 9.895e14);
  CHECK(fabric::get_available_flops("NVIDIA A100-SXM4-40GB", c10::ScalarType::Float, false) == 1.95e13);
  CHECK(fabric::get_available_flops("NVIDIA A100-SXM4-40GB", c10::ScalarType::Float, true) == 1.56e14);
  WarningCapture warnings;
  CHECK_FALSE(fabric::get_available_flops("Tesla V100-SXM2-16GB", c10::ScalarType::Float, true).has_value());
  CHECK(warnings.saw("does not support tfloat32"));
  CHECK(fabric::get_cuda_chip("NVIDIA H100 80GB HBM3") == "h100 sxm");
  CHECK(fabric::get_cuda_chip("NVIDIA GeForce RTX 4080 SUPER") == "rtx 4080 super");
  CHECK_FALSE(fabric::get_cuda_chip("Apple M2").has_value());
}

TEST_CASE("get_available_flops: the CUDA device's name from the driver", "[throughput][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no CUDA device");
  const auto name = fabric::cuda_device_name(c10::Device(c10::DeviceType::CUDA, 0));
  REQUIRE(name.has_value());
  CHECK_FALSE(name->empty());
  UNSCOPED_INFO("CUDA device 0: " << *name);
  const auto chip = fabric::get_cuda_chip(*name);
  if (!chip) SKIP("this GPU (" + *name + ") is not in the peak table");
  const auto peak = fabric::get_available_flops(c10::Device(c10::DeviceType::CUDA, 0), c10::ScalarType::BFloat16);
  REQUIRE(peak.has_value());
  CHECK(*peak == fabric::get_available_flops(*name, c10::ScalarType::BFloat16));
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput
TEST_CASE("Throughput: Lightning's cases", "[throughput]") {
  // required args only
  {
    fabric::Throughput throughput;
    throughput.update({.time = 2.0, .batches = 1, .samples = 2});
    CHECK(throughput.compute() == M{{"time", 2.0}, {"batches", 1}, {"samples", 2}});
    // different lengths and samples
    CHECK_THROWS_WITH(throughput.update({.time = 2.1, .batches = 2, .samples = 3, .lengths = 4}),
                      ContainsSubstring("found 1 lengths for 2 samples"));
    CHECK(throughput.compute() == M{{"time", 2.0}, {"batches", 1}, {"samples", 2}});  // nothing changed
  }
  // lengths and samples
  {
    fabric::Throughput throughput({.window_size = 2});
    throughput.update({.time = 2, .batches = 1, .samples = 2, .lengths = 4});
    throughput.update({.time = 2.5, .batches = 2, .samples = 4, .lengths = 8});
    CHECK(throughput.compute() == M{{"time", 2.5},
                                    {"batches", 2},
                                    {"samples", 4},
                                    {"lengths", 8},
                                    {"device/batches_per_sec", 2.0},
                                    {"device/samples_per_sec", 4.0},
                                    {"device/items_per_sec", 8.0}});
    CHECK_THROWS_WITH(throughput.update({.time = 2.5, .batches = 3, .samples = 2, .lengths = 4}),
                      ContainsSubstring("expected time to increase with every call, found 2.5 after 2.5"));
  }
  // flops
  {
    fabric::Throughput throughput({.available_flops = 50, .window_size = 2, .using_sparse_model = false});
    throughput.update({.time = 1, .batches = 1, .samples = 2, .lengths = 10, .flops = 10});
    throughput.update({.time = 2, .batches = 2, .samples = 4, .lengths = 20, .flops = 10});
    CHECK(throughput.compute() == M{{"time", 2},
                                    {"batches", 2},
                                    {"samples", 4},
                                    {"lengths", 20},
                                    {"device/batches_per_sec", 1.0},
                                    {"device/flops_per_sec", 10.0},
                                    {"device/items_per_sec", 10.0},
                                    {"device/mfu", 0.2},
                                    {"device/samples_per_sec", 2.0}});
    // reset forgets the updates
    throughput.reset();
    CHECK_THROWS_WITH(throughput.compute(), ContainsSubstring("expected at least one update() before compute()"));
  }
  // flops without available
  {
    fabric::Throughput throughput({.window_size = 2});
    throughput.update(1, 1, 2, 10, 10);
    throughput.update(2, 2, 4, 20, 10);
    CHECK(throughput.compute() == M{{"time", 2},
                                    {"batches", 2},
                                    {"samples", 4},
                                    {"lengths", 20},
                                    {"device/batches_per_sec", 1.0},
                                    {"device/flops_per_sec", 10.0},
                                    {"device/items_per_sec", 10.0},
                                    {"device/samples_per_sec", 2.0}});
  }
  {
    fabric::Throughput throughput({.window_size = 2});
    CHECK_THROWS_WITH(throughput.update({.time = 0, .batches = 2, .samples = 1}),
                      ContainsSubstring("expected samples >= batches, found samples = 1 and batches = 2"));
  }
  {
    fabric::Throughput throughput({.window_size = 2});
    CHECK_THROWS_WITH(throughput.update({.time = 0, .batches = 2, .samples = 2, .lengths = 1}),
                      ContainsSubstring("expected lengths >= samples, found lengths = 1 and samples = 2"));
  }
}

TEST_CASE("Throughput: the rolling window and the monotonic checks of every total", "[throughput]") {
  fabric::Throughput throughput({.window_size = 3});
  throughput.update({.time = 1, .batches = 1, .samples = 4});
  throughput.update({.time = 2, .batches = 2, .samples = 8});
  CHECK_FALSE(throughput.compute().contains("device/samples_per_sec"));  // the window is not full yet
  throughput.update({.time = 3, .batches = 3, .samples = 12});
  CHECK(throughput.compute().at("device/samples_per_sec") == 4.0);
  throughput.update({.time = 3.5, .batches = 4, .samples = 16});  // the window is now times 2, 3, 3.5
  CHECK(throughput.compute().at("device/samples_per_sec") == Catch::Approx(8.0 / 1.5));
  CHECK_THROWS_WITH(throughput.update({.time = 4, .batches = 4, .samples = 20}),
                    ContainsSubstring("expected batches to increase with every call, found 4 after 4"));
  CHECK_THROWS_WITH(throughput.update({.time = 4, .batches = 5, .samples = 16}),
                    ContainsSubstring("expected samples to increase"));
  CHECK(throughput.compute().at("time") == 3.5);  // a refused update changes nothing
}

TEST_CASE("Throughput: global rates and FLOPs above one device", "[throughput]") {
  fabric::Throughput throughput(
      {.available_flops = 100, .world_size = 4, .window_size = 2, .using_sparse_model = false});
  throughput.update({.time = 1, .batches = 1, .samples = 2, .lengths = 6, .flops = 20});
  throughput.update({.time = 3, .batches = 2, .samples = 4, .lengths = 12, .flops = 20});
  CHECK(throughput.compute() == M{{"time", 3},
                                  {"batches", 2},
                                  {"samples", 4},
                                  {"lengths", 12},
                                  {"device/batches_per_sec", 0.5},
                                  {"device/samples_per_sec", 1.0},
                                  {"device/items_per_sec", 3.0},
                                  {"batches_per_sec", 2.0},
                                  {"samples_per_sec", 4.0},
                                  {"items_per_sec", 12.0},
                                  {"flops_per_sec", 40.0},
                                  {"device/flops_per_sec", 10.0},
                                  {"device/mfu", 0.1}});
}

TEST_CASE("Throughput: errors in the settings", "[throughput]") {
  CHECK_THROWS_WITH(fabric::Throughput({.window_size = 1}), ContainsSubstring("expected window_size >= 2"));
  CHECK_THROWS_WITH(fabric::Throughput({.world_size = 0}), ContainsSubstring("expected world_size >= 1, found 0"));
  CHECK_THROWS_WITH(fabric::Throughput({.available_flops = -1, .using_sparse_model = false}),
                    ContainsSubstring("expected available_flops >= 0, found -1"));
  CHECK_THROWS_AS(fabric::Throughput({.window_size = 0}), fabric::Error);
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_sparse_model_scaling
TEST_CASE("Throughput: using_sparse_model scales the peak", "[throughput]") {
  CHECK(fabric::Throughput({.available_flops = 100.0, .using_sparse_model = false}).available_flops() == 100.0);
  CHECK(fabric::Throughput({.available_flops = 100.0, .using_sparse_model = true}).available_flops() == 200.0);
  CHECK(
      fabric::Throughput({.available_flops = 100.0, .using_sparse_model = true, .sparse_cuda_acceleration_factor = 4.0})
          .available_flops() == 400.0);
  CHECK_FALSE(fabric::Throughput({.using_sparse_model = true}).available_flops().has_value());
  CHECK_THROWS_WITH(fabric::Throughput(
                        {.available_flops = 100.0, .using_sparse_model = true, .sparse_cuda_acceleration_factor = 0.5}),
                    ContainsSubstring("sparsity cannot reduce the peak"));
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_sparse_model_warning
TEST_CASE("Throughput: a peak without using_sparse_model warns that MFU assumes a dense model", "[throughput]") {
  {
    WarningCapture warnings;
    fabric::Throughput throughput({.available_flops = 100.0});
    CHECK(warnings.saw("MFU assumes dense model FLOPs"));
    CHECK(throughput.available_flops() == 100.0);
  }
  WarningCapture warnings;
  fabric::Throughput dense({.available_flops = 100.0, .using_sparse_model = false});
  fabric::Throughput sparse({.available_flops = 100.0, .using_sparse_model = true});
  fabric::Throughput no_peak;
  CHECK(warnings.messages.empty());
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_sparse_model_mfu
TEST_CASE("Throughput: MFU halves when the sparse peak doubles", "[throughput]") {
  const auto mfu = [](bool sparse) {
    fabric::Throughput throughput({.available_flops = 50, .window_size = 2, .using_sparse_model = sparse});
    throughput.update({.time = 1, .batches = 1, .samples = 2, .flops = 10});
    throughput.update({.time = 2, .batches = 2, .samples = 4, .flops = 10});
    return throughput.compute().at("device/mfu");
  };
  CHECK(mfu(false) == 0.2);
  CHECK(mfu(true) == 0.1);
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_monitor
// Lightning patches get_available_flops to 100; here the explicit peak.
TEST_CASE("ThroughputMonitor: logs through a Fabric's loggers with a custom separator", "[throughput]") {
  auto logger = std::make_shared<RecordingLogger>();
  fabric::Fabric<fabric::CPU> fabric{{.loggers = {logger}}};
  fabric::ThroughputMonitor monitor(
      fabric, {.available_flops = 100, .window_size = 4, .separator = "|", .using_sparse_model = false});
  mock_train_loop(monitor);
  const auto steady = [](double t, double b) {
    return M{{"time", t},
             {"batches", b},
             {"samples", 3 * b},
             {"lengths", 6 * b},
             {"device|batches_per_sec", 1.0},
             {"device|samples_per_sec", 3.0},
             {"device|items_per_sec", 6.0},
             {"device|flops_per_sec", 10.0},
             {"device|mfu", 0.1}};
  };
  CHECK(metrics_of(logger->calls) == std::vector<M>{
                                         M{{"time", 1.5}, {"batches", 1}, {"samples", 3}, {"lengths", 6}},
                                         M{{"time", 2.5}, {"batches", 2}, {"samples", 6}, {"lengths", 12}},
                                         M{{"time", 3.5}, {"batches", 3}, {"samples", 9}, {"lengths", 18}},
                                         steady(4.5, 4),
                                         steady(5.5, 5),
                                     });
  CHECK(steps_of(logger->calls) == std::vector<std::int64_t>{0, 1, 2, 3, 4});
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_monitor_step
TEST_CASE("ThroughputMonitor: the step counts up, or is given", "[throughput]") {
  FakeFabric fake;
  fabric::ThroughputMonitor monitor(fake);
  CHECK(monitor.step() == -1);
  monitor.update({.time = 0.5, .batches = 1, .samples = 3});
  CHECK(monitor.compute_and_log() == M{{"time", 0.5}, {"batches", 1}, {"samples", 3}});
  CHECK(monitor.step() == 0);
  monitor.update({.time = 1.5, .batches = 2, .samples = 4});
  CHECK(monitor.compute_and_log(5) == M{{"time", 1.5}, {"batches", 2}, {"samples", 4}});
  CHECK(monitor.step() == 5);
  CHECK(metrics_of(fake.logged) == std::vector<M>{M{{"time", 0.5}, {"batches", 1}, {"samples", 3}},
                                                  M{{"time", 1.5}, {"batches", 2}, {"samples", 4}}});
  CHECK(steps_of(fake.logged) == std::vector<std::int64_t>{0, 5});
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_monitor_world_size
// Lightning sets monitor.world_size = 2; here the fabric has two.
TEST_CASE("ThroughputMonitor: the world size comes from the fabric", "[throughput]") {
  FakeFabric fake{.world = 2};
  fabric::ThroughputMonitor monitor(fake, {.available_flops = 100, .window_size = 4, .using_sparse_model = false});
  CHECK(monitor.world_size() == 2);
  mock_train_loop(monitor);
  const auto steady = [](double t, double b) {
    return M{{"time", t},
             {"batches", b},
             {"samples", 3 * b},
             {"lengths", 6 * b},
             {"device/batches_per_sec", 1.0},
             {"device/samples_per_sec", 3.0},
             {"batches_per_sec", 2.0},
             {"samples_per_sec", 6.0},
             {"items_per_sec", 12.0},
             {"device/items_per_sec", 6.0},
             {"flops_per_sec", 20.0},
             {"device/flops_per_sec", 10.0},
             {"device/mfu", 0.1}};
  };
  REQUIRE(fake.logged.size() == 5);
  CHECK(fake.logged[2].first == M{{"time", 3.5}, {"batches", 3}, {"samples", 9}, {"lengths", 18}});
  CHECK(fake.logged[3].first == steady(4.5, 4));
  CHECK(fake.logged[4].first == steady(5.5, 5));
  CHECK(steps_of(fake.logged) == std::vector<std::int64_t>{0, 1, 2, 3, 4});

  CHECK_THROWS_WITH(fabric::ThroughputMonitor(fake, {.world_size = 3}),
                    ContainsSubstring("expected world_size left at 1 (the monitor takes fabric.world_size() = 2), "
                                      "found 3"));
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_throughput_monitor_sparse_model
TEST_CASE("ThroughputMonitor: using_sparse_model scales the peak", "[throughput]") {
  FakeFabric fake;
  fabric::ThroughputMonitor monitor(fake, {.available_flops = 100, .using_sparse_model = true});
  CHECK(monitor.available_flops() == 200);
}

TEST_CASE("ThroughputMonitor: away from global rank zero nothing is computed or logged", "[throughput]") {
  FakeFabric fake{.world = 2, .rank = 1};
  WarningCapture warnings;
  fabric::ThroughputMonitor monitor(fake, {.available_flops = 100, .window_size = 2});
  CHECK(warnings.messages.empty());  // rank_zero_warn
  mock_train_loop(monitor);
  CHECK(monitor.compute().empty());
  CHECK(monitor.compute_and_log(7).empty());
  CHECK(fake.logged.empty());
}

TEST_CASE("ThroughputMonitor: on the CPU there is no peak, so no MFU", "[throughput]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  WarningCapture warnings;
  fabric::ThroughputMonitor monitor(fabric, {.window_size = 2});
  CHECK_FALSE(monitor.available_flops().has_value());
  CHECK(warnings.messages.empty());
  monitor.update({.time = 1, .batches = 1, .samples = 1, .flops = 5});
  monitor.update({.time = 2, .batches = 2, .samples = 2, .flops = 5});
  const M metrics = monitor.compute_and_log();
  CHECK(metrics.at("device/flops_per_sec") == 5.0);
  CHECK_FALSE(metrics.contains("device/mfu"));
}

TEST_CASE("ThroughputMonitor: the dtype of the peak follows the precision", "[throughput]") {
  CHECK(fabric::detail::compute_dtype(fabric::FP32{}) == c10::ScalarType::Float);
  CHECK(fabric::detail::compute_dtype(fabric::FP64{}) == c10::ScalarType::Double);
  CHECK(fabric::detail::compute_dtype(fabric::BF16True{}) == c10::ScalarType::BFloat16);
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  CHECK(fabric::detail::compute_dtype(fabric.precision()) == c10::ScalarType::BFloat16);
}

// Lightning: tests_fabric/utilities/test_throughput.py::test_monotonic_window
TEST_CASE("MonotonicWindow: appends increasing values and keeps the last maxlen", "[throughput]") {
  fabric::detail::MonotonicWindow<int> w("value", 3);
  CHECK(w.empty());
  CHECK(w.size() == 0);
  w.append(1);
  w.append(2);
  w.append(3);
  CHECK(w.values() == std::deque<int>{1, 2, 3});
  CHECK(w.size() == 3);
  CHECK(w.full());
  CHECK_THROWS_WITH(w.append(2), ContainsSubstring("expected value to increase with every call, found 2 after 3"));
  w.append(4);
  CHECK(w.values() == std::deque<int>{2, 3, 4});
  w.clear();
  w.append(2);
  CHECK(w.values() == std::deque<int>{2});
}

TEST_CASE("transformer_flops: 6 N per token plus the attention term", "[throughput]") {
  // GPT-2 small (examples/gpt2): N = 124,475,904, 12 layers, width 768, context 1024; 8 x 1024 tokens.
  const fabric::TransformerShape gpt2{.parameters = 124'475'904, .layers = 12, .width = 768, .context = 1024};
  const std::int64_t tokens = 8 * 1024;
  const double weights = 6.0 * 124'475'904.0 * tokens;
  const double attention = 12.0 * 12 * 768 * 1024 * tokens;
  CHECK(fabric::transformer_flops(gpt2, tokens) == Catch::Approx(weights + attention));
  CHECK(fabric::transformer_flops(gpt2, tokens, false) == Catch::Approx((weights + attention) / 3));
  CHECK(fabric::transformer_flops(gpt2, 0) == 0);
  // The attention term is a small share of GPT-2 small's FLOPs (about 13 %).
  CHECK(attention / (weights + attention) == Catch::Approx(0.132).margin(0.01));
  CHECK_THROWS_WITH(fabric::transformer_flops({.parameters = 1, .layers = 0, .width = 1, .context = 1}, 1),
                    ContainsSubstring("transformer_flops: expected positive parameters"));
  CHECK_THROWS_AS(fabric::transformer_flops(gpt2, -1), fabric::Error);
}
