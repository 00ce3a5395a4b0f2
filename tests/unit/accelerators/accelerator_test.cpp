// Accelerators: fabric::Auto (CUDA when a GPU is visible, else the CPU) with every precision,
// fabric::CUDA's options, device choice and errors, and the loader's transfers to a GPU. The [cuda]
// tests SKIP without a GPU; on a GPU machine they also train the Fashion-MNIST CNN on every precision.
// Then Lightning's test_connector.py: what Fabric's constructor chooses and refuses (the accelerator, the
// devices, taken from the launcher when left at their default, the strategy, the cluster environment).
#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include "fashion_mnist/fashion_mnist.hpp"

#include <torch/torch.h>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <ATen/Context.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <stdlib.h>
#include <unistd.h>

#include "unit/temp_dir.hpp"

#include <climits>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>

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

// Lightning: tests_fabric/test_connector.py::test_cuda_accelerator_can_not_run_on_system
// Lightning: tests_fabric/test_connector.py::test_connector_auto_selection
TEST_CASE("Auto resolves to the CPU on a machine without CUDA", "[accelerator]") {
  if (fabric::CUDA::is_available()) SKIP("a CUDA device is visible here");
  fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  CHECK(fabric.device().is_cpu());
  // Lightning's auto selection on a machine without GPUs: the CPU, one device, one process.
  fabric::Fabric<> defaults;
  CHECK(defaults.device().is_cpu());
  CHECK(defaults.options().devices == 1);
  CHECK(defaults.world_size() == 1);
  auto net = torch::nn::Linear(4, 2);
  auto model = fabric.setup(net);
  CHECK(net->weight.device().is_cpu());
  CHECK(model(torch::randn({3, 4})).scalar_type() == torch::kFloat);
}

// Lightning: tests_fabric/test_connector.py::test_accelerator_gpu
// Lightning: tests_fabric/test_connector.py::test_accelerator_auto_with_devices_gpu
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

// Lightning: tests_fabric/test_connector.py::test_gpu_accelerator_no_gpu_backend_found_error
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

// Lightning: tests_fabric/test_connector.py::test_accelerator_gpu_with_devices
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

// ---- the connector: Lightning's tests_fabric/test_connector.py -------------------------------------
//
// Lightning's _Connector turns strings into an accelerator, a strategy, a precision and a cluster environment at
// run time. In fabric the first three are Fabric's template arguments, so a wrong name or a wrong combination does
// not compile (tests/compile_fail/); what is left to run time is checked here: the devices and nodes, the launcher
// detected from this process's variables, and the cluster environment the strategy reads.

namespace {

/// The variables of every launcher fabric detects: a test starts from none of them.
constexpr const char* launcher_variables[] = {"TORCHELASTIC_RUN_ID",
                                              "TORCHELASTIC_USE_AGENT_STORE",
                                              "WORLD_SIZE",
                                              "RANK",
                                              "LOCAL_RANK",
                                              "LOCAL_WORLD_SIZE",
                                              "GROUP_RANK",
                                              "NODE_RANK",
                                              "MASTER_ADDR",
                                              "MASTER_PORT",
                                              "SLURM_NTASKS",
                                              "SLURM_NTASKS_PER_NODE",
                                              "SLURM_TASKS_PER_NODE",
                                              "SLURM_NNODES",
                                              "SLURM_JOB_NAME",
                                              "SLURM_NODEID",
                                              "SLURM_PROCID",
                                              "SLURM_LOCALID",
                                              "SLURM_NODELIST",
                                              "SLURM_JOB_NODELIST",
                                              "SLURM_JOB_ID",
                                              "LSB_JOBID",
                                              "LSB_DJOB_RANKFILE",
                                              "JSM_NAMESPACE_LOCAL_RANK",
                                              "JSM_NAMESPACE_LOCAL_SIZE",
                                              "JSM_NAMESPACE_SIZE",
                                              "JSM_NAMESPACE_RANK",
                                              "OMPI_COMM_WORLD_SIZE",
                                              "OMPI_COMM_WORLD_RANK",
                                              "OMPI_COMM_WORLD_LOCAL_RANK",
                                              "OMPI_COMM_WORLD_LOCAL_SIZE",
                                              "PMI_SIZE",
                                              "PMI_RANK",
                                              "MPI_LOCALRANKID",
                                              "MPI_LOCALNRANKS",
                                              "KUBERNETES_PORT"};

/// Sets the given launcher variables for a scope (every other launcher variable unset) as Lightning's tests
/// patch os.environ, and restores them, and the rank the loggers know, when it ends.
class LauncherEnvironment {
 public:
  explicit LauncherEnvironment(const std::map<std::string, std::string>& values = {}) {
    for (const char* name : launcher_variables) {
      if (const char* v = std::getenv(name)) saved_[name] = v;
      ::unsetenv(name);
    }
    for (const auto& [name, value] : values) ::setenv(name.c_str(), value.c_str(), 1);
  }
  LauncherEnvironment(const LauncherEnvironment&) = delete;
  LauncherEnvironment& operator=(const LauncherEnvironment&) = delete;
  ~LauncherEnvironment() {
    for (const char* name : launcher_variables) ::unsetenv(name);
    for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
    fabric::detail::rank_zero_only_rank().store(-1);
  }

 private:
  std::map<std::string, std::string> saved_;
};

using CpuDdp = fabric::Fabric<fabric::CPU, fabric::DDP>;

/// torchrun's variables for a process of `local_world_size` per node (fabric-run sets the same).
std::map<std::string, std::string> torchrun_variables(int rank, int world_size, int local_world_size) {
  return {{"TORCHELASTIC_RUN_ID", "1"},
          {"WORLD_SIZE", std::to_string(world_size)},
          {"LOCAL_WORLD_SIZE", std::to_string(local_world_size)},
          {"RANK", std::to_string(rank)},
          {"LOCAL_RANK", std::to_string(rank % local_world_size)},
          {"GROUP_RANK", std::to_string(rank / local_world_size)}};
}

std::string this_host() {
  char buffer[HOST_NAME_MAX + 1] = {};
  REQUIRE(::gethostname(buffer, sizeof(buffer) - 1) == 0);
  return buffer;
}

}  // namespace

// Lightning: tests_fabric/test_connector.py::test_connector_defaults_match_fabric_defaults
TEST_CASE("connector: Fabric's defaults are Lightning's", "[accelerator][connector]") {
  // Lightning's accelerator="auto", strategy="auto" (one device: single device), precision="32-true", devices="auto",
  // num_nodes=1, no loggers.
  STATIC_REQUIRE(std::is_same_v<fabric::Fabric<>::accelerator_type, fabric::Auto>);
  STATIC_REQUIRE(std::is_same_v<fabric::Fabric<>::strategy_type, fabric::SingleDevice>);
  STATIC_REQUIRE(std::is_same_v<fabric::Fabric<>::precision_type, fabric::FP32>);
  STATIC_REQUIRE(fabric::Options{}.devices == fabric::Options::auto_devices);
  STATIC_REQUIRE(fabric::Options{}.num_nodes == 1);
  CHECK(fabric::Options{}.loggers.empty());
}

// Lightning: tests_fabric/test_connector.py::test_accelerator_invalid_type_devices
TEST_CASE("connector: devices is a number of processes; a list of GPUs is CUDAOptions::device_ids",
          "[accelerator][connector]") {
  // Lightning refuses ["0"], [0, "1"], ["GPU"], [False] with a TypeError; fabric's devices is an int (a string or a
  // list does not compile) and the GPUs of a machine are listed as ints in CUDAOptions::device_ids.
  STATIC_REQUIRE(std::is_same_v<decltype(fabric::Options::devices), int>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<const char*, decltype(fabric::Options::devices)>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<std::vector<int>, decltype(fabric::Options::devices)>);
  STATIC_REQUIRE(std::is_same_v<decltype(fabric::CUDAOptions::device_ids), std::vector<int>>);
}

// Lightning: tests_fabric/test_connector.py::test_passing_zero_and_empty_list_to_devices_flag
// Lightning: tests_fabric/test_connector.py::test_num_nodes_input_validation
TEST_CASE("connector: zero or negative devices and num_nodes are refused", "[accelerator][connector][errors]") {
  LauncherEnvironment clean;
  for (int devices : {0, -1}) {
    CHECK_THROWS_WITH(fabric::Fabric<fabric::CPU>({.devices = devices}), ContainsSubstring("expected devices >= 1"));
    CHECK_THROWS_WITH(CpuDdp({.devices = devices}), ContainsSubstring("expected devices >= 1 for the CPU"));
    // NOTE: where a GPU is visible, Auto is CUDA, which names the visible range.
    CHECK_THROWS_WITH(
        (fabric::Fabric<fabric::Auto, fabric::DDP>({.devices = devices})),
        ContainsSubstring("expected devices >= 1") ||
            ContainsSubstring(fmt::format("CUDA devices per node (the visible ones), found devices = {}", devices)));
  }
  for (int nodes : {0, -1}) {
    CHECK_THROWS_WITH(fabric::Fabric<fabric::CPU>({.num_nodes = nodes}), ContainsSubstring("expected num_nodes >= 1"));
    CHECK_THROWS_WITH(CpuDdp({.devices = 1, .num_nodes = nodes}), ContainsSubstring("expected num_nodes >= 1"));
  }
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_on_cpu
// Lightning: tests_fabric/test_connector.py::test_accelerator_cpu_with_devices
// Lightning: tests_fabric/test_connector.py::test_set_devices_if_none_cpu
// Lightning: tests_fabric/test_connector.py::test_multi_device_default_strategy
// Lightning: tests_fabric/test_connector.py::test_strategy_choice_cpu_str
TEST_CASE("connector: DDP on the CPU runs devices processes that fabric starts itself", "[accelerator][connector]") {
  LauncherEnvironment clean;
  // One CPU device: the single-device strategy.
  fabric::Fabric<fabric::CPU, fabric::SingleDevice> single({.devices = 1});
  CHECK(single.device() == torch::Device(torch::kCPU));
  CHECK(single.world_size() == 1);
  for (int devices : {2, 3, 5}) {
    CpuDdp fabric({.devices = devices});
    CHECK(fabric.device() == torch::Device(torch::kCPU));
    CHECK(fabric.world_size() == devices);
    CHECK(fabric.options().devices == devices);
    CHECK(fabric.global_rank() == 0);
    // Lightning's subprocess script launcher ("popen"): no launcher started this process, so launch() will.
    CHECK(fabric.strategy().environment().name == "lightning");
    CHECK_FALSE(fabric.strategy().environment().creates_processes_externally);
  }
}

// Lightning: tests_fabric/test_connector.py::test_device_type_when_strategy_instance_cpu_passed
// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp
TEST_CASE("connector: a configured strategy object is the one Fabric uses", "[accelerator][connector]") {
  LauncherEnvironment clean;
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric(
      {.devices = 2}, fabric::CPU{}, fabric::DDP({.bucket_cap_mb = 5, .static_graph = true}), fabric::FP32{});
  CHECK(fabric.strategy().options().bucket_cap_mb == 5);
  CHECK(fabric.strategy().options().static_graph);
  CHECK(fabric.device() == torch::Device(torch::kCPU));
  CHECK(fabric.strategy().environment().name == "lightning");
  // Auto with DDP: the GPUs where there are some, else CPU processes; the same environment.
  fabric::Fabric<fabric::Auto, fabric::DDP> automatic({.devices = 1});
  CHECK(automatic.device().type() == fabric::Auto::chosen_type());
  CHECK(automatic.strategy().environment().name == "lightning");
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_multi_node_gpu
TEST_CASE("connector: several nodes need a distributed strategy and the rendezvous address",
          "[accelerator][connector]") {
  {
    LauncherEnvironment env({{"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}, {"NODE_RANK", "1"}});
    for (int devices : {1, 2}) {
      CpuDdp fabric({.devices = devices, .num_nodes = 2});
      CHECK(fabric.world_size() == 2 * devices);
      CHECK(fabric.node_rank() == 1);
      CHECK(fabric.global_rank() == devices);
      CHECK(fabric.strategy().environment().main_address == "10.0.0.1");
    }
    // Lightning's auto strategy turns into DDP for num_nodes > 1; fabric's SingleDevice refuses.
    CHECK_THROWS_WITH(fabric::Fabric<fabric::CPU>({.num_nodes = 2}), ContainsSubstring("num_nodes = 1"));
  }
  LauncherEnvironment without_address;
  CHECK_THROWS_WITH(CpuDdp({.devices = 1, .num_nodes = 2}), ContainsSubstring("expected MASTER_ADDR to be set"));
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_torchelastic
TEST_CASE("connector: under torchrun DDP reads TorchElastic's variables", "[accelerator][connector]") {
  LauncherEnvironment env(torchrun_variables(1, 2, 2));
  CpuDdp fabric({.devices = 2});
  CHECK(fabric.strategy().environment().name == "torchelastic");
  CHECK(fabric.strategy().environment().creates_processes_externally);
  CHECK(fabric.local_rank() == 1);
  CHECK(fabric.global_rank() == 1);
  CHECK(fabric.world_size() == 2);
}

// Lightning: tests_fabric/test_connector.py::test_torchelastic_priority_over_slurm
TEST_CASE("connector: TorchElastic is chosen over SLURM when both are detected", "[accelerator][connector]") {
  auto vars = torchrun_variables(1, 2, 2);
  vars["SLURM_NTASKS"] = "2";
  LauncherEnvironment env(vars);
  const fabric::EnvLookup lookup = fabric::detail::getenv_lookup;
  CHECK(fabric::TorchElasticEnvironment::detect(lookup));
  CHECK(fabric::SLURMEnvironment::detect(lookup));
  CpuDdp fabric({.devices = 2});
  CHECK(fabric.strategy().environment().name == "torchelastic");
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_slurm
// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_cpu_slurm
// Lightning: tests_fabric/test_connector.py::test_fallback_from_ddp_spawn_to_ddp_on_cluster
TEST_CASE("connector: under srun DDP reads SLURM's variables, unless the job is an interactive shell",
          "[accelerator][connector]") {
  const std::map<std::string, std::string> slurm{
      {"SLURM_NTASKS", "2"}, {"SLURM_NTASKS_PER_NODE", "2"}, {"SLURM_NNODES", "1"},  {"SLURM_JOB_NAME", "some_name"},
      {"SLURM_NODEID", "0"}, {"SLURM_PROCID", "1"},          {"SLURM_LOCALID", "1"}, {"SLURM_JOB_ID", "1234"}};
  {
    LauncherEnvironment env(slurm);
    CpuDdp fabric({.devices = 2});
    CHECK(fabric.strategy().environment().name == "slurm");
    CHECK(fabric.strategy().environment().creates_processes_externally);
    CHECK(fabric.local_rank() == 1);
    CHECK(fabric.global_rank() == 1);
  }
  {
    // SLURM_JOB_NAME=bash: an interactive allocation, where fabric starts the processes itself.
    auto vars = slurm;
    vars["SLURM_JOB_NAME"] = "bash";
    LauncherEnvironment env(vars);
    CpuDdp fabric({.devices = 2});
    CHECK(fabric.strategy().environment().name == "lightning");
    CHECK(fabric.local_rank() == 0);
  }
  {
    // Lightning's own variables say 2 tasks, 1 per node, with devices=2, and Lightning does not check them;
    // fabric refuses what cannot meet at the rendezvous.
    auto vars = slurm;
    vars["SLURM_NTASKS_PER_NODE"] = "1";
    LauncherEnvironment env(vars);
    CHECK_THROWS_WITH(CpuDdp({.devices = 2}), ContainsSubstring("expected devices = 1 processes per node"));
  }
}

// Lightning: tests_fabric/test_connector.py::test_fallback_from_ddp_spawn_to_ddp_on_cluster
TEST_CASE("connector: under jsrun DDP reads LSF's variables and rank file", "[accelerator][connector]") {
  fabric_test::TempDir dir("lsf");
  const auto rankfile = dir.path() / "rankfile";
  const std::string host = this_host();
  std::ofstream(rankfile) << "launch_node\n" << host << "\n" << host << "\n";
  LauncherEnvironment env({{"LSB_JOBID", "1"},
                           {"LSB_DJOB_RANKFILE", rankfile.string()},
                           {"JSM_NAMESPACE_LOCAL_RANK", "1"},
                           {"JSM_NAMESPACE_LOCAL_SIZE", "2"},
                           {"JSM_NAMESPACE_SIZE", "2"},
                           {"JSM_NAMESPACE_RANK", "1"}});
  CpuDdp fabric;
  CHECK(fabric.strategy().environment().name == "lsf");
  CHECK(fabric.options().devices == 2);
  CHECK(fabric.local_rank() == 1);
  CHECK(fabric.strategy().environment().main_address == host);
}

// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_kubeflow
// Lightning: tests_fabric/test_connector.py::test_strategy_choice_ddp_cpu_kubeflow
TEST_CASE("connector: a Kubeflow pod is one process, the environment passed as Lightning's plugin",
          "[accelerator][connector]") {
  LauncherEnvironment env({{"KUBERNETES_PORT", "tcp://127.0.0.1:443"},
                           {"MASTER_ADDR", "1.2.3.4"},
                           {"MASTER_PORT", "500"},
                           {"WORLD_SIZE", "20"},
                           {"RANK", "1"}});
  const auto kubeflow = [] { return fabric::DDP({.cluster_environment = fabric::KubeflowEnvironment{}}); };
  CpuDdp fabric({.devices = 1, .num_nodes = 20}, fabric::CPU{}, kubeflow(), fabric::FP32{});
  CHECK(fabric.strategy().environment().name == "kubeflow");
  CHECK(fabric.local_rank() == 0);
  CHECK(fabric.node_rank() == 1);
  CHECK(fabric.global_rank() == 1);
  // Lightning takes devices=2 with a world of 20 pods as it comes; fabric checks the world against it.
  CHECK_THROWS_WITH(CpuDdp({.devices = 2}, fabric::CPU{}, kubeflow(), fabric::FP32{}),
                    ContainsSubstring("expected the world size started by kubeflow to equal devices * num_nodes"));
}

// Lightning: tests_fabric/test_connector.py::test_devices_from_environment
TEST_CASE("connector: devices left at the default are the launcher's processes per node",
          "[accelerator][connector][launcher]") {
  SECTION("torchrun and fabric-run: LOCAL_WORLD_SIZE") {
    LauncherEnvironment env(torchrun_variables(3, 4, 4));
    CpuDdp fabric;
    CHECK(fabric.options().devices == 4);
    CHECK(fabric.world_size() == 4);
    CHECK(fabric.local_rank() == 3);
  }
  SECTION("torchrun on two nodes, num_nodes given") {
    LauncherEnvironment env(torchrun_variables(5, 6, 3));
    ::setenv("MASTER_ADDR", "10.0.0.1", 1);
    CpuDdp fabric({.num_nodes = 2});
    CHECK(fabric.options().devices == 3);
    CHECK(fabric.node_rank() == 1);
    CHECK(fabric.local_rank() == 2);
  }
  SECTION("srun: SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE") {
    std::map<std::string, std::string> vars{
        {"SLURM_NTASKS", "3"}, {"SLURM_NNODES", "1"},  {"SLURM_JOB_NAME", "job"}, {"SLURM_NODEID", "0"},
        {"SLURM_PROCID", "2"}, {"SLURM_LOCALID", "2"}, {"SLURM_JOB_ID", "77"},    {"SLURM_TASKS_PER_NODE", "3"}};
    {
      LauncherEnvironment env(vars);
      CpuDdp fabric;
      CHECK(fabric.options().devices == 3);
      CHECK(fabric.strategy().environment().name == "slurm");
    }
    vars["SLURM_NTASKS_PER_NODE"] = "3";
    vars["SLURM_TASKS_PER_NODE"] = "3(x1)";
    LauncherEnvironment env(vars);
    CHECK(CpuDdp().options().devices == 3);
  }
  SECTION("mpirun: OpenMPI's and MPICH's local size") {
    {
      LauncherEnvironment env({{"OMPI_COMM_WORLD_SIZE", "2"},
                               {"OMPI_COMM_WORLD_RANK", "1"},
                               {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                               {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
      CpuDdp fabric;
      CHECK(fabric.options().devices == 2);
      CHECK(fabric.strategy().environment().name == "mpi");
      CHECK(fabric.local_rank() == 1);
    }
    LauncherEnvironment env({{"PMI_SIZE", "3"}, {"PMI_RANK", "0"}, {"MPI_LOCALRANKID", "0"}, {"MPI_LOCALNRANKS", "3"}});
    CHECK(CpuDdp().options().devices == 3);
  }
  SECTION("no launcher, or one task per node: 1") {
    {
      LauncherEnvironment env;
      CpuDdp fabric;
      CHECK(fabric.options().devices == 1);
      CHECK(fabric.world_size() == 1);
      CHECK(fabric::Fabric<fabric::CPU>().options().devices == 1);
    }
    {
      // srun --ntasks=2 over two nodes: one task per node (SLURM_TASKS_PER_NODE=1,1), so devices is 1 and
      // num_nodes must say 2.
      LauncherEnvironment env({{"SLURM_NTASKS", "2"},
                               {"SLURM_JOB_NAME", "job"},
                               {"SLURM_NODEID", "0"},
                               {"SLURM_PROCID", "0"},
                               {"SLURM_LOCALID", "0"},
                               {"SLURM_NODELIST", "node[1-2]"},
                               {"SLURM_TASKS_PER_NODE", "1,1"}});
      CHECK_THROWS_WITH(CpuDdp(), ContainsSubstring("expected the world size started by slurm to equal devices * "
                                                    "num_nodes = 1 * 1 = 1, found 2"));
      CHECK(CpuDdp({.num_nodes = 2}).options().devices == 1);
    }
  }
  SECTION("a single-device program under a launcher keeps its one device") {
    LauncherEnvironment env(torchrun_variables(1, 2, 2));
    fabric::Fabric<fabric::CPU> fabric;
    CHECK(fabric.options().devices == 1);
    CHECK(fabric.world_size() == 1);
  }
}

// Lightning: tests_fabric/test_connector.py::test_arguments_from_environment_collision
TEST_CASE("connector: devices given that disagree with the launcher are an error", "[accelerator][connector][errors]") {
  {
    // No launcher: any devices are the program's to choose.
    LauncherEnvironment env;
    CHECK(CpuDdp({.devices = 3}).options().devices == 3);
  }
  {
    LauncherEnvironment env(torchrun_variables(0, 2, 2));
    CHECK(CpuDdp({.devices = 2}).options().devices == 2);
    CHECK_THROWS_WITH(CpuDdp({.devices = 3}),
                      ContainsSubstring("expected devices = 2 processes per node, as torchrun or fabric-run "
                                        "(LOCAL_WORLD_SIZE) started, found devices = 3"));
    CHECK_THROWS_WITH(CpuDdp({.devices = 1}), ContainsSubstring("found devices = 1"));
  }
  LauncherEnvironment env({{"OMPI_COMM_WORLD_SIZE", "4"},
                           {"OMPI_COMM_WORLD_RANK", "0"},
                           {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                           {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
  CHECK_THROWS_WITH(CpuDdp({.devices = 2}), ContainsSubstring("as mpirun (OMPI_COMM_WORLD_LOCAL_SIZE) started"));
}

// Lightning left out: tests_fabric/test_connector.py::test_accelerator_choice_tpu - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/test_connector.py::test_tpu_accelerator_can_not_run_on_system - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/test_connector.py::test_unsupported_tpu_choice - XLA/TPU: fabric has no XLA accelerator or strategy
// Lightning left out: tests_fabric/test_connector.py::test_connector_with_tpu_accelerator_instance - XLA/TPU: fabric has no XLA accelerator
// Lightning left out: tests_fabric/test_connector.py::test_xla_fsdp_automatic_strategy_selection - XLA/TPU: fabric has no XLA FSDP strategy
// Lightning left out: tests_fabric/test_connector.py::test_interactive_incompatible_backend_error - notebooks/interactive: a C++ program is never an IPython kernel
// Lightning left out: tests_fabric/test_connector.py::test_interactive_compatible_dp_strategy_gpu - notebooks/interactive: a C++ program is never an IPython kernel
// Lightning left out: tests_fabric/test_connector.py::test_interactive_compatible_strategy_ddp_fork - notebooks/interactive: a C++ program is never an IPython kernel, and fabric has no fork start method
// Lightning left out: tests_fabric/test_connector.py::test_strategy_choice_ddp_fork_in_interactive - notebooks/interactive and Python's fork start method; fabric starts processes by re-executing the program (see test_multi_device_default_strategy)
// Lightning left out: tests_fabric/test_connector.py::test_strategy_choice_ddp_fork_cpu - Python's multiprocessing fork start method; fabric starts processes by re-executing the program (see test_multi_device_default_strategy)
// Lightning left out: tests_fabric/test_connector.py::test_ddp_fork_on_unsupported_platform - Python's multiprocessing fork start method; fabric has none
// Lightning left out: tests_fabric/test_connector.py::test_strategy_choice_ddp_spawn_cpu - Python's multiprocessing spawn start method; fabric starts processes by re-executing the program (see test_multi_device_default_strategy)
// Lightning left out: tests_fabric/test_connector.py::test_strategy_choice_ddp_spawn - Python's multiprocessing spawn start method; fabric starts processes by re-executing the program (see test_strategy_choice_ddp)
// Lightning left out: tests_fabric/test_connector.py::test_invalid_ddp_strategy_with_mps - MPS: fabric has no MPS accelerator
// Lightning left out: tests_fabric/test_connector.py::test_mps_enabled_with_float16_or_bfloat16_precision - MPS: fabric has no MPS accelerator
// Lightning left out: tests_fabric/test_connector.py::test_devices_auto_choice_mps - MPS: fabric has no MPS accelerator
// Lightning left out: tests_fabric/test_connector.py::test_gpu_accelerator_backend_choice_mps - MPS: fabric has no MPS accelerator
// Lightning left out: tests_fabric/test_connector.py::test_gpu_accelerator_backend_choice - the "gpu" name chooses between MPS and CUDA; fabric has no MPS, so its GPU accelerator is the type fabric::CUDA (see test_accelerator_gpu)
// Lightning left out: tests_fabric/test_connector.py::test_gpu_accelerator_backend_choice_cuda - the "gpu" name chooses between MPS and CUDA; fabric has no MPS, so its GPU accelerator is the type fabric::CUDA (see test_accelerator_gpu) Lightning left tests/compile_fail/wrong_policy_order.cpp (an accelerator is a type, not a name)
// Lightning left out: tests/compile_fail/wrong_strategy_slot.cpp (a strategy is a type, not a name)
// Lightning left out: tests_fabric/test_connector.py::test_strategy_str_passed_being_case_insensitive - strategy names are strings of Python's registry; fabric's strategy is a type (fabric::DDP), see test_strategy_choice_cpu_str
// Lightning left out: see tests/compile_fail/dp_on_cpu.cpp (Lightning warns and falls back to DDP)
// Lightning left out: tests_fabric/test_connector.py::test_strategy_choice_gpu_str - strategy names are strings of Python's registry; fabric's strategies are types, and those for GPUs (DDP, DP) are tested in tests/unit/strategies/dp_test.cpp and the [cuda] tests here
// Lightning left out: tests_fabric/test_connector.py::test_device_type_when_strategy_instance_gpu_passed - needs two GPUs; the strategy object is passed as on the CPU (see test_device_type_when_strategy_instance_cpu_passed), and the device comes from the accelerator type
// Lightning left out: tests_fabric/test_connector.py::test_parallel_devices_in_strategy_conflict_with_accelerator - fabric's strategies hold no device list (parallel_devices) that could disagree with the accelerator: the devices are Options::devices and CUDAOptions::device_ids
// Lightning left out: tests_fabric/test_connector.py::test_plugin_only_one_instance_for_one_type - fabric has no plugins list: each plugin has one typed slot (the precision argument, DDP::Options::cluster_environment, checkpoint_io), so two of a kind cannot be given
// Lightning left out: tests_fabric/test_connector.py::test_accelerator_strategy_from_environment - LT_ACCELERATOR and LT_STRATEGY come from Lightning's CLI; in fabric accelerator and strategy are template arguments fixed at compile time, and fabric-run sets only the launcher's variables (see test_devices_from_environment)
