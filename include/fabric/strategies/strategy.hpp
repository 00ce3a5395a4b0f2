#pragma once
// The Strategy concept (everything Fabric and its wrappers ask of a strategy), the check that names
// what a strategy lacks, and fabric::StrategyBase, the one-process defaults a strategy derives from.
//
// A strategy owns the steps: Fabric hands it backward, the optimizer step, gradient clipping, the
// collectives and the checkpoints; the strategy hands precision work to the precision and file work
// to its CheckpointIO.

#include "fabric/core/concepts.hpp"
#include "fabric/core/config.hpp"
#include "fabric/core/error.hpp"
#include "fabric/core/guard.hpp"
#include "fabric/core/options.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/io/native.hpp"
#include "fabric/io/safetensors.hpp"
#include "fabric/io/state.hpp"
#include "fabric/io/torch_archive.hpp"
#include "fabric/precision/precision.hpp"
#include "fabric/strategies/group.hpp"
#include "fabric/utils/clip.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <concepts>
#include <filesystem>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// Stands for any precision where a concept checks a strategy's members that take one.
struct PrecisionArchetype : PrecisionBase {
  static constexpr std::string_view name = "archetype";
};

// One concept per member the core calls; Strategy is their conjunction and check_strategy names the
// first one missing.
template <class S>
concept strategy_has_module_state = requires {
  typename S::ModuleState;
};
template <class S>
concept strategy_says_distributed = requires {
  { S::is_distributed } -> std::convertible_to<bool>;
};
template <class S>
concept strategy_checks_combination = requires {
  S::template check<AcceleratorArchetype, PrecisionArchetype>();
};
template <class S>
concept strategy_sets_up_environment = requires(S& s, const Options& o) {
  s.setup_environment(o);
};
template <class S>
concept strategy_has_ranks = requires(const S& s) {
  { s.global_rank() } -> std::convertible_to<int>;
  { s.local_rank() } -> std::convertible_to<int>;
  { s.node_rank() } -> std::convertible_to<int>;
  { s.world_size() } -> std::convertible_to<int>;
};
template <class S>
concept strategy_launches = requires(S& s, const c10::Device& d) {
  s.setup_device(d);
  s.launch(d);
};
template <class S>
concept strategy_sets_up_module = requires(S& s, torch::nn::Module& m) {
  { s.setup_module(m) } -> std::same_as<typename S::ModuleState>;
};
template <class S>
concept strategy_sets_up_optimizer = requires(S& s, torch::optim::Optimizer& o) {
  s.setup_optimizer(o);
};
template <class S>
concept strategy_hooks_forward = requires(S& s, typename S::ModuleState& state, const at::Tensor& out) {
  s.pre_forward(state);
  s.post_forward(state, out);
};
template <class S>
concept strategy_controls_sync = requires(S& s, typename S::ModuleState& state) {
  s.no_backward_sync(state, true);
};
template <class S>
concept strategy_runs_backward = requires(S& s, const at::Tensor& loss, PrecisionArchetype& p) {
  s.backward(loss, p);
};
template <class S>
concept strategy_steps_optimizer = requires(S& s, torch::optim::Optimizer& o, PrecisionArchetype& p,
                                            torch::optim::Optimizer::LossClosure closure) {
  { s.optimizer_step(o, p, std::move(closure)) } -> std::convertible_to<at::Tensor>;
};
template <class S>
concept strategy_clips = requires(S& s, torch::nn::Module& m, typename S::ModuleState& state,
                                  torch::optim::Optimizer& o, PrecisionArchetype& p, const ClipOptions& c) {
  { s.clip_gradients(m, state, o, p, c) } -> std::same_as<std::optional<at::Tensor>>;
};
template <class S>
concept strategy_has_collectives = requires(S& s, const at::Tensor& t, const ProcessGroup& g, std::vector<int> ranks) {
  s.barrier(std::string_view{}, g);
  { s.all_reduce(t, ReduceOp::sum, g) } -> std::convertible_to<at::Tensor>;
  { s.all_gather(t, g, true) } -> std::convertible_to<at::Tensor>;
  { s.broadcast(1, 0, g) } -> std::convertible_to<int>;
  { s.new_group(std::move(ranks)) } -> std::same_as<ProcessGroup>;
  { s.reduce_boolean_decision(true, true) } -> std::same_as<bool>;
};
template <class S>
concept strategy_checkpoints = requires(S& s, const std::filesystem::path& path, const State& cs, State& state,
                                        torch::nn::Module& m) {
  s.save_checkpoint(path, cs);
  { s.load_checkpoint(path, state, true) } -> std::same_as<State>;
  s.load_raw(path, m, true);
};
/// The strategy's save takes save's filters (StrategyBase's does); without, save refuses filters.
template <class S>
concept strategy_saves_filtered = requires(S& s, const std::filesystem::path& path, const State& cs,
                                           const Filters& filters) {
  s.save_checkpoint(path, cs, filters);
};
template <class S>
concept strategy_shards = requires(const S& s) {
  { s.shards_data() } -> std::same_as<bool>;
};
template <class S>
concept strategy_tears_down = requires(S& s) {
  s.teardown();
};

}  // namespace detail

/// A strategy policy: the process topology (ranks, launching), what happens to set-up modules and
/// optimizers, the steps (backward, the optimizer step, clipping), collectives and checkpoints.
/// Derive from fabric::StrategyBase (one process) or fabric::ParallelStrategy (several; in
/// fabric/distributed.hpp) and override what differs.
template <class S>
concept Strategy = PolicyOf<S, strategy_tag> && std::move_constructible<S> && detail::strategy_has_module_state<S> &&
    detail::strategy_says_distributed<S> && detail::strategy_checks_combination<S> &&
    detail::strategy_sets_up_environment<S> && detail::strategy_has_ranks<S> && detail::strategy_launches<S> &&
    detail::strategy_sets_up_module<S> && detail::strategy_sets_up_optimizer<S> && detail::strategy_hooks_forward<S> &&
    detail::strategy_controls_sync<S> && detail::strategy_runs_backward<S> && detail::strategy_steps_optimizer<S> &&
    detail::strategy_clips<S> && detail::strategy_has_collectives<S> && detail::strategy_checkpoints<S> &&
    detail::strategy_shards<S> && detail::strategy_tears_down<S>;

namespace detail {

/// Fails with one message naming the first member a strategy policy lacks; true when it has all.
template <class S>
consteval bool check_strategy() {
  if constexpr (!std::move_constructible<S>) {
    static_assert(dependent_false_v<S>, "fabric: a Strategy must be move constructible");
  } else if constexpr (!strategy_has_module_state<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs a nested type ModuleState (what it keeps per set-up module); derive "
                  "from fabric::StrategyBase or declare `struct ModuleState {};`");
  } else if constexpr (!strategy_says_distributed<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs `static constexpr bool is_distributed` (whether it runs several "
                  "processes); derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_checks_combination<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs `template <class A, class P> static constexpr void check()`, its "
                  "compile-time check of the accelerator and precision; derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_sets_up_environment<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs `setup_environment(const fabric::Options&)`, which validates devices "
                  "and num_nodes; derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_has_ranks<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs global_rank(), local_rank(), node_rank() and world_size() const; derive "
                  "from fabric::StrategyBase or add them");
  } else if constexpr (!strategy_launches<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs setup_device(device) and launch(device); derive from "
                  "fabric::StrategyBase or add them");
  } else if constexpr (!strategy_sets_up_module<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs setup_module(module) returning its ModuleState; derive from "
                  "fabric::StrategyBase or add it");
  } else if constexpr (!strategy_sets_up_optimizer<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs setup_optimizer(optimizer); derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_hooks_forward<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs pre_forward(state) and post_forward(state, output), which the module "
                  "wrapper calls around forward; derive from fabric::StrategyBase or add them");
  } else if constexpr (!strategy_controls_sync<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs no_backward_sync(state, enabled) returning a guard; derive from "
                  "fabric::StrategyBase or add it");
  } else if constexpr (!strategy_runs_backward<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs backward(loss, precision, args...); derive from fabric::StrategyBase or "
                  "add it");
  } else if constexpr (!strategy_steps_optimizer<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs optimizer_step(optimizer, precision, closure) returning a tensor; derive "
                  "from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_clips<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs clip_gradients(module, state, optimizer, precision, options) returning "
                  "std::optional<at::Tensor>; derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_has_collectives<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs barrier(name, group), all_reduce(tensor, op, group), all_gather(tensor, "
                  "group, sync_grads), broadcast(value, src, group), new_group(ranks) and "
                  "reduce_boolean_decision(decision, all); derive from fabric::StrategyBase or add them");
  } else if constexpr (!strategy_checkpoints<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs save_checkpoint(path, state), load_checkpoint(path, state, strict) "
                  "returning fabric::State, and load_raw(path, target, strict); derive from fabric::StrategyBase or "
                  "add them");
  } else if constexpr (!strategy_shards<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs `bool shards_data() const` (whether loaders are split across ranks); "
                  "derive from fabric::StrategyBase or add it");
  } else if constexpr (!strategy_tears_down<S>) {
    static_assert(dependent_false_v<S>,
                  "fabric: a Strategy needs teardown(), called when the Fabric is destroyed; derive from "
                  "fabric::StrategyBase or add it");
  }
  return Strategy<S>;
}

}  // namespace detail

/// Settings every strategy takes.
struct StrategyOptions {
  /// The checkpoint format of save and load; empty: fabric::AutoCheckpointIO (by the path).
  AnyCheckpointIO checkpoint_io{};
};

/// The defaults of a strategy, for one process on one device: ranks 0 of 1, collectives that are
/// identities, backward and the optimizer step through the precision, clipping over the optimizer's
/// gradients, checkpoints through the CheckpointIO. Derive from it (or from fabric::SingleDevice)
/// and override what differs; name the strategy with a `name`.
///
///     struct ClipByValue : fabric::SingleDevice {
///       static constexpr std::string_view name = "clip_by_value";
///       template <class M, class O, class P>
///       std::optional<at::Tensor> clip_gradients(M&, ModuleState&, O& optimizer, P& precision,
///                                                const fabric::ClipOptions& options) { ... }
///     };
class StrategyBase {
 public:
  using category = strategy_tag;
  static constexpr bool is_distributed = false;
  /// Says whether the strategy works in the module wrapper's forward (fabric::NeedsWrappedForward):
  /// no, its pre_forward and post_forward do nothing.
  static constexpr bool needs_wrapped_forward = false;

  /// What the strategy keeps per set-up module (nothing).
  struct ModuleState {};

  StrategyBase() = default;
  /// Takes the settings every strategy has (the checkpoint format).
  explicit StrategyBase(StrategyOptions options) : checkpoint_io_(std::move(options.checkpoint_io)) {}

  /// Checks the combination with an accelerator and a precision at compile time (all combine).
  template <class A, class P>
  static constexpr void check() noexcept {}

  // ---- topology ----

  /// Validates the topology asked for in Fabric's options: one process on one device.
  void setup_environment(const fabric::Options& options) {
    if (options.devices != 1 || options.num_nodes != 1) {
      detail::raise(
          "SingleDevice runs one process on one device: expected devices = 1 and num_nodes = 1, found devices = {} "
          "and num_nodes = {}; use a distributed strategy (fabric::DDP) for more",
          options.devices, options.num_nodes);
    }
  }
  /// Binds the strategy to the device the accelerator chose.
  void setup_device(const c10::Device& device) noexcept { device_ = device; }
  /// Returns the device of this process (the CPU until Fabric binds one).
  const c10::Device& root_device() const noexcept { return device_; }
  /// Starts the processes of the strategy (there are none to start).
  void launch(const c10::Device& /*device*/) noexcept {}
  int global_rank() const noexcept { return 0; }
  int local_rank() const noexcept { return 0; }
  int node_rank() const noexcept { return 0; }
  int world_size() const noexcept { return 1; }

  // ---- modules and optimizers ----

  /// Prepares a module after it is on its device (nothing to do).
  template <class M>
  ModuleState setup_module(M& /*module*/) noexcept {
    return {};
  }
  /// Prepares an optimizer (nothing to do).
  template <class O>
  void setup_optimizer(O& /*optimizer*/) noexcept {}
  /// Runs before each wrapped forward.
  template <class State>
  FABRIC_ALWAYS_INLINE void pre_forward(State& /*state*/) noexcept {}
  /// Runs after each wrapped forward with its output.
  template <class State, class Out>
  FABRIC_ALWAYS_INLINE void post_forward(State& /*state*/, const Out& /*output*/) noexcept {}
  /// Returns the guard that skips gradient synchronisation (nothing to skip).
  template <class State>
  NullGuard no_backward_sync(State& /*state*/, bool /*enabled*/) noexcept {
    return {};
  }

  // ---- the step ----

  /// Runs backward through the precision (loss scaling, where it has one).
  template <class P, class... Args>
  FABRIC_ALWAYS_INLINE void backward(const at::Tensor& loss, P& precision, Args&&... args) {
    precision.backward(loss, std::forward<Args>(args)...);
  }
  /// Steps the optimizer through the precision.
  template <class O, class P, class Closure>
  FABRIC_ALWAYS_INLINE at::Tensor optimizer_step(O& optimizer, P& precision, Closure&& closure) {
    return precision.optimizer_step(optimizer, std::forward<Closure>(closure));
  }
  /// Unscales the gradients where the precision scales, then clips the optimizer's gradients by norm
  /// or by value (fabric::clip_gradients); returns the total norm before clipping for max_norm. A
  /// precision that clips the gradients itself (fabric::ClipsGradients) does it instead.
  template <class M, class State, class O, class P>
  std::optional<at::Tensor> clip_gradients(M& /*module*/, State& /*state*/, O& optimizer, P& precision,
                                           const ClipOptions& options) {
    if constexpr (ClipsGradients<P>) {
      return precision.clip_gradients(optimizer, options, device_);
    } else {
      precision.unscale_gradients(optimizer);
      return fabric::clip_gradients(optimizer, options, device_);
    }
  }

  // ---- collectives (identities: one process) ----

  /// Waits for all processes of the group (there is only this one); the name is for messages.
  void barrier(std::string_view /*name*/ = {}, const ProcessGroup& /*group*/ = {}) const noexcept {}
  /// Reduces a tensor across the processes of the group (identity).
  const at::Tensor& all_reduce(const at::Tensor& tensor, ReduceOp /*op*/,
                               const ProcessGroup& /*group*/ = {}) const noexcept {
    return tensor;
  }
  /// Gathers a tensor from the processes of the group (identity, no new dimension, as Lightning's single
  /// device; the gradient flows as through any identity, sync_grads or not).
  const at::Tensor& all_gather(const at::Tensor& tensor, const ProcessGroup& /*group*/ = {},
                               bool /*sync_grads*/ = false) const noexcept {
    return tensor;
  }
  /// Broadcasts a value from rank src (identity).
  template <class T>
  T broadcast(T value, int /*src*/, const ProcessGroup& /*group*/ = {}) const {
    return value;
  }
  /// Creates a group of the ranks (here only rank 0 exists): collectives over it are identities too.
  ProcessGroup new_group(std::vector<int> ranks) const {
    detail::normalize_group_ranks(ranks, 1);
    return ProcessGroup(std::move(ranks), 0);
  }
  /// Combines a boolean decision across processes (identity).
  bool reduce_boolean_decision(bool decision, bool /*all*/) const noexcept { return decision; }

  // ---- checkpoints ----

  /// Writes the state through the checkpoint format, each filtered entry with what its filter keeps.
  void save_checkpoint(const std::filesystem::path& path, const State& state, const Filters& filters = {}) {
    write_checkpoint(detail::to_checkpoint(state, filters), path);
  }
  /// Reads a checkpoint through the format and restores state from it; returns what state did not ask for.
  State load_checkpoint(const std::filesystem::path& path, State& state, bool strict) {
    return detail::load_state(read_checkpoint(path), path, state, strict);
  }
  /// Loads a module or an optimizer (or its set-up wrapper) from a file written elsewhere: through the
  /// checkpoint format when it recognises the file and has load_raw, else through fabric::AutoCheckpointIO.
  template <class T>
  void load_raw(const std::filesystem::path& path, T& target, bool strict) {
    auto load = [&](auto& raw) {
      if (!checkpoint_io_.load_raw(path, raw, strict)) AutoCheckpointIO{}.load_raw(path, raw, strict);
    };
    if constexpr (detail::is_fabric_module_v<T>) {
      load(static_cast<torch::nn::Module&>(*target));
    } else if constexpr (detail::is_fabric_optimizer_v<T>) {
      load(static_cast<torch::optim::Optimizer&>(*target));
    } else if constexpr (ModuleLike<T>) {
      load(static_cast<torch::nn::Module&>(detail::module_ref(target)));
    } else if constexpr (std::is_base_of_v<torch::optim::Optimizer, T>) {
      load(static_cast<torch::optim::Optimizer&>(target));
    } else {
      static_assert(detail::dependent_false_v<T>,
                    "fabric: load_raw loads a module or an optimizer; pass one of them (or its setup wrapper)");
    }
  }
  /// Removes a checkpoint through the format.
  void remove_checkpoint(const std::filesystem::path& path) {
    checkpoint_io_ ? checkpoint_io_.remove_checkpoint(path) : AutoCheckpointIO{}.remove_checkpoint(path);
  }
  /// Returns the checkpoint format (empty: fabric::AutoCheckpointIO, by the extension).
  const AnyCheckpointIO& checkpoint_io() const noexcept { return checkpoint_io_; }
  /// Replaces the checkpoint format.
  void set_checkpoint_io(AnyCheckpointIO io) { checkpoint_io_ = std::move(io); }

  // ---- data and lifetime ----

  /// Says whether setup_dataloaders shards data across ranks (one process: never).
  bool shards_data() const noexcept { return false; }
  /// Releases what the strategy holds (nothing).
  void teardown() noexcept {}

 protected:
  /// Writes a checkpoint dictionary through the format.
  void write_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) {
    checkpoint_io_ ? checkpoint_io_.save_checkpoint(checkpoint, path)
                   : AutoCheckpointIO{}.save_checkpoint(checkpoint, path);
  }
  /// Reads a checkpoint dictionary through the format.
  Checkpoint read_checkpoint(const std::filesystem::path& path) {
    return checkpoint_io_ ? checkpoint_io_.load_checkpoint(path) : AutoCheckpointIO{}.load_checkpoint(path);
  }

  /// The device of this process (set by setup_device).
  c10::Device device_{c10::DeviceType::CPU};

 private:
  AnyCheckpointIO checkpoint_io_{};
};

}  // namespace fabric
