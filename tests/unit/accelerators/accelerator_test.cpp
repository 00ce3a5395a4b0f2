// Accelerators: fabric::Auto (CUDA when a GPU is visible, else the CPU) with every precision,
// fabric::CUDA's options, device choice and errors, and the loader's transfers to a GPU. The [cuda]
// tests SKIP without a GPU; on a GPU machine they also train the Fashion-MNIST CNN on every precision.
#include <fabric/fabric.hpp>

#include "fashion_mnist/fashion_mnist.hpp"

#include <torch/torch.h>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <ATen/Context.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

using AllPrecisions =
    std::tuple<fabric::FP32, fabric::FP64, fabric::BF16Mixed, fabric::FP16Mixed, fabric::BF16True, fabric::FP16True>;

template <class A, class P>
using FabricOf = fabric::Fabric<A, fabric::SingleDevice, P>;

/// True where float16 matmuls run on the CPU (LibTorch 2.1 and later).
constexpr bool cpu_has_half = TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1);

/// Trains a small mlp on a separable problem for `steps` steps and returns (first loss, last loss).
template <class F>
std::pair<float, float> train_mlp(F& fabric, int steps) {
  torch::nn::Sequential net(torch::nn::Linear(32, 64), torch::nn::ReLU(), torch::nn::Linear(64, 4));
  // NOTE: eps 1e-4: AdamW's default 1e-8 is zero in float16.
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).eps(1e-4));
  auto [model, optimizer] = fabric.setup(net, adamw);
  CHECK(net->parameters()[0].device() == fabric.device());
  CHECK(net->parameters()[0].scalar_type() == F::precision_type::param_dtype());
  const auto x = fabric.to_device(torch::randn({128, 32}));
  const auto y = x.narrow(1, 0, 4).argmax(1);
  float first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
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
  return {first, last};
}

/// Restores LibTorch's global matmul and cuDNN settings when it goes out of scope.
struct GlobalSettingsGuard {
  at::Float32MatmulPrecision matmul = at::globalContext().float32MatmulPrecision();
  bool benchmark = at::globalContext().benchmarkCuDNN();
  GlobalSettingsGuard() = default;
  GlobalSettingsGuard(const GlobalSettingsGuard&) = delete;
  GlobalSettingsGuard& operator=(const GlobalSettingsGuard&) = delete;
  ~GlobalSettingsGuard() {
    // NOTE: the string overload is the one both LibTorch 1.13 and 2.x have.
    at::globalContext().setFloat32MatmulPrecision(matmul == at::Float32MatmulPrecision::HIGHEST ? "highest"
                                                  : matmul == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                                                : "medium");
    at::globalContext().setBenchmarkCuDNN(benchmark);
  }
};

/// Builds a Fabric from a configured accelerator object and returns its device, or nothing where
/// Fabric has no constructor that takes one.
template <class A, class F = fabric::Fabric<A>>
std::optional<c10::Device> device_of_fabric_with(A accelerator) {
  if constexpr (std::is_constructible_v<F, fabric::Options, A, fabric::SingleDevice, fabric::FP32>) {
    F fabric({}, std::move(accelerator), fabric::SingleDevice{}, fabric::FP32{});
    return fabric.device();
  } else {
    return std::nullopt;
  }
}

/// Iterates Fabric::dataloader with pin_memory on a GPU and checks every batch; false where the
/// loader options have no pin_memory.
template <class O = fabric::LoaderOptions>
bool check_pinned_dataloader() {
  if constexpr (requires(O o) { o.pin_memory = true; }) {
    fabric::Fabric<fabric::CUDA> fabric;
    O options{};
    options.batch_size = 16;
    options.pin_memory = true;
    const auto values = torch::randn({64, 8});
    auto dataset =
        torch::data::datasets::TensorDataset(values).map(torch::data::transforms::Stack<torch::data::TensorExample>());
    std::vector<torch::Tensor> seen;
    for (auto& batch : fabric.dataloader(std::move(dataset), options)) {
      CHECK(batch.data.is_cuda());
      seen.push_back(batch.data.cpu());
    }
    CHECK(torch::equal(torch::cat(seen), values));  // no shuffle: the order is kept
    return true;
  } else {
    return false;
  }
}

}  // namespace

TEST_CASE("Fabric takes a configured accelerator object", "[accelerator]") {
  const auto device = device_of_fabric_with(fabric::Auto{{.cudnn_benchmark = std::nullopt}});
  if (!device) SKIP("this Fabric has no constructor that takes an accelerator object yet");
  CHECK(device->type() == fabric::Auto::chosen_type());
  CHECK_THROWS_WITH(device_of_fabric_with(fabric::Auto{{.float32_matmul_precision = "fast"}}),
                    ContainsSubstring("expected float32_matmul_precision"));
  if (!fabric::CUDA::is_available()) {
    CHECK_THROWS_WITH(device_of_fabric_with(fabric::CUDA{}), ContainsSubstring("found a CPU-only LibTorch"));
  }
}

TEST_CASE("Fabric with a configured CUDA object uses its device list and settings", "[accelerator][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  GlobalSettingsGuard restore;
  const int last = fabric::CUDA::device_count() - 1;
  const auto device = device_of_fabric_with(fabric::CUDA{{.device_ids = {last}, .float32_matmul_precision = "high"}});
  if (!device) SKIP("this Fabric has no constructor that takes an accelerator object yet");
  CHECK(*device == torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(last)));
  CHECK(at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGH);
  c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).setDevice(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("Fabric::dataloader with pin_memory delivers correct batches to the GPU", "[accelerator][cuda][data]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  if (!check_pinned_dataloader()) SKIP("this Fabric's LoaderOptions have no pin_memory yet");
}

TEST_CASE("Auto is an accelerator that may run on CUDA and the CPU", "[accelerator]") {
  STATIC_REQUIRE(fabric::Accelerator<fabric::Auto>);
  STATIC_REQUIRE(fabric::Accelerator<fabric::CUDA>);
  STATIC_REQUIRE(fabric::detail::may_run_on<fabric::Auto>(c10::DeviceType::CPU));
  STATIC_REQUIRE(fabric::detail::may_run_on<fabric::Auto>(c10::DeviceType::CUDA));
  STATIC_REQUIRE_FALSE(fabric::detail::may_run_on<fabric::CPU>(c10::DeviceType::CUDA));
  STATIC_REQUIRE(fabric::Auto::name == "auto");
  CHECK(fabric::Auto::is_available());
}

TEST_CASE("Auto resolves to CUDA when a GPU is visible and to the CPU otherwise", "[accelerator]") {
  fabric::Fabric<fabric::Auto> fabric;
  const auto expected = fabric::CUDA::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  CHECK(fabric.device() == expected);
  CHECK(fabric::Auto::chosen_type() == expected.type());
  CHECK(fabric::Auto{}.select_device(0, 1) == expected);
  if (!fabric::CUDA::is_available()) {
    CHECK(fabric::Auto::device_count() == 1);
    CHECK(fabric::Auto::device(0) == torch::Device(torch::kCPU));
  }
}

TEST_CASE("Auto resolves to the CPU on a machine without CUDA", "[accelerator]") {
  if (fabric::CUDA::is_available()) SKIP("a CUDA device is visible here");
  fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  CHECK(fabric.device().is_cpu());
  auto net = torch::nn::Linear(4, 2);
  auto model = fabric.setup(net);
  CHECK(net->weight.device().is_cpu());
  CHECK(model(torch::randn({3, 4})).scalar_type() == torch::kFloat);
}

TEST_CASE("Auto resolves to CUDA on a GPU machine", "[accelerator][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::FP16Mixed> fabric;
  CHECK(fabric.device() == torch::Device(torch::kCUDA, 0));
  CHECK(fabric.precision().compute_dtype() == torch::kHalf);
  CHECK(fabric.precision().scaler() != nullptr);
}

TEMPLATE_LIST_TEST_CASE("Fabric<Auto> trains the mlp on every precision its device supports", "[accelerator]",
                        AllPrecisions) {
  const bool cuda = fabric::CUDA::is_available();
  if (!cuda && TestType::name == std::string_view("16-true") && !cpu_has_half) {
    // The chosen device cannot run it: construction fails with a message that says why.
    CHECK_THROWS_WITH((FabricOf<fabric::Auto, TestType>()), ContainsSubstring("16-true cannot run on the CPU"));
    return;
  }
  FabricOf<fabric::Auto, TestType> fabric;
  fabric.seed_everything(0);
  CHECK(fabric.device().is_cuda() == cuda);
  const auto [first, last] = train_mlp(fabric, cuda ? 60 : 40);
  CHECK(last < 0.7f * first);
}

TEST_CASE("CUDA fails at construction with a clear error where there is none", "[accelerator][errors]") {
  if (fabric::CUDA::is_available()) SKIP("a CUDA device is visible here");
  CHECK_THROWS_WITH(fabric::Fabric<fabric::CUDA>(), ContainsSubstring("the accelerator \"cuda\" is not available"));
  if (!at::detail::getCUDAHooks().hasCUDART()) {
    // A CPU-only LibTorch (this machine's Debian LibTorch): the error names it and the alternatives.
    CHECK_THROWS_WITH(fabric::CUDA::check_available(), ContainsSubstring("found a CPU-only LibTorch"));
    CHECK_THROWS_WITH(fabric::CUDA{}.select_device(0, 1), ContainsSubstring("use fabric::CPU or fabric::Auto"));
  } else {
    CHECK_THROWS_WITH(fabric::CUDA::check_available(), ContainsSubstring("no CUDA device is visible"));
  }
  CHECK_THROWS_WITH(fabric::CUDA{}.check(1), ContainsSubstring("the accelerator \"cuda\" is not available"));
  CHECK_NOTHROW(fabric::Auto{}.check(1));
  CHECK_THROWS_WITH(fabric::Auto{}.check(0), ContainsSubstring("expected devices >= 1"));
  CHECK_NOTHROW(fabric::CUDA::teardown());
}

TEST_CASE("CUDA options are checked before any device is touched", "[accelerator][errors]") {
  CHECK_THROWS_WITH((fabric::CUDA{{.float32_matmul_precision = "fast"}}.select_device(0, 1)),
                    ContainsSubstring("expected float32_matmul_precision \"highest\", \"high\" or \"medium\", "
                                      "found \"fast\""));
  CHECK_THROWS_WITH((fabric::CUDA{{.device_ids = {1, 1}}}.select_device(0, 2)),
                    ContainsSubstring("expected distinct device_ids, found 1 twice"));
  CHECK_THROWS_WITH(fabric::Auto{{.device_ids = {-1}}}.select_device(0, 1),
                    ContainsSubstring("expected device_ids >= 0, found -1"));
}

TEST_CASE("the loader moves batches to the CPU device unchanged", "[accelerator][data]") {
  fabric::Fabric<fabric::Auto> fabric;
  // NOTE: a vector serves as the loader; on the CPU the wrapper moves its batches out.
  const torch::data::Example<> expected{torch::arange(6.0).reshape({3, 2}), torch::arange(3)};
  std::vector<torch::data::Example<>> batches{{expected.data.clone(), expected.target.clone()}};
  int seen = 0;
  for (auto& batch : fabric.setup_dataloaders(batches)) {
    CHECK(batch.data.device() == fabric.device());
    CHECK(torch::equal(batch.data.cpu(), expected.data));
    CHECK(torch::equal(batch.target.cpu(), expected.target));
    ++seen;
  }
  CHECK(seen == 1);
}

TEST_CASE("CUDA places each local rank on its device and makes it current", "[accelerator][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  c10::impl::VirtualGuardImpl guard_impl(c10::DeviceType::CUDA);
  const int count = fabric::CUDA::device_count();
  for (int rank = 0; rank < count; ++rank) {
    CHECK(fabric::CUDA{}.select_device(rank, count) == torch::Device(torch::kCUDA, rank));
    CHECK(guard_impl.getDevice().index() == rank);
  }
  // A device list: local rank r uses device_ids[r] (Lightning's devices=[...]).
  const auto last = static_cast<c10::DeviceIndex>(count - 1);
  CHECK(fabric::CUDA{{.device_ids = {count - 1}}}.select_device(0, 1) == torch::Device(torch::kCUDA, last));
  CHECK(guard_impl.getDevice().index() == last);
  CHECK_THROWS_WITH(fabric::CUDA{{.device_ids = {count}}}.select_device(0, 1),
                    ContainsSubstring("expected device_ids below"));
  CHECK_THROWS_WITH(fabric::CUDA{{.device_ids = {0}}}.select_device(0, 2),
                    ContainsSubstring("expected devices = 1 (the length of device_ids)"));
  CHECK_THROWS_WITH(fabric::CUDA{}.select_device(0, count + 1), ContainsSubstring("CUDA devices per node"));
  guard_impl.setDevice(torch::Device(torch::kCUDA, 0));
  fabric::Fabric<fabric::CUDA> fabric;
  CHECK(fabric.device() == torch::Device(torch::kCUDA, 0));
}

TEST_CASE("CUDA applies the matmul precision and cuDNN benchmark options", "[accelerator][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  GlobalSettingsGuard restore;
  at::globalContext().setFloat32MatmulPrecision("highest");
  at::globalContext().setBenchmarkCuDNN(false);
  fabric::CUDA{}.select_device(0, 1);  // unset options keep LibTorch's settings
  CHECK(at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST);
  CHECK_FALSE(at::globalContext().benchmarkCuDNN());
  fabric::CUDA{{.float32_matmul_precision = "high", .cudnn_benchmark = true}}.select_device(0, 1);
  CHECK(at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGH);
  CHECK(at::globalContext().benchmarkCuDNN());
  fabric::Auto{{.float32_matmul_precision = "medium"}}.select_device(0, 1);
  CHECK(at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM);
  CHECK_NOTHROW(fabric::CUDA::teardown());
}

TEST_CASE("the loader copies pinned batches to the GPU asynchronously and correctly", "[accelerator][cuda][data]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  fabric::Fabric<fabric::CUDA> fabric;
  std::vector<torch::data::Example<>> batches;
  for (int i = 0; i < 8; ++i) {
    batches.push_back({torch::randn({256, 64}).pin_memory(), torch::randint(10, {256}).pin_memory()});
  }
  batches.push_back({torch::randn({4, 64}), torch::randint(10, {4})});  // pageable: a plain copy
  CHECK(batches[0].data.is_pinned());
  CHECK_FALSE(batches.back().data.is_pinned());
  CHECK(fabric::detail::pin_memory(batches.back()).data.is_pinned());
  auto stacked = torch::data::datasets::TensorDataset(torch::randn({8, 4}))
                     .map(torch::data::transforms::Stack<torch::data::TensorExample>());
  CHECK(fabric::PinMemoryDataset(stacked).get_batch({0, 1, 2}).data.is_pinned());
  CHECK_FALSE(fabric::PinMemoryDataset(stacked, false).get_batch({0, 1, 2}).data.is_pinned());
  std::size_t i = 0;
  for (auto& batch : fabric.setup_dataloaders(batches)) {
    REQUIRE(batch.data.is_cuda());
    const auto sum = (batch.data * 2).sum(1);  // runs on the stream the copy was queued on
    // NOTE: reduction order differs between devices; sums near zero need an absolute tolerance.
    CHECK(torch::allclose(sum.cpu(), (batches[i].data * 2).sum(1), /*rtol=*/1e-5, /*atol=*/1e-4));
    CHECK(torch::equal(batch.target.cpu(), batches[i].target));
    ++i;
  }
  CHECK(i == batches.size());
}

TEMPLATE_LIST_TEST_CASE("every precision on CUDA trains the Fashion-MNIST CNN on synthetic data",
                        "[accelerator][cuda][example]", AllPrecisions) {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  FabricOf<fabric::CUDA, TestType> fabric;
  fabric.seed_everything(0);
  fashion_mnist::Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(2e-3).eps(1e-4));
  auto [model, optimizer] = fabric.setup(net, adamw);
  // Ten noisy class templates: a learnable stand-in for the real images.
  const auto templates = torch::randn({10, 1, 28, 28}, torch::kCUDA);
  float first = 0;
  std::vector<float> losses;
  for (int step = 0; step < 300; ++step) {
    const auto y = torch::randint(10, {64}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
    const auto x = templates.index_select(0, y) + 0.8 * torch::randn({64, 1, 28, 28}, torch::kCUDA);
    auto out = model(x);
    torch::Tensor loss;
    {
      auto guard = fabric.autocast();
      loss = torch::nn::functional::cross_entropy(out, y);
    }
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    if (step == 0) first = loss.template item<float>();
    if (step >= 290) losses.push_back(loss.template item<float>());
  }
  float last = 0;
  for (float l : losses) last += l / static_cast<float>(losses.size());
  INFO(TestType::name << ": first loss " << first << ", mean of the last 10 " << last);
  CHECK(std::isfinite(last));
  CHECK(last < 0.5f * first);
}
