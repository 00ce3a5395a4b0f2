#pragma once
// fabric::DDP: distributed data parallel over c10d (Gloo on the CPU, NCCL on CUDA), Lightning's "ddp".

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/detail/c10d.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/strategies/parallel.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/nn/module.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// What DDP keeps per set-up module: the Reducer and the flags Python's DistributedDataParallel keeps.
struct DDPModule {
  std::unique_ptr<c10d::Reducer> reducer;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  std::vector<at::Tensor> buffers;
  bool require_backward_grad_sync = true;
  bool require_forward_param_sync = true;
  bool find_unused_parameters = false;
  bool static_graph = false;
  bool static_graph_delay_enqueued = false;
  bool broadcast_buffers = true;
};

}  // namespace detail

/// Trains one replica of the model per process and averages the gradients across processes in
/// buckets that overlap with the backward pass (c10d's Reducer, the engine of PyTorch's DDP).
/// Processes come from `Fabric::launch()`, fabric-run, torchrun, mpirun or SLURM; parameters and
/// buffers are broadcast from rank 0 at setup.
///
///     fabric::Fabric<fabric::CPU, fabric::DDP> fabric{{.devices = 4}};
///     fabric.launch();
///     auto [model, optimizer] = fabric.setup(net, adamw);
class DDP : public ParallelStrategy {
 public:
  static constexpr std::string_view name = "ddp";
  /// Says that the strategy works in the wrapper's forward (the Reducer's bookkeeping, buffer broadcasts).
  static constexpr bool needs_wrapped_forward = true;

  /// How gradient buckets travel: as they are, or compressed to 16 bits (and back) for the all-reduce.
  enum class CommHook { none, fp16, bf16 };

  /// Settings of the strategy (those of PyTorch's DistributedDataParallel and Lightning's DDPStrategy).
  struct Options {
    /// Size of a gradient bucket in MiB.
    double bucket_cap_mb = 25.0;
    /// Find the parameters a forward did not use (a graph traversal per step) instead of failing.
    bool find_unused_parameters = false;
    /// The set of used parameters and the graph never change: lets the Reducer skip work.
    bool static_graph = false;
    /// Gradients become views into the buckets (saves memory and a copy).
    bool gradient_as_bucket_view = false;
    /// Broadcast buffers (e.g. BatchNorm statistics) from rank 0 before each forward.
    bool broadcast_buffers = true;
    /// The c10d backend ("gloo", "nccl"); empty: gloo for the CPU, nccl for CUDA.
    std::string process_group_backend{};
    /// How long collectives and the rendezvous wait for the other processes.
    std::chrono::milliseconds timeout = std::chrono::minutes(30);
    /// Compression of gradient buckets.
    CommHook comm_hook = CommHook::none;
    /// Where the processes come from; default: detected in Lightning's order (fabric::AutoEnvironment).
    AnyEnvironment cluster_environment{};
    /// The checkpoint format of save and load; empty: fabric::AutoCheckpointIO (by the path).
    AnyCheckpointIO checkpoint_io{};
  };
  /// What the strategy keeps per set-up module.
  struct ModuleState {
    std::shared_ptr<detail::DDPModule> ddp{};
  };

  DDP() : DDP(Options{}) {}
  /// Creates the strategy with settings, e.g. `DDP({.static_graph = true})`.
  explicit DDP(Options options)
      : ParallelStrategy({.process_group_backend = options.process_group_backend,
                          .timeout = options.timeout,
                          .cluster_environment = options.cluster_environment,
                          .checkpoint_io = options.checkpoint_io}),
        options_(std::move(options)) {}

  /// Checks the settings, then reads the cluster environment for the topology.
  void setup_environment(const fabric::Options& options) {
    if (options_.bucket_cap_mb <= 0) {
      detail::raise("DDP: expected bucket_cap_mb > 0, found {}; the default is 25", options_.bucket_cap_mb);
    }
    if (options_.timeout.count() <= 0) {
      detail::raise("DDP: expected a positive timeout, found {} ms", options_.timeout.count());
    }
    ParallelStrategy::setup_environment(options);
  }
  /// Returns the settings.
  const Options& options() const noexcept { return options_; }

  /// Verifies the module is the same on every rank, broadcasts rank 0's parameters and buffers, and
  /// creates the Reducer that averages the gradients during backward.
  template <class M>
  ModuleState setup_module(M& module) {
    auto& pg = group("setup");
    auto state = std::make_shared<detail::DDPModule>();
    state->pg = pg;
    state->find_unused_parameters = options_.find_unused_parameters;
    state->static_graph = options_.static_graph;
    state->broadcast_buffers = options_.broadcast_buffers;

    std::vector<at::Tensor> params;
    std::unordered_map<std::size_t, std::string> names;
    std::unordered_set<const void*> seen;
    std::string description;
    for (const auto& item : module.named_parameters(/*recurse=*/true)) {
      const at::Tensor& p = item.value();
      if (!p.requires_grad() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
      names.emplace(params.size(), item.key());
      params.push_back(p);
    }
    for (const auto& item : module.named_parameters(true)) {
      description += fmt::format("parameter \"{}\" of shape {} ({})\n", item.key(), detail::shape_str(item->sizes()),
                                 c10::toString(item->scalar_type()));
    }
    std::vector<at::Tensor> sync;
    for (const auto& p : module.parameters(true)) sync.push_back(p.detach());
    for (const auto& b : module.named_buffers(true)) {
      if (!b->defined()) continue;
      description += fmt::format("buffer \"{}\" of shape {} ({})\n", b.key(), detail::shape_str(b->sizes()),
                                 c10::toString(b->scalar_type()));
      state->buffers.push_back(*b);
      sync.push_back(b->detach());
    }
    verify_same_model("DDP", description);
    if (params.empty()) {
      detail::raise("DDP: expected a module with parameters that require grad, found none; nothing would be trained");
    }
    collective("setup", [&] { c10d::broadcast_coalesced(pg, sync, kBroadcastBucketBytes, 0); });

    const auto cap = static_cast<std::int64_t>(options_.bucket_cap_mb * 1024.0 * 1024.0);
    auto [buckets, limits] = c10d::compute_bucket_assignment_by_size(
        params, {static_cast<std::size_t>(c10d::kDefaultFirstBucketBytes), static_cast<std::size_t>(cap)});
    std::reverse(buckets.begin(), buckets.end());
    std::reverse(limits.begin(), limits.end());
    state->reducer =
        detail::make_reducer(params, std::move(buckets), std::move(limits), pg, cap, options_.find_unused_parameters,
                             options_.gradient_as_bucket_view, std::move(names), c10d::kDefaultFirstBucketBytes);
    switch (options_.comm_hook) {
      case CommHook::none:
        break;
      case CommHook::fp16:
        state->reducer->register_builtin_comm_hook(c10d::BuiltinCommHookType::FP16_COMPRESS);
        break;
      case CommHook::bf16:
        if (backend() == "gloo" && !detail::torch_gloo_bfloat16) {
          detail::raise(
              "DDP: bf16 gradient compression needs a backend that all-reduces bfloat16, found gloo of LibTorch {}.{} "
              "(it has none); use comm_hook = fp16, or NCCL, or LibTorch 2",
              TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
        }
        state->reducer->register_comm_hook(std::make_unique<detail::BF16CompressHook>(pg));
        break;
    }
    if (options_.static_graph) state->reducer->set_static_graph();
    return ModuleState{std::move(state)};
  }

  /// Runs before each wrapped forward: Reducer bookkeeping and the buffer broadcast.
  void pre_forward(ModuleState& state) {
    auto& d = *state.ddp;
    const bool grad = c10::GradMode::is_enabled();
    try {
      if (grad && d.require_backward_grad_sync) d.reducer->prepare_for_forward();
      if (grad) d.reducer->rebuild_buckets();
    } catch (const c10::Error& e) {
      // NOTE: the Reducer explains itself in Python's terms; say where the switch is in fabric.
      detail::raise(
          "DDP (c10d's Reducer on rank {}): {}\n(fabric: find_unused_parameters is "
          "DDP::Options::find_unused_parameters, "
          "e.g. fabric::DDP({{.find_unused_parameters = true}}))",
          global_rank(), e.what_without_backtrace());
    }
    if (d.broadcast_buffers && d.require_forward_param_sync && !d.buffers.empty() && world_size() > 1) {
      collective("forward", [&] { c10d::broadcast_coalesced(d.pg, d.buffers, kBroadcastBucketBytes, 0); });
    }
  }
  /// Runs after each wrapped forward: tells the Reducer a backward will follow (unless sync is off).
  template <class Out>
  void post_forward(ModuleState& state, const Out& output) {
    auto& d = *state.ddp;
    if (!c10::GradMode::is_enabled() || !d.require_backward_grad_sync) {
      d.require_forward_param_sync = false;
      return;
    }
    d.require_forward_param_sync = true;
    if (d.static_graph && !d.static_graph_delay_enqueued) {
      // NOTE: Python's _DDPSink does this in the first iteration of a static graph: once the
      // backward has run, the Reducer all-reduces every bucket at once.
      bool hooked = false;
      detail::for_each_tensor(output, [&](const at::Tensor& t) {
        if (hooked || !t.defined() || !t.requires_grad()) return;
        c10d::Reducer* reducer = d.reducer.get();
        at::Tensor(t).register_hook([reducer](const at::Tensor& grad) {
          torch::autograd::Engine::get_default_engine().queue_callback([reducer] { reducer->delay_all_reduce(); });
          return grad;
        });
        hooked = true;
      });
      d.static_graph_delay_enqueued = hooked;
    }
    if (d.find_unused_parameters && !d.static_graph) {
      std::vector<at::Tensor> outputs;
      detail::for_each_tensor(output, [&](const at::Tensor& t) {
        if (t.defined()) outputs.push_back(t);
      });
      d.reducer->prepare_for_backward(outputs);
    } else {
      d.reducer->prepare_for_backward({});
    }
  }

  /// The guard that no_backward_sync returns: gradients accumulate locally while it lives and are
  /// averaged at the next synced backward.
  class NoSyncGuard {
   public:
    NoSyncGuard(detail::DDPModule& module, bool enabled)
        : module_(&module), previous_(module.require_backward_grad_sync) {
      if (enabled) module.require_backward_grad_sync = false;
    }
    ~NoSyncGuard() {
      if (module_ != nullptr) module_->require_backward_grad_sync = previous_;
    }
    NoSyncGuard(NoSyncGuard&& other) noexcept
        : module_(std::exchange(other.module_, nullptr)), previous_(other.previous_) {}
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;

   private:
    detail::DDPModule* module_;
    bool previous_;
  };
  /// Returns the guard that skips gradient synchronisation (when enabled) for forward and backward
  /// passes made while it lives.
  NoSyncGuard no_backward_sync(ModuleState& state, bool enabled) { return NoSyncGuard(*state.ddp, enabled); }

 private:
  static constexpr std::size_t kBroadcastBucketBytes = 250u * 1024u * 1024u;

  Options options_{};
};

}  // namespace fabric
