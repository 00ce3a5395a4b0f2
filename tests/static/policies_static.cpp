// Compile-time tests of the torch-bound policies and wrappers: every built-in policy satisfies its
// slot's complete concept, policies written outside the library do too, and incomplete ones do not.
#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include <torch/data/datasets/tensor.h>
#include <torch/data/samplers/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>

#include <ranges>
#include <type_traits>

namespace {

static_assert(fabric::Accelerator<fabric::CPU>);
static_assert(fabric::Strategy<fabric::SingleDevice>);
static_assert(fabric::Precision<fabric::FP32>);
static_assert(!fabric::Accelerator<fabric::SingleDevice> && !fabric::Accelerator<fabric::FP32>);
static_assert(!fabric::Strategy<fabric::CPU> && !fabric::Precision<fabric::CPU>);
static_assert(fabric::Accelerator<fabric::CUDA> && fabric::Accelerator<fabric::Auto>);
static_assert(fabric::Strategy<fabric::DP> && fabric::Strategy<fabric::DDP>);
// The bases hold defaults; without a name they are no policy of their own.
static_assert(!fabric::Strategy<fabric::StrategyBase> && !fabric::Strategy<fabric::ParallelStrategy>);
static_assert(!fabric::Precision<fabric::PrecisionBase>);
static_assert(fabric::Precision<fabric::FP64> && fabric::Precision<fabric::BF16Mixed> &&
              fabric::Precision<fabric::FP16Mixed> && fabric::Precision<fabric::BF16True> &&
              fabric::Precision<fabric::FP16True>);
static_assert(fabric::CheckpointIO<fabric::NativeCheckpointIO> && !fabric::CheckpointIO<fabric::CPU>);
static_assert(fabric::ClusterEnvironment<fabric::AutoEnvironment> && !fabric::ClusterEnvironment<fabric::DDP>);

// Policies written outside the library: complete ones satisfy the concepts, and the slots stay apart.
struct FakeAccelerator {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "fake";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
  void check(int /*devices*/) const {}
  c10::Device select_device(int /*local_rank*/, int /*devices*/) const { return c10::Device(c10::DeviceType::CPU); }
  void teardown() {}
};
struct FakeStrategy : fabric::SingleDevice {
  static constexpr std::string_view name = "fake";
};
struct FakePrecision : fabric::PrecisionBase {
  static constexpr std::string_view name = "fake";
};
struct NotAPolicy {};
static_assert(fabric::Accelerator<FakeAccelerator>);
static_assert(!fabric::Accelerator<FakeStrategy>);
static_assert(!fabric::Accelerator<NotAPolicy>);
static_assert(fabric::Strategy<FakeStrategy>);
static_assert(!fabric::Strategy<FakeAccelerator>);
static_assert(fabric::Precision<FakePrecision>);
static_assert(!fabric::Precision<FakeStrategy>);
static_assert(
    std::is_same_v<fabric::Fabric<FakeAccelerator, FakeStrategy, FakePrecision>::strategy_type, FakeStrategy>);

// What the core's old concepts asked for is not a policy any more: the core calls much more.
struct RanksOnlyStrategy {
  using category = fabric::strategy_tag;
  static constexpr std::string_view name = "ranks_only";
  static constexpr bool is_distributed = false;
  struct ModuleState {};
  int global_rank() const { return 0; }
  int local_rank() const { return 0; }
  int node_rank() const { return 0; }
  int world_size() const { return 1; }
  void barrier() {}
};
struct StaticOnlyAccelerator {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "static_only";
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
};
struct ContextOnlyPrecision {
  using category = fabric::precision_tag;
  static constexpr std::string_view name = "context_only";
  int forward_context() { return 0; }
};
static_assert(fabric::PolicyOf<RanksOnlyStrategy, fabric::strategy_tag> && !fabric::Strategy<RanksOnlyStrategy>);
static_assert(!fabric::Accelerator<StaticOnlyAccelerator> && !fabric::Precision<ContextOnlyPrecision>);

// Defaults follow Lightning: "auto" accelerator (CUDA when present), single device, fp32.
using Default = fabric::Fabric<>;
static_assert(std::is_same_v<Default, fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::FP32>>);
static_assert(std::is_same_v<Default::accelerator_type, fabric::Auto>);
static_assert(fabric::Strategy<fabric::DDP> && fabric::DDP::is_distributed && fabric::DDP::name == "ddp");
static_assert(fabric::FP32::name == "32-true" && fabric::SingleDevice::name == "single_device");
static_assert(!std::is_copy_constructible_v<Default> && !std::is_move_constructible_v<Default>);

// Wrappers hold two pointers' worth and nothing else: no vtable, no per-call allocation.
using ModuleW = fabric::Module<torch::nn::LinearImpl, Default>;
using OptimizerW = fabric::Optimizer<torch::optim::AdamW, Default>;
static_assert(sizeof(ModuleW) == sizeof(std::shared_ptr<torch::nn::LinearImpl>) + sizeof(void*));
static_assert(sizeof(OptimizerW) == sizeof(std::shared_ptr<torch::optim::AdamW>) + sizeof(void*));
static_assert(!std::is_polymorphic_v<ModuleW> && !std::is_polymorphic_v<OptimizerW>);
static_assert(fabric::is_wrapped_v<ModuleW> && fabric::is_wrapped_v<OptimizerW&>);
static_assert(!fabric::is_wrapped_v<torch::nn::Linear>);

// Module-like arguments.
static_assert(fabric::ModuleLike<torch::nn::Linear>);
static_assert(fabric::ModuleLike<std::shared_ptr<torch::nn::LinearImpl>>);
static_assert(fabric::ModuleLike<torch::nn::LinearImpl&>);
static_assert(!fabric::ModuleLike<int> && !fabric::ModuleLike<torch::optim::AdamW>);

// The set-up loader is a C++20 input range.
using Loader =
    torch::data::StatelessDataLoader<torch::data::datasets::TensorDataset, torch::data::samplers::SequentialSampler>;
using Wrapped = fabric::DataLoader<Loader>;
static_assert(std::ranges::input_range<Wrapped>);
static_assert(std::input_iterator<std::ranges::iterator_t<Wrapped>>);

}  // namespace

int main() { return 0; }
