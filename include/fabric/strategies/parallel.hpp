#pragma once
// fabric::ParallelStrategy: what every multi-process strategy shares (Lightning's ParallelStrategy): the
// cluster environment and the ranks, launching the local processes, the process group, collectives
// that fail with an error naming the rank, rank agreement around checkpoints, and teardown that
// cannot hang on a dead peer. fabric::DDP derives from it, and so will FSDP.

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/core/rank_zero.hpp"
#include "fabric/detail/c10d.hpp"
#include "fabric/io/state.hpp"
#include "fabric/strategies/environments/detect.hpp"
#include "fabric/strategies/group.hpp"
#include "fabric/strategies/launchers/subprocess.hpp"
#include "fabric/strategies/strategy.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <sched.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// What a parallel strategy keeps for a group made by new_group: the backend's group of its members, shut
/// down when the last handle goes (LibTorch 2's NCCL warns at exit about a group that was not).
struct ProcessGroupImpl {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  ProcessGroupImpl() = default;
  ProcessGroupImpl(const ProcessGroupImpl&) = delete;
  ProcessGroupImpl& operator=(const ProcessGroupImpl&) = delete;
  ~ProcessGroupImpl() {
    if (pg) shutdown_process_group(pg);
  }
};

/// The backward of a gather with sync_grads (Lightning's `_AllGather`): the gradient of the gathered
/// tensor (group size, ...) is summed over the group's processes, and each keeps the slice of its own
/// input; so the gradient of a loss computed from the gather on every process is that of their sum.
struct AllGatherBackward final : torch::autograd::Node {
  AllGatherBackward(c10::intrusive_ptr<c10d::ProcessGroup> group, int group_rank, std::chrono::milliseconds wait_for,
                    std::vector<std::int64_t> gathered_sizes, at::TensorOptions gathered_options)
      : pg(std::move(group)),
        rank(group_rank),
        timeout(wait_for),
        sizes(std::move(gathered_sizes)),
        options(gathered_options) {}

  std::string name() const override { return "fabric::AllGatherBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    // NOTE: every member must take part in the sum, also one whose loss did not use the gather.
    at::Tensor grad = grads[0].defined() ? grads[0].contiguous().clone() : at::zeros(sizes, options);
    std::vector<at::Tensor> tensors{grad};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = timeout;
    pg->allreduce(tensors, opts)->wait(timeout);
    return {grad.select(0, rank)};
  }

  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  int rank;
  std::chrono::milliseconds timeout;
  std::vector<std::int64_t> sizes;
  at::TensorOptions options;
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

/// The value that broadcast's bytes pickle (tensors come to the device).
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

/// Returns the CPUs this process may run on (its affinity mask, as Lightning's `_num_cpus_available`), or
/// the hardware's count where the mask cannot be read.
inline int available_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

/// Gives each of the local processes its share of the cores, as Lightning's `_set_num_threads_if_needed`:
/// with more than one process on this node and OMP_NUM_THREADS unset, sets torch's intra-op threads to
/// max(1, cores / local processes) and exports OMP_NUM_THREADS (so the processes started next inherit
/// it). A user's OMP_NUM_THREADS is kept as it is.
inline void set_num_threads_if_needed(int local_processes) {
  if (local_processes <= 1 || std::getenv("OMP_NUM_THREADS") != nullptr) return;
  const int threads = std::max(1, available_cpus() / local_processes);
  at::set_num_threads(threads);
  ::setenv("OMP_NUM_THREADS", std::to_string(threads).c_str(), 1);
}

}  // namespace detail

/// Settings every multi-process strategy takes (Lightning's ParallelStrategy arguments).
struct ParallelOptions {
  /// The c10d backend ("gloo", "nccl"); empty: gloo for the CPU, nccl for CUDA.
  std::string process_group_backend{};
  /// How long the rendezvous and every collective wait for the other processes.
  std::chrono::milliseconds timeout = std::chrono::minutes(30);
  /// Where the processes come from; default: detected in Lightning's order (fabric::AutoEnvironment).
  AnyEnvironment cluster_environment{};
  /// The checkpoint format of save and load; empty: fabric::AutoCheckpointIO (by the path).
  AnyCheckpointIO checkpoint_io{};
};

/// The base of the strategies that run one process per device over c10d: it reads the cluster
/// environment, starts the local processes in `launch()` (unless a launcher did), creates the process
/// group, and implements barrier, all_reduce, all_gather, broadcast and reduce_boolean_decision.
/// Every collective, and the gradient synchronisation inside backward, fails with `fabric: <what>
/// failed on rank R of W (...)` when a peer dies or hangs past the timeout; after such a failure the
/// teardown stops the processes this one started instead of waiting for them. save writes on rank 0
/// and load reads on every rank, and a failure on one rank fails them all.
///
/// A strategy derives from it and adds what happens to modules (DDP: the Reducer).
class ParallelStrategy : public StrategyBase {
 public:
  static constexpr bool is_distributed = true;
  /// Says that `loss.backward()` must be `fabric.backward(loss)`: the backward reports a failed gradient
  /// synchronisation with the rank (fabric::NeedsFabricBackward).
  static constexpr bool needs_fabric_backward = true;

  /// Creates the strategy with its settings (nothing connects before launch()).
  explicit ParallelStrategy(ParallelOptions options = {})
      : StrategyBase(StrategyOptions{std::move(options.checkpoint_io)}), options_(std::move(options)) {}
  ParallelStrategy(ParallelStrategy&&) noexcept = default;
  ParallelStrategy& operator=(ParallelStrategy&&) noexcept = default;
  ParallelStrategy(const ParallelStrategy&) = delete;
  ParallelStrategy& operator=(const ParallelStrategy&) = delete;
  ~ParallelStrategy() { teardown(); }

  /// Reads the cluster environment for the topology and checks it against devices and num_nodes.
  void setup_environment(const fabric::Options& options) {
    if (options_.timeout.count() <= 0) {
      detail::raise("expected a positive timeout, found {} ms; the default is 30 minutes", options_.timeout.count());
    }
    devices_ = options.devices;
    num_nodes_ = options.num_nodes;
    topology_ = options_.cluster_environment.topology(detail::getenv_lookup, devices_, num_nodes_);
    // NOTE: as Lightning's DDPStrategy._set_world_ranks: the loggers write on this rank's say.
    set_rank_zero_only_rank(topology_.global_rank);
  }

  int global_rank() const noexcept { return topology_.global_rank; }
  int local_rank() const noexcept { return topology_.local_rank; }
  int node_rank() const noexcept { return topology_.node_rank; }
  int world_size() const noexcept { return topology_.world_size; }
  /// Returns where this process sits in the job, as the cluster environment reported it.
  const Topology& environment() const noexcept { return topology_; }
  /// Returns the settings of the parallel base.
  const ParallelOptions& parallel_options() const noexcept { return options_; }
  /// Returns the process group (null before launch).
  const c10::intrusive_ptr<c10d::ProcessGroup>& process_group() const noexcept { return pg_; }
  /// Returns the c10d backend launch() chose ("gloo" on the CPU, "nccl" on CUDA, unless one was named;
  /// empty before launch()).
  const std::string& process_group_backend() const noexcept { return backend_; }
  /// Says whether launch() has created the process group.
  bool launched() const noexcept { return static_cast<bool>(pg_); }
  /// Says whether a collective failed on this rank (teardown then stops the processes it started).
  bool failed() const noexcept { return failed_; }

  /// Starts the other local processes (unless a launcher already did) and joins the process group; with
  /// several processes per node and OMP_NUM_THREADS unset, first gives each its share of the cores.
  void launch(const c10::Device& device) {
    if (pg_) detail::raise("launch() was called twice; call it once, before setup()");
    device_ = device;
    // NOTE: before the local processes start, so that they inherit OMP_NUM_THREADS; processes started by
    // fabric-run, torchrun, mpirun or SLURM each set it here themselves.
    detail::set_num_threads_if_needed(devices_);
    if (!topology_.creates_processes_externally) {
      launcher_ = std::make_unique<detail::SubprocessLauncher>();
      launcher_->launch(topology_, devices_, num_nodes_);
    }
    backend_ =
        options_.process_group_backend.empty() ? (device.is_cuda() ? "nccl" : "gloo") : options_.process_group_backend;
    try {
      auto connection = detail::make_process_group(backend_,
                                                   {.address = topology_.main_address,
                                                    .port = topology_.main_port,
                                                    .rank = topology_.global_rank,
                                                    .world_size = topology_.world_size,
                                                    .timeout = options_.timeout,
                                                    .launcher_hosts_store = topology_.store_hosted_by_launcher},
                                                   num_nodes_ == 1);
      store_ = std::move(connection.store);
      pg_ = std::move(connection.pg);
    } catch (...) {
      // NOTE: the processes this one started cannot meet without it: teardown stops them.
      failed_ = true;
      throw;
    }
  }

  // ---- the step ----

  /// Runs backward through the precision; a gradient synchronisation that fails (a dead or hung peer)
  /// raises `backward failed on rank R of W`.
  template <class P, class... Args>
  void backward(const at::Tensor& loss, P& precision, Args&&... args) {
    collective("backward", [&] { precision.backward(loss, std::forward<Args>(args)...); });
  }

  // ---- collectives ----

  /// Waits for all processes of the group (default: the world); the name shows in the error of a barrier
  /// that fails or times out, and, with TORCH_DISTRIBUTED_DEBUG=INFO or DETAIL, on stderr as each process
  /// enters and leaves it.
  void barrier(std::string_view name = {}, const ProcessGroup& group = {}) {
    const std::string what = name.empty() ? std::string("barrier") : fmt::format("barrier \"{}\"", name);
    const auto g = resolve(group, what);
    const bool debug = c10d::debug_level() != c10d::DebugLevel::Off;
    if (debug) fmt::print(stderr, "fabric: rank {} of {} enters {}\n", global_rank(), world_size(), what);
    c10d::BarrierOptions opts;
    opts.timeout = options_.timeout;
    wait(g.pg->barrier(opts), what);
    if (debug) fmt::print(stderr, "fabric: rank {} of {} leaves {}\n", global_rank(), world_size(), what);
  }
  /// Reduces a tensor across the processes of the group in place (mean: sum, then divide by the group's
  /// size; an integer tensor's mean is returned as a new floating tensor).
  at::Tensor all_reduce(at::Tensor tensor, ReduceOp op, const ProcessGroup& group = {}) {
    const auto g = resolve(group, "all_reduce");
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
    wait(g.pg->allreduce(tensors, opts), "all_reduce");
    if (op != ReduceOp::mean) return tensor;
    if (at::isFloatingType(tensor.scalar_type()) || at::isComplexType(tensor.scalar_type())) {
      return tensor.div_(g.size);
    }
    return tensor.div(g.size);
  }
  /// Gathers a tensor from the processes of the group into a new tensor with a leading group-size
  /// dimension. With sync_grads the result is part of the autograd graph (Lightning's `_AllGather`): its
  /// backward sums the gradient over the group and gives each process the slice of its own tensor, so
  /// every member must run that backward; without, the result has no gradient (Lightning's no_grad).
  at::Tensor all_gather(const at::Tensor& tensor, const ProcessGroup& group = {}, bool sync_grads = false) {
    const auto g = resolve(group, "all_gather");
    at::Tensor input = tensor.contiguous();
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < g.size; ++r) outputs[0].push_back(at::empty_like(input));
    std::vector<at::Tensor> inputs{input.detach()};
    c10d::AllgatherOptions opts;
    opts.timeout = options_.timeout;
    check_same_shape(input, "all_gather", g);
    wait(g.pg->allgather(outputs, inputs, opts), "all_gather");
    at::Tensor gathered = at::stack(outputs[0]);
    if (sync_grads && c10::GradMode::is_enabled() && tensor.requires_grad()) {
      auto node = std::make_shared<detail::AllGatherBackward>(g.pg, g.rank, options_.timeout, gathered.sizes().vec(),
                                                              gathered.options());
      node->set_next_edges(torch::autograd::collect_next_edges(tensor));
      torch::autograd::set_history(gathered, node);
    }
    return gathered;
  }
  /// Returns rank src's value on every process of the group (src is a global rank; default group: the
  /// world): tensors, numbers, strings and what c10::IValue holds (vectors, dictionaries, tuples).
  template <class T>
  T broadcast(T value, int src, const ProcessGroup& group = {}) {
    const auto g = resolve(group, "broadcast");
    const int root = group.is_world() ? src : group.group_rank(src);
    if (root < 0) {
      detail::raise(
          "broadcast: expected src to be a member of the group of ranks [{}], found src = {}; pass one of them",
          fmt::join(group.ranks(), ", "), src);
    }
    std::vector<char> bytes;
    if (g.rank == root) bytes = detail::pickle_value(value);
    broadcast_bytes(bytes, root, "broadcast", g);
    if (g.rank == root) return value;
    return detail::unpickle_value<T>(bytes, device_);
  }
  /// Creates a group of the global ranks (sorted, as torch.distributed.new_group): a collective of the
  /// world, called by every process with the same ranks in the same order of new_group calls (checked:
  /// different ranks fail on every process). The members connect a group of the backend of their own;
  /// the others get a handle whose is_member() is false.
  ProcessGroup new_group(std::vector<int> ranks) {
    group("new_group");
    detail::normalize_group_ranks(ranks, world_size());
    const std::string mine = fmt::format("{}", fmt::join(ranks, ","));
    std::vector<char> bytes(mine.begin(), mine.end());
    broadcast_bytes(bytes, 0, "new_group");
    const std::string reference(bytes.begin(), bytes.end());
    if (!reduce_boolean_decision(reference == mine, true)) {
      detail::raise(
          "new_group: expected the same ranks on every process, found [{}] on rank {} and [{}] on rank 0{}; call "
          "new_group on every process with the same ranks",
          mine, global_rank(), reference, reference == mine ? " (this rank matches; another one does not)" : "");
    }
    const std::size_t index = groups_made_++;
    const auto it = std::find(ranks.begin(), ranks.end(), global_rank());
    if (it == ranks.end()) return ProcessGroup(std::move(ranks), -1);
    const int rank = static_cast<int>(it - ranks.begin());
    auto impl = std::make_shared<detail::ProcessGroupImpl>();
    impl->pg = detail::make_subgroup(backend_, store_, index, ranks, rank,
                                     {.address = topology_.main_address,
                                      .port = topology_.main_port,
                                      .rank = global_rank(),
                                      .world_size = world_size(),
                                      .timeout = options_.timeout},
                                     num_nodes_ == 1);
    return ProcessGroup(std::move(ranks), rank, std::move(impl));
  }
  /// Combines a boolean decision across processes: all of them (all = true) or any of them.
  bool reduce_boolean_decision(bool decision, bool all) {
    at::Tensor t = at::scalar_tensor(decision ? 1 : 0, at::TensorOptions().dtype(at::kInt).device(device_));
    t = all_reduce(t, ReduceOp::sum);
    const int votes = t.item<int>();
    return all ? votes == world_size() : votes > 0;
  }

  // ---- checkpoints ----

  /// Writes the state on rank 0; when rank 0 fails, every rank fails (no rank waits for a writer
  /// that died).
  void save_checkpoint(const std::filesystem::path& path, const State& state, const Filters& filters = {}) {
    on_rank_zero_agreed("save", [&] { StrategyBase::save_checkpoint(path, state, filters); });
  }
  /// Loads on every rank; a failure on one fails them all.
  State load_checkpoint(const std::filesystem::path& path, State& state, bool strict) {
    return on_all_ranks_agreed("load", [&] { return StrategyBase::load_checkpoint(path, state, strict); });
  }
  /// Loads a torch::save file on every rank; a failure on one fails them all.
  template <class T>
  void load_raw(const std::filesystem::path& path, T& target, bool strict) {
    on_all_ranks_agreed("load_raw", [&] {
      StrategyBase::load_raw(path, target, strict);
      return true;
    });
  }

  /// Says whether setup_dataloaders shards data across ranks (yes: every rank gets its part).
  bool shards_data() const noexcept { return true; }

  /// Closes the process group and ends the processes this one started: waits for them, or, after a
  /// failed collective (or while an exception unwinds), stops them so that a hung peer cannot keep
  /// this process alive. Idempotent.
  void teardown() noexcept {
    if (pg_) {
      detail::shutdown_process_group(pg_);
      pg_.reset();
      store_.reset();
    }
    if (launcher_) {
      if (failed_) launcher_->stop_children();
      launcher_.reset();
    }
  }

 protected:
  /// Fails on every rank, naming the first difference, when the module (its `description`, one line per
  /// parameter and buffer) differs from rank 0's; `who` opens the message ("DDP").
  void verify_same_model(std::string_view who, const std::string& description) {
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
        detail::raise("{}: rank {} has a different model than rank 0: {}; build the same model on every rank", who,
                      global_rank(), difference);
      }
      detail::raise(
          "{}: another rank has a different model than rank {} (its error names the parameter); build the same "
          "model on every rank",
          who, global_rank());
    }
  }
  /// Returns the process group; raises naming `what` before launch().
  const c10::intrusive_ptr<c10d::ProcessGroup>& group(std::string_view what) const {
    if (!pg_) {
      detail::raise(
          "{}: the processes of the distributed strategy are not connected yet; call fabric.launch() first (once, "
          "before setup, collectives and save)",
          what);
    }
    return pg_;
  }
  /// A group resolved for a collective: the backend's group, this process's rank in it and its size.
  struct ResolvedGroup {
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
    int rank = 0;
    int size = 1;
  };
  /// Returns the backend's group of `group` (the world when default); raises naming `what` before
  /// launch(), on a process that is not a member, and for a group that no parallel strategy made.
  ResolvedGroup resolve(const ProcessGroup& group, std::string_view what) const {
    const auto& world = this->group(what);
    if (group.is_world()) return {world, global_rank(), world_size()};
    detail::check_member(group, global_rank(), what);
    if (!group.impl() || !group.impl()->pg) {
      detail::raise(
          "{}: expected a group made by this Fabric's new_group, found one of ranks [{}] without a connection (made "
          "by a one-process Fabric?); create it with fabric.new_group(ranks) after launch()",
          what, fmt::join(group.ranks(), ", "));
    }
    return {group.impl()->pg, group.rank(), group.size()};
  }
  /// Returns the c10d backend launch() chose ("gloo", "nccl").
  const std::string& backend() const noexcept { return backend_; }
  /// Runs a collective, turning c10d's failures into errors that say which rank and what to check.
  template <class Fn>
  void collective(std::string_view what, Fn&& fn) {
    try {
      std::forward<Fn>(fn)();
    } catch (const fabric::Error&) {
      throw;
    } catch (const std::exception& e) {
      failed_ = true;
      detail::raise(
          "{} failed on rank {} of {} ({}); another process probably failed, was killed or did not reach the same "
          "collective within the timeout of {} s: check the other processes' output",
          what, global_rank(), world_size(), detail::first_line(e.what()),
          std::chrono::duration_cast<std::chrono::seconds>(options_.timeout).count());
    }
  }
  /// Waits for a collective's work within the timeout.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, std::string_view what) {
    collective(what, [&] { work->wait(options_.timeout); });
  }
  /// Sends rank src's bytes to every rank.
  void broadcast_bytes(std::vector<char>& bytes, int src, std::string_view what) {
    broadcast_bytes(bytes, src, what, resolve({}, what));
  }
  /// Sends the bytes of the group's rank src to every member of the group.
  void broadcast_bytes(std::vector<char>& bytes, int src, std::string_view what, const ResolvedGroup& g) {
    const auto& pg = g.pg;
    const auto on_device = at::TensorOptions().device(device_);
    at::Tensor size =
        at::scalar_tensor(static_cast<std::int64_t>(bytes.size()), on_device.dtype(at::kLong)).reshape({1});
    c10d::BroadcastOptions opts;
    opts.rootRank = src;
    opts.timeout = options_.timeout;
    std::vector<at::Tensor> sizes{size};
    wait(pg->broadcast(sizes, opts), what);
    const auto n = size.item<std::int64_t>();
    at::Tensor data = g.rank == src ? at::from_blob(bytes.data(), {n}, at::TensorOptions().dtype(at::kByte)).to(device_)
                                    : at::empty({n}, on_device.dtype(at::kByte));
    std::vector<at::Tensor> datas{data};
    wait(pg->broadcast(datas, opts), what);
    if (g.rank != src) {
      at::Tensor host = data.cpu();
      bytes.assign(static_cast<const char*>(host.data_ptr()), static_cast<const char*>(host.data_ptr()) + n);
    }
  }
  /// Fails on every member of the group when a tensor's shape or dtype differs from the group's rank 0's.
  void check_same_shape(const at::Tensor& t, std::string_view what, const ResolvedGroup& g) {
    std::string text = detail::shape_str(t.sizes()) + " " + std::string(c10::toString(t.scalar_type()));
    std::vector<char> bytes(text.begin(), text.end());
    broadcast_bytes(bytes, 0, what, g);
    const bool same = std::string(bytes.begin(), bytes.end()) == text;
    at::Tensor vote = at::scalar_tensor(same ? 1 : 0, at::TensorOptions().dtype(at::kInt).device(device_)).reshape({1});
    std::vector<at::Tensor> votes{vote};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::MIN;
    opts.timeout = options_.timeout;
    wait(g.pg->allreduce(votes, opts), what);
    if (vote.item<int>() == 0) {
      detail::raise("{}: expected the same shape and dtype on every rank, found {} on rank {} and {} on rank 0{}", what,
                    text, global_rank(), std::string(bytes.begin(), bytes.end()),
                    same ? " (this rank matches; another one does not)" : "");
    }
  }
  /// Runs fn on rank zero and makes every rank fail when it fails (so no rank waits forever).
  template <class Fn>
  void on_rank_zero_agreed(std::string_view what, Fn&& fn) {
    std::exception_ptr failure;
    if (global_rank() == 0) {
      try {
        std::forward<Fn>(fn)();
      } catch (...) {
        failure = std::current_exception();
      }
    }
    if (!reduce_boolean_decision(failure == nullptr, /*all=*/true) && failure == nullptr) {
      detail::raise("{}: rank 0 failed (its error says why); nothing was written", what);
    }
    if (failure) std::rethrow_exception(failure);
  }
  /// Runs fn on every rank and makes every rank fail when one fails.
  template <class Fn>
  std::invoke_result_t<Fn> on_all_ranks_agreed(std::string_view what, Fn&& fn) {
    std::exception_ptr failure;
    std::optional<std::invoke_result_t<Fn>> result;
    try {
      result.emplace(std::forward<Fn>(fn)());
    } catch (...) {
      failure = std::current_exception();
    }
    if (!reduce_boolean_decision(failure == nullptr, /*all=*/true) && failure == nullptr) {
      detail::raise(
          "{}: another rank failed to load (its error says why); load on every rank from a path they all can read",
          what);
    }
    if (failure) std::rethrow_exception(failure);
    return std::move(*result);
  }

  /// The processes per node and the nodes of the job.
  int devices_ = 1;
  int num_nodes_ = 1;

 private:
  ParallelOptions options_;
  Topology topology_{};
  std::string backend_{};
  bool failed_ = false;
  /// The groups made by new_group so far (each connects under a store prefix of its own).
  std::size_t groups_made_ = 0;
  /// The store the processes met at; new groups meet there too.
  c10::intrusive_ptr<c10d::Store> store_{};
  // NOTE: teardown closes the process group before the launcher waits for its children; declared in that
  // order so that the implicit destruction of a moved-into strategy agrees.
  std::unique_ptr<detail::SubprocessLauncher> launcher_{};
  c10::intrusive_ptr<c10d::ProcessGroup> pg_{};
};

}  // namespace fabric
