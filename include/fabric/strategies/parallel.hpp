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
#include "fabric/strategies/launchers/subprocess.hpp"
#include "fabric/strategies/strategy.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <c10/core/Device.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <sched.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

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
  /// The checkpoint format of save and load; empty: fabric::NativeCheckpointIO.
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
      pg_ = detail::make_process_group(backend_,
                                       {.address = topology_.main_address,
                                        .port = topology_.main_port,
                                        .rank = topology_.global_rank,
                                        .world_size = topology_.world_size,
                                        .timeout = options_.timeout,
                                        .launcher_hosts_store = topology_.store_hosted_by_launcher},
                                       num_nodes_ == 1);
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

  /// Waits for all processes.
  void barrier() {
    auto& pg = group("barrier");
    wait(pg->barrier(), "barrier");
  }
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
    }
    if (launcher_) {
      if (failed_) launcher_->stop_children();
      launcher_.reset();
    }
  }

 protected:
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
  /// Fails on every rank when a tensor's shape or dtype differs from rank 0's.
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
  // NOTE: teardown closes the process group before the launcher waits for its children; declared in that
  // order so that the implicit destruction of a moved-into strategy agrees.
  std::unique_ptr<detail::SubprocessLauncher> launcher_{};
  c10::intrusive_ptr<c10d::ProcessGroup> pg_{};
};

}  // namespace fabric
