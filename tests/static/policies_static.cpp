// Compile-time tests of the torch-bound policies and wrappers.
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
