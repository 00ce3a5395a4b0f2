#pragma once
// fabric::DP: one process driving several GPUs with LibTorch's data_parallel, Lightning's "dp".

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/core/guard.hpp"
#include "fabric/core/options.hpp"
#include "fabric/strategies/strategy.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/nn/cloneable.h>

// NOTE: data_parallel.h reaches CUDA's own headers; a CPU-only LibTorch cannot run DP anyway.
#if __has_include(<cuda.h>)
#define FABRIC_HAS_DATA_PARALLEL 1
#include <torch/nn/parallel/data_parallel.h>
#else
#define FABRIC_HAS_DATA_PARALLEL 0
#endif

#include <memory>
#include <string_view>
#include <type_traits>
#include <vector>

namespace fabric {

struct CPU;

/// Runs one process that splits each batch across the GPUs of the machine: every forward scatters
/// the input, replicates the module (clone()) on each GPU, runs the replicas in parallel and gathers
/// the outputs on the first GPU; gradients flow back to the one module. There is one process, so
/// collectives are local, `setup_dataloaders` never shards and `no_backward_sync` warns and does
/// nothing, as in Lightning. Prefer DDP: it is faster and also runs on the CPU.
///
///     fabric::Fabric<fabric::CUDA, fabric::DP> fabric{{.devices = 4}};
class DP : public StrategyBase {
 public:
  static constexpr std::string_view name = "dp";
  /// Says that the strategy works in the wrapper's forward (it splits the batch across the GPUs).
  static constexpr bool needs_wrapped_forward = true;

  /// Settings of the strategy (the checkpoint format).
  using Options = StrategyOptions;
  /// What the strategy keeps per set-up module: the GPUs it runs on.
  struct ModuleState {
    std::vector<c10::Device> devices{};
  };

  DP() = default;
  explicit DP(Options options) : StrategyBase(std::move(options)) {}

  /// Rejects the CPU accelerator at compile time (data_parallel replicates onto GPUs).
  template <class A, class P>
  static constexpr void check() noexcept {
    static_assert(!std::is_same_v<A, CPU>,
                  "fabric: DP runs one process on several GPUs; use fabric::CUDA or fabric::Auto with DP, or "
                  "fabric::DDP for several CPU processes");
  }

  /// Validates the topology: one machine, `devices` GPUs.
  void setup_environment(const fabric::Options& options) {
    if (options.num_nodes != 1) {
      detail::raise("DP runs one process on one machine: expected num_nodes = 1, found {}; use fabric::DDP",
                    options.num_nodes);
    }
    devices_ = options.devices;
  }
  /// Checks the device the accelerator chose (a GPU; DP has no CPU mode).
  void setup_device(const c10::Device& device) {
    if (!device.is_cuda()) {
      detail::raise(
          "DP splits batches across GPUs: expected a CUDA device, found {}; use fabric::DDP for several CPU "
          "processes, or SingleDevice",
          device.str());
    }
    device_ = device;
  }

  /// Records the GPUs the module will be replicated on (the chosen one and the next devices - 1).
  template <class M>
  ModuleState setup_module(M& /*module*/) {
    static_assert(std::is_base_of_v<torch::nn::Cloneable<M>, M>,
                  "fabric: DP replicates the module on every GPU with clone(); derive the module from "
                  "torch::nn::Cloneable<M> (and implement reset()), or use fabric::DDP");
    ModuleState state;
    for (int i = 0; i < devices_; ++i) {
      state.devices.emplace_back(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_.index() + i));
    }
    return state;
  }
  /// Runs the forward across the GPUs (LibTorch's data_parallel: one tensor in, one tensor out).
  template <class M>
  at::Tensor forward(ModuleState& state, const std::shared_ptr<M>& module, at::Tensor input) {
#if FABRIC_HAS_DATA_PARALLEL
    return torch::nn::parallel::data_parallel(module, std::move(input), state.devices, state.devices.front());
#else
    (void)state;
    (void)module;
    (void)input;
    detail::raise("DP needs LibTorch's data_parallel, which needs CUDA's headers; build with a CUDA LibTorch");
#endif
  }
  /// Warns once that there is no gradient synchronisation to skip, and returns a guard that does nothing.
  NullGuard no_backward_sync(ModuleState& /*state*/, bool enabled) {
    if (enabled) {
      TORCH_WARN_ONCE(
          "fabric: no_backward_sync does nothing with DP (one process, nothing to synchronise); gradients "
          "accumulate as usual");
    }
    return {};
  }

  /// Reduces the elements of a tensor, as Lightning's DP does (there is one process): mean, sum, min or max.
  at::Tensor all_reduce(const at::Tensor& tensor, ReduceOp op, const ProcessGroup& /*group*/ = {}) const {
    switch (op) {
      case ReduceOp::sum:
        return tensor.sum();
      case ReduceOp::min:
        return tensor.min();
      case ReduceOp::max:
        return tensor.max();
      case ReduceOp::mean:
        break;
    }
    return tensor.is_floating_point() ? tensor.mean() : tensor.to(at::kFloat).mean();
  }

 private:
  int devices_ = 1;
};

}  // namespace fabric
