#pragma once
// fabric::DDP: distributed data parallel over c10d (Gloo on the CPU, NCCL on CUDA), Lightning's "ddp".

#include "fabric/concepts.hpp"
#include "fabric/detail/c10d.hpp"
#include "fabric/device.hpp"
#include "fabric/environment.hpp"
#include "fabric/error.hpp"
#include "fabric/launcher.hpp"
#include "fabric/options.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/nn/module.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
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

/// The bytes that pickle a value for broadcast (tensors travel on the CPU).
template <class T>
std::vector<char> pickle_value(const T& value) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return torch::jit::pickle_save(c10::IValue(value.detach().cpu()));
  } else if constexpr (std::is_same_v<T, bool>) {
    return torch::jit::pickle_save(c10::IValue(value));
  } else if constexpr (std::is_integral_v<T>) {
    return torch::jit::pickle_save(c10::IValue(static_cast<std::int64_t>(value)));
  } else if constexpr (std::is_floating_point_v<T>) {
    return torch::jit::pickle_save(c10::IValue(static_cast<double>(value)));
  } else {
    return torch::jit::pickle_save(c10::IValue(value));
  }
}

template <class T>
T unpickle_value(const std::vector<char>& bytes, const c10::Device& device) {
  c10::IValue v = torch::jit::pickle_load(bytes);
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return v.toTensor().to(device);
  } else if constexpr (std::is_same_v<T, bool>) {
    return v.toBool();
  } else if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(v.toInt());
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(v.toDouble());
  } else {
    return std::move(v).to<T>();
  }
}

}  // namespace detail

/// Trains one replica of the model per process and averages the gradients across processes in
/// buckets that overlap with the backward pass (c10d's Reducer, the engine of PyTorch's DDP).
/// Processes come from `Fabric::launch()`, fabric-run, torchrun, mpirun or SLURM; parameters and
/// buffers are broadcast from rank 0 at setup.
///
///     fabric::Fabric<fabric::CPU, fabric::DDP> fabric{{.devices = 4}};
///     fabric.launch();
///     auto [model, optimizer] = fabric.setup(net, adamw);
class DDP {
 public:
  using category = strategy_tag;
  static constexpr std::string_view name = "ddp";
  static constexpr bool is_distributed = true;

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
  };
  /// What the strategy keeps per set-up module.
  struct ModuleState {
    std::shared_ptr<detail::DDPModule> ddp{};
  };

  DDP() = default;
  explicit DDP(Options options) : options_(std::move(options)) {}
  DDP(DDP&&) noexcept = default;
  DDP& operator=(DDP&&) noexcept = default;
  DDP(const DDP&) = delete;
  DDP& operator=(const DDP&) = delete;
  ~DDP() {
    if (pg_) detail::shutdown_process_group(pg_);
  }

  /// Checks the combination with an accelerator and a precision at compile time (all combine).
  template <Accelerator A, Precision P>
  static constexpr void check() noexcept {}

  /// Reads the cluster environment (launcher variables, or Lightning's defaults) for the topology.
  void setup_environment(const fabric::Options& options) {
    if (options_.bucket_cap_mb <= 0) {
      detail::raise("DDP: expected bucket_cap_mb > 0, found {}; the default is 25", options_.bucket_cap_mb);
    }
    if (options_.timeout.count() <= 0) {
      detail::raise("DDP: expected a positive timeout, found {} ms", options_.timeout.count());
    }
    devices_ = options.devices;
    num_nodes_ = options.num_nodes;
    env_ = detail::detect_environment(devices_, num_nodes_);
  }

  int global_rank() const noexcept { return env_.global_rank; }
  int local_rank() const noexcept { return env_.local_rank; }
  int node_rank() const noexcept { return env_.node_rank; }
  int world_size() const noexcept { return env_.world_size; }
  /// Returns the cluster environment this process runs in.
  const ClusterEnvironment& environment() const noexcept { return env_; }
  /// Returns the settings.
  const Options& options() const noexcept { return options_; }
  /// Returns the process group (null before launch).
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const noexcept { return pg_; }
  /// Says whether launch() has created the process group.
  bool launched() const noexcept { return static_cast<bool>(pg_); }

  /// Starts the other local processes (unless a launcher already did) and joins the process group.
  void launch(const c10::Device& device) {
    if (pg_) detail::raise("launch() was called twice; call it once, before setup()");
    device_ = device;
    if (!env_.creates_processes_externally) {
      launcher_ = std::make_unique<detail::SubprocessLauncher>();
      launcher_->launch(env_, devices_, num_nodes_);
    }
    backend_ =
        options_.process_group_backend.empty() ? (device.is_cuda() ? "nccl" : "gloo") : options_.process_group_backend;
    pg_ = detail::make_process_group(backend_,
                                     {.address = env_.main_address,
                                      .port = env_.main_port,
                                      .rank = env_.global_rank,
                                      .world_size = env_.world_size,
                                      .timeout = options_.timeout,
                                      .launcher_hosts_store = env_.store_hosted_by_launcher},
                                     num_nodes_ == 1);
  }

  /// Waits for all processes.
  void barrier() {
    auto& pg = group("barrier");
    wait(pg->barrier(), "barrier");
  }

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
    verify_same_model(description);
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
        if (backend_ == "gloo" && TORCH_VERSION_MAJOR < 2) {
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

  /// Reduces a tensor across processes in place (mean: sum, then divide; an integer tensor's mean is
  /// returned as a new floating tensor).
  at::Tensor all_reduce(at::Tensor tensor, ReduceOp op) {
    auto& pg = group("all_reduce");
    if (!tensor.is_contiguous()) {
      detail::raise("all_reduce: expected a contiguous tensor, found one with strides {}; call .contiguous() first",
                    detail::shape_str(tensor.strides()));
    }
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == ReduceOp::min   ? c10d::ReduceOp::MIN
                    : op == ReduceOp::max ? c10d::ReduceOp::MAX
                                          : c10d::ReduceOp::SUM;
    opts.timeout = options_.timeout;
    std::vector<at::Tensor> tensors{tensor};
    wait(pg->allreduce(tensors, opts), "all_reduce");
    if (op != ReduceOp::mean) return tensor;
    if (at::isFloatingType(tensor.scalar_type()) || at::isComplexType(tensor.scalar_type())) {
      return tensor.div_(world_size());
    }
    return tensor.div(world_size());
  }
  /// Gathers a tensor from all processes into a new tensor with a leading world-size dimension.
  at::Tensor all_gather(const at::Tensor& tensor) {
    auto& pg = group("all_gather");
    at::Tensor input = tensor.contiguous();
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < world_size(); ++r) outputs[0].push_back(at::empty_like(input));
    std::vector<at::Tensor> inputs{input};
    c10d::AllgatherOptions opts;
    opts.timeout = options_.timeout;
    check_same_shape(input, "all_gather");
    wait(pg->allgather(outputs, inputs, opts), "all_gather");
    return at::stack(outputs[0]);
  }
  /// Returns rank src's value on every process: tensors, numbers, strings and what c10::IValue holds
  /// (vectors, dictionaries, tuples).
  template <class T>
  T broadcast(T value, int src) {
    std::vector<char> bytes;
    if (global_rank() == src) bytes = detail::pickle_value(value);
    broadcast_bytes(bytes, src, "broadcast");
    if (global_rank() == src) return value;
    return detail::unpickle_value<T>(bytes, device_);
  }
  /// Combines a boolean decision across processes: all of them (all = true) or any of them.
  bool reduce_boolean_decision(bool decision, bool all) {
    at::Tensor t = at::scalar_tensor(decision ? 1 : 0, at::TensorOptions().dtype(at::kInt).device(device_));
    t = all_reduce(t, ReduceOp::sum);
    const int votes = t.item<int>();
    return all ? votes == world_size() : votes > 0;
  }
  /// Says whether setup_dataloaders shards data across ranks.
  bool shards_data() const noexcept { return true; }

 private:
  static constexpr std::size_t kBroadcastBucketBytes = 250u * 1024u * 1024u;

  const c10::intrusive_ptr<c10d::ProcessGroup>& group(std::string_view what) const {
    if (!pg_) {
      detail::raise(
          "{}: the DDP processes are not connected yet; call fabric.launch() first (once, before setup, "
          "collectives and save)",
          what);
    }
    return pg_;
  }
  /// Runs a collective, turning c10d's failures into errors that say which rank and what to check.
  template <class Fn>
  void collective(std::string_view what, Fn&& fn) const {
    try {
      std::forward<Fn>(fn)();
    } catch (const fabric::Error&) {
      throw;
    } catch (const std::exception& e) {
      detail::raise(
          "{} failed on rank {} of {} ({}); another process probably failed, was killed or did not reach the same "
          "collective within the timeout of {} s: check the other processes' output",
          what, global_rank(), world_size(), detail::first_line(e.what()),
          std::chrono::duration_cast<std::chrono::seconds>(options_.timeout).count());
    }
  }
  void wait(const c10::intrusive_ptr<c10d::Work>& work, std::string_view what) const {
    collective(what, [&] { work->wait(options_.timeout); });
  }
  void broadcast_bytes(std::vector<char>& bytes, int src, std::string_view what) {
    auto& pg = group(what);
    const auto on_device = at::TensorOptions().device(device_);
    at::Tensor size =
        at::scalar_tensor(static_cast<std::int64_t>(bytes.size()), on_device.dtype(at::kLong)).reshape({1});
    c10d::BroadcastOptions opts;
    opts.rootRank = src;
    opts.timeout = options_.timeout;
    std::vector<at::Tensor> sizes{size};
    wait(pg->broadcast(sizes, opts), what);
    const auto n = size.item<std::int64_t>();
    at::Tensor data = global_rank() == src
                          ? at::from_blob(bytes.data(), {n}, at::TensorOptions().dtype(at::kByte)).to(device_)
                          : at::empty({n}, on_device.dtype(at::kByte));
    std::vector<at::Tensor> datas{data};
    wait(pg->broadcast(datas, opts), what);
    if (global_rank() != src) {
      at::Tensor host = data.cpu();
      bytes.assign(static_cast<const char*>(host.data_ptr()), static_cast<const char*>(host.data_ptr()) + n);
    }
  }
  void check_same_shape(const at::Tensor& t, std::string_view what) {
    std::string text = detail::shape_str(t.sizes()) + " " + std::string(c10::toString(t.scalar_type()));
    std::vector<char> bytes(text.begin(), text.end());
    broadcast_bytes(bytes, 0, what);
    const bool same = std::string(bytes.begin(), bytes.end()) == text;
    if (!reduce_boolean_decision(same, true)) {
      detail::raise("{}: expected the same shape and dtype on every rank, found {} on rank {} and {} on rank 0{}", what,
                    text, global_rank(), std::string(bytes.begin(), bytes.end()),
                    same ? " (this rank matches; another one does not)" : "");
    }
  }
  /// Fails on every rank, naming the first difference, when the module differs from rank 0's.
  void verify_same_model(const std::string& description) {
    std::vector<char> bytes(description.begin(), description.end());
    broadcast_bytes(bytes, 0, "setup");
    const std::string reference(bytes.begin(), bytes.end());
    std::string difference;
    if (reference != description) {
      std::istringstream mine(description), theirs(reference);
      std::string a, b;
      while (true) {
        const bool ha = static_cast<bool>(std::getline(mine, a));
        const bool hb = static_cast<bool>(std::getline(theirs, b));
        if (!ha && !hb) break;
        if (a != b || ha != hb) {
          difference = fmt::format("this rank has {} where rank 0 has {}", ha ? a : "nothing", hb ? b : "nothing");
          break;
        }
      }
    }
    if (!reduce_boolean_decision(difference.empty(), true)) {
      if (!difference.empty()) {
        detail::raise("DDP: rank {} has a different model than rank 0: {}; build the same model on every rank",
                      global_rank(), difference);
      }
      detail::raise(
          "DDP: another rank has a different model than rank {} (its error names the parameter); build the same "
          "model on every rank",
          global_rank());
    }
  }

  Options options_{};
  ClusterEnvironment env_{};
  int devices_ = 1;
  int num_nodes_ = 1;
  c10::Device device_{c10::DeviceType::CPU};
  std::string backend_{};
  // NOTE: declared before pg_ so that the process group closes before the launcher waits for its children.
  std::unique_ptr<detail::SubprocessLauncher> launcher_{};
  c10::intrusive_ptr<c10d::ProcessGroup> pg_{};
};

}  // namespace fabric
