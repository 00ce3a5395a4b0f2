#pragma once
// fabric::FSDP: fully sharded data parallel over c10d (Lightning's "fsdp"): the parameters, gradients and
// optimizer state split across the processes (ZeRO-3, FULL_SHARD), the gradients and optimizer state only
// (ZeRO-2, SHARD_GRAD_OP), or nothing (NO_SHARD, DDP's memory). Parameters are sharded per unit: the modules
// of the types in Options::units (declared with FABRIC_UNIT, whose forward runs the strategy's hooks), and
// the root unit of the parameters outside them.

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/c10d.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/io/sharded.hpp"
#include "fabric/io/state.hpp"
#include "fabric/io/torch_pickle.hpp"
#include "fabric/precision/precision.hpp"
#include "fabric/strategies/parallel.hpp"
#include "fabric/utils/activation_checkpoint.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/utils/clip.hpp"
#include "fabric/wrappers/optimizer.hpp"
#include "fabric/wrappers/unit.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/core/StorageImpl.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fabric {

/// What FSDP splits across the processes (PyTorch's ShardingStrategy, Lightning's `sharding_strategy`).
enum class ShardingStrategy {
  /// Parameters, gradients and optimizer state sharded (ZeRO-3): a unit's parameters are gathered for its
  /// forward and its backward and freed after each; at rest every process holds only its shards.
  FULL_SHARD,
  /// Gradients and optimizer state sharded, parameters whole on every process (ZeRO-2).
  SHARD_GRAD_OP,
  /// Nothing sharded: gradients all-reduced, every process steps every parameter (DDP's memory).
  NO_SHARD,
  /// FULL_SHARD within each node, replicated across the nodes: a unit is all-gathered among the processes of
  /// its node only, its gradients reduce-scattered within the node and then all-reduced across the nodes (the
  /// processes of the same local rank). On one node, FULL_SHARD.
  HYBRID_SHARD,
  /// SHARD_GRAD_OP within each node, replicated across the nodes (PyTorch's `_HYBRID_SHARD_ZERO2`). On one
  /// node, SHARD_GRAD_OP.
  HYBRID_SHARD_ZERO2,
};

/// When FULL_SHARD gathers the parameters of the unit whose backward comes next (PyTorch's BackwardPrefetch).
enum class BackwardPrefetch {
  /// As the gradient of a unit's output arrives, before its backward runs: the next unit's all-gather overlaps
  /// with this unit's backward (PyTorch's default).
  BACKWARD_PRE,
  /// After a unit's gradients are reduced: the next unit's all-gather follows this unit's reduction.
  BACKWARD_POST,
  /// No prefetch: a unit is gathered when the gradient of its output arrives.
  NONE,
};

namespace detail {

/// One parameter of a unit: where it lies in the unit's flat buffer and the part of it this process steps.
struct FSDPParam {
  at::Tensor param;       ///< the module's parameter, a view into the unit's flat buffer
  std::string name;       ///< its name in the module
  std::int64_t offset{};  ///< its first element in the flat buffer
  std::int64_t numel{};
  at::Tensor piece;         ///< the leaf the optimizer steps: this process's elements of it, a view of the shard
  std::int64_t begin{};     ///< the first element of the parameter (flattened) that the piece holds
  std::int64_t in_shard{};  ///< where the piece starts in the shard
};

/// Parameters flattened into one padded buffer, split in equal shards, one per process.
struct FSDPUnit {
  std::string name;
  /// The all-gather in flight into the flat buffer (prefetched, or issued and not yet waited for).
  c10::intrusive_ptr<c10d::Work> gathering;
  bool prefetched = false;  ///< gathered ahead of its use and not used yet
  bool released = false;    ///< the strategy was torn down: the hooks do nothing
  std::vector<FSDPParam> params;
  at::Tensor flat;       ///< all parameters, padded to world * shard_size elements
  at::Tensor shard;      ///< this process's shard_size elements (own storage; the pieces view it)
  std::int64_t total{};  ///< elements of the parameters, without padding
  std::int64_t shard_size{};
  bool gathered = true;  ///< the flat buffer holds the parameters (else its storage has no bytes)
  /// The dtype training's all-gathers send the shards in (FSDP's param_dtype) and the one gradients are
  /// reduced in (reduce_dtype); the flat buffer's own dtype when they are not narrower.
  c10::ScalarType gather_dtype = c10::ScalarType::Undefined;
  c10::ScalarType reduce_dtype = c10::ScalarType::Undefined;
  bool rounded = false;   ///< the flat buffer holds the shards rounded to gather_dtype (a training gather's)
  at::Tensor gather_in;   ///< a rounded all-gather in flight: this process's rounded shard
  at::Tensor gather_out;  ///< and what receives every process's, copied into the flat buffer once it arrived
  bool done = false;      ///< this backward reduced (or skipped) the unit's gradients already
  std::size_t ready = 0;  ///< parameters whose gradient this backward has accumulated
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  ///< kept alive: they carry the hooks
  struct FSDPModule* owner = nullptr;
  std::shared_ptr<torch::nn::Module> module;  ///< the unit's module (null for the root unit)
  std::shared_ptr<UnitHook> hook;             ///< installed on the unit's module
};

/// Gives a storage `bytes` new bytes from its allocator, or takes them all (bytes = 0), without a
/// tensor operation: the version counters of the tensors viewing it stay (autograd saved the parameters)
/// and their views follow the storage. The same StorageImpl members in LibTorch 1.13 and 2.x.
inline void resize_storage(const at::Tensor& tensor, std::size_t bytes) {
  c10::StorageImpl* storage = tensor.storage().unsafeGetStorageImpl();
  if (bytes == 0) {
    storage->set_data_ptr_noswap(at::DataPtr(nullptr, tensor.device()));
  } else {
    storage->set_data_ptr_noswap(storage->allocator()->allocate(bytes));
  }
  storage->set_nbytes(bytes);
}

/// What FSDP keeps per set-up module.
struct FSDPModule {
  std::vector<std::shared_ptr<FSDPUnit>> units;
  /// The set-up module (to find it among a checkpoint's entries).
  const torch::nn::Module* module = nullptr;
  /// Gradients are reduced at the next backward (false inside no_backward_sync).
  bool sync = true;
  /// A forward with gradients ran since the last reduction.
  bool pending = false;
  /// Inside the set-up module's forward (not a recomputation in backward).
  bool forwarding = false;
  /// The units (not the root) in the order the last forward first ran them; prefetch follows it.
  std::vector<FSDPUnit*> order;
  /// The order of the forward running now.
  std::vector<FSDPUnit*> recording;
  /// How many forwards recorded an order different from the one before (the first included).
  std::size_t orders_recorded = 0;
};

}  // namespace detail

/// Fully sharded data parallel: like DDP one process per device, but each process keeps only its shard
/// of the gradients and of the optimizer state (SHARD_GRAD_OP, ZeRO-2), so that their memory divides by
/// the number of processes. The parameters of the model are flattened into one padded buffer; after
/// backward the gradients are reduce-scattered (averaged) into each process's shard, the optimizer steps
/// only the shard (its param_groups are rewritten at setup to hold the shard's part of each parameter),
/// and the updated shards are all-gathered into every process's parameters. Any model works as it is.
///
///     fabric::Fabric<fabric::CUDA, fabric::FSDP> fabric{{.devices = 4}};
///     fabric.launch();
///     auto [model, optimizer] = fabric.setup(net, adamw);   // or setup_module, then setup_optimizers
class FSDP : public ParallelStrategy {
 public:
  static constexpr std::string_view name = "fsdp";
  static constexpr bool needs_wrapped_forward = true;

  /// Settings of the strategy (Lightning's FSDPStrategy arguments that C++ can honour).
  struct Options {
    /// What is sharded (Lightning's default: everything).
    ShardingStrategy sharding_strategy = ShardingStrategy::FULL_SHARD;
    /// The module types whose instances are sharded as units (Lightning's `auto_wrap_policy={Block}`):
    /// `fabric::module_types<BlockImpl>()`; their types must be declared with FABRIC_UNIT. Empty: the whole
    /// model is one unit.
    ModuleTypes units{};
    /// The unit types whose forward is recomputed in backward instead of keeping its activations
    /// (Lightning's `activation_checkpointing_policy={Block}`; fabric::apply_activation_checkpointing at
    /// setup): `fabric::module_types<BlockImpl>()`.
    ModuleTypes activation_checkpointing{};
    /// FULL_SHARD: when backward gathers the next unit ahead (PyTorch's `backward_prefetch`, Lightning passes
    /// it through): BACKWARD_PRE (default) as the gradient of a unit's output arrives, BACKWARD_POST after a
    /// unit's gradients are reduced, NONE when the unit's own backward needs it.
    BackwardPrefetch backward_prefetch = BackwardPrefetch::BACKWARD_PRE;
    /// FULL_SHARD: when a unit's forward starts, gather the unit that ran after it in the last forward
    /// (PyTorch's `forward_prefetch`; the order is recorded in each forward).
    bool forward_prefetch = false;
    /// Prefetch only while fewer than two units (the root unit aside) hold their parameters, so that at most
    /// the running unit and the next one are gathered (PyTorch's `limit_all_gathers`).
    bool limit_all_gathers = true;
    /// The dtype the parameters are all-gathered in for forward and backward (Lightning's FSDPPrecision
    /// `param_dtype`): the shards the optimizer steps stay in the parameters' dtype (the masters), and what
    /// forward reads is them rounded to this. Empty: the precision's compute dtype (bfloat16 under
    /// bf16-mixed, float16 under 16-mixed, as Lightning), else the parameters' own.
    std::optional<c10::ScalarType> param_dtype{};
    /// The dtype the gradients are reduced in (Lightning's `reduce_dtype`); each process's averaged shard
    /// returns to the parameters' dtype. Empty: as param_dtype.
    std::optional<c10::ScalarType> reduce_dtype{};
    /// The c10d backend ("gloo", "nccl"); empty: gloo for the CPU, nccl for CUDA.
    std::string process_group_backend{};
    /// How long collectives and the rendezvous wait for the other processes.
    std::chrono::milliseconds timeout = std::chrono::minutes(30);
    /// Where the processes come from; default: detected in Lightning's order (fabric::AutoEnvironment).
    AnyEnvironment cluster_environment{};
    /// How save writes a checkpoint with a set-up module: "sharded" (a directory, one file per process and
    /// the metadata; loads into any number of processes) or "full" (one file of torch.save's format that rank
    /// 0 writes, which one-device fabric, Python and Lightning load).
    std::string state_dict_type = "sharded";
    /// The checkpoint format of save and load for checkpoints without set-up modules; empty:
    /// fabric::NativeCheckpointIO.
    AnyCheckpointIO checkpoint_io{};
  };
  /// What the strategy keeps per set-up module.
  struct ModuleState {
    std::shared_ptr<detail::FSDPModule> fsdp{};
  };

  FSDP() : FSDP(Options{}) {}
  /// Creates the strategy with settings, e.g. `FSDP({.sharding_strategy = fabric::ShardingStrategy::NO_SHARD})`.
  explicit FSDP(Options options)
      : ParallelStrategy({.process_group_backend = options.process_group_backend,
                          .timeout = options.timeout,
                          .cluster_environment = options.cluster_environment,
                          .checkpoint_io = options.checkpoint_io}),
        options_(std::move(options)) {}

  /// Checks the settings, then reads the cluster environment for the topology.
  void setup_environment(const fabric::Options& options) {
    if (options_.state_dict_type != "sharded" && options_.state_dict_type != "full") {
      detail::raise("FSDP: unknown state_dict_type \"{}\"; expected \"sharded\" or \"full\"", options_.state_dict_type);
    }
    for (const auto& [what, dtype] :
         {std::pair{"param_dtype", options_.param_dtype}, {"reduce_dtype", options_.reduce_dtype}}) {
      if (dtype && !c10::isFloatingType(*dtype)) {
        detail::raise(
            "FSDP: expected a floating dtype for {}, found {}; use torch::kBFloat16, torch::kHalf or "
            "torch::kFloat, or leave it empty to follow the precision",
            what, c10::toString(*dtype));
      }
    }
    ParallelStrategy::setup_environment(options);
    nodes_ = options.num_nodes;
  }
  /// Takes the precision's compute dtype, the default of param_dtype and reduce_dtype (Fabric calls it once).
  template <class P>
  void setup_precision(const P& precision) {
    precision_dtype_ = detail::compute_dtype(precision);
  }
  /// Returns the settings.
  const Options& options() const noexcept { return options_; }
  /// Says whether gradients and optimizer state are sharded (not NO_SHARD).
  bool sharded() const noexcept { return options_.sharding_strategy != ShardingStrategy::NO_SHARD; }
  /// Says whether the parameters are sharded too (FULL_SHARD, HYBRID_SHARD).
  bool full_shard() const noexcept {
    return options_.sharding_strategy == ShardingStrategy::FULL_SHARD ||
           options_.sharding_strategy == ShardingStrategy::HYBRID_SHARD;
  }
  /// Says whether the shards are replicated across nodes (HYBRID_SHARD, HYBRID_SHARD_ZERO2 on several nodes).
  bool hybrid() const noexcept { return static_cast<bool>(replica_pg_); }
  /// The processes a unit is sharded over (the node's under HYBRID_SHARD on several nodes, else all of them)
  /// and this process's place among them (valid after the first setup_module).
  int shard_world() const noexcept { return shard_world_; }
  int shard_rank() const noexcept { return shard_rank_; }

  FSDP(FSDP&&) noexcept = default;
  FSDP& operator=(FSDP&&) noexcept = default;
  ~FSDP() { teardown(); }

  /// Verifies the module is the same on every rank, broadcasts rank 0's parameters and buffers, and
  /// flattens the parameters that require grad into the unit's padded buffer (the parameters become views
  /// of it; their identity, and so an optimizer's references, stay).
  template <class M>
  ModuleState setup_module(M& module) {
    auto& pg = group("setup");
    auto state = std::make_shared<detail::FSDPModule>();
    state->module = &module;
    std::string description;
    for (const auto& item : module.named_parameters(true)) {
      description += fmt::format("parameter \"{}\" of shape {} ({})\n", item.key(), detail::shape_str(item->sizes()),
                                 c10::toString(item->scalar_type()));
    }
    std::vector<at::Tensor> buffers;
    for (const auto& b : module.named_buffers(true)) {
      if (!b->defined()) continue;
      description += fmt::format("buffer \"{}\" of shape {} ({})\n", b.key(), detail::shape_str(b->sizes()),
                                 c10::toString(b->scalar_type()));
      buffers.push_back(b->detach());
    }
    verify_same_model("FSDP", description);

    if (!options_.activation_checkpointing.empty()) {
      apply_activation_checkpointing(module, options_.activation_checkpointing);
    }
    // NOTE: innermost units first (named_modules lists a parent before its children), so that a unit's
    // parameters are those outside the units it holds; the root unit takes what no unit took.
    std::vector<detail::PolicyUnit> found;
    if (options_.sharding_strategy != ShardingStrategy::NO_SHARD) {
      found = detail::policy_units(module, options_.units, "FSDP");
    }
    std::reverse(found.begin(), found.end());
    std::unordered_map<const void*, std::string> claimed;  // parameter -> the path of the unit that holds it
    std::vector<at::Tensor> others;                        // parameters that do not train: broadcast as they are
    auto make_unit = [&](const std::string& name, torch::nn::Module& root, const std::string& prefix, bool is_root) {
      auto unit = std::make_shared<detail::FSDPUnit>();
      unit->name = name;
      unit->owner = state.get();
      for (const auto& item : root.named_parameters(true)) {
        const at::Tensor& p = item.value();
        const std::string full = prefix.empty() ? item.key() : prefix + "." + item.key();
        if (const auto [it, fresh] = claimed.try_emplace(p.unsafeGetTensorImpl(), prefix); !fresh) {
          // NOTE: a unit holds its nested units' parameters too (they were claimed first); one shared with a
          // unit outside it would be freed while this unit still reads it.
          const std::string& holder = it->second;
          const bool nested =
              holder.size() > prefix.size() + 1 && holder.compare(0, prefix.size() + 1, prefix + ".") == 0;
          if (!is_root && !nested && full_shard() && p.requires_grad()) {
            detail::raise(
                "FSDP: the parameter \"{}\" of unit `{}` is shared with unit `{}`; FULL_SHARD frees a unit's "
                "parameters "
                "after its forward, so the other unit would read freed memory; keep shared parameters (tied weights) "
                "outside the units or in one unit",
                full, prefix, holder);
          }
          continue;
        }
        if (!p.requires_grad()) {
          others.push_back(p.detach());
          continue;
        }
        if (const auto it = by_param_.find(p.unsafeGetTensorImpl());
            it != by_param_.end() && !it->second.unit.expired()) {
          detail::raise(
              "FSDP: parameter \"{}\" is already part of a module set up with this strategy; set up a module once, "
              "and modules that share no parameters",
              full);
        }
        if (!unit->params.empty() && (p.scalar_type() != unit->params.front().param.scalar_type() ||
                                      p.device() != unit->params.front().param.device())) {
          detail::raise(
              "FSDP: expected the parameters of {} on one device with one dtype, found \"{}\" ({}, {}) and \"{}\" "
              "({}, {}); convert the module to one dtype and device before setup",
              unit->name, unit->params.front().name, c10::toString(unit->params.front().param.scalar_type()),
              unit->params.front().param.device().str(), full, c10::toString(p.scalar_type()), p.device().str());
        }
        detail::FSDPParam fp;
        fp.param = p;
        fp.name = full;
        fp.offset = unit->total;
        fp.numel = p.numel();
        unit->total += fp.numel;
        unit->params.push_back(std::move(fp));
      }
      return unit;
    };
    std::vector<std::shared_ptr<detail::FSDPUnit>> units;
    for (const auto& u : found) {
      auto unit =
          make_unit(fmt::format("unit `{}`", u.path.empty() ? "(the model itself)" : u.path), *u.module, u.path, false);
      unit->module = u.module;
      if (!unit->params.empty()) units.push_back(std::move(unit));
    }
    auto root = make_unit("the root module", module, "", true);
    if (!root->params.empty()) units.push_back(std::move(root));
    if (units.empty()) {
      detail::raise("FSDP: expected a module with parameters that require grad, found none; nothing would be trained");
    }
    make_shard_groups();
    std::vector<at::Tensor> sync;
    for (const auto& unit : units) {
      flatten(*unit);
      unit->gather_dtype =
          sharded() ? communication_dtype(options_.param_dtype, unit->flat.scalar_type()) : unit->flat.scalar_type();
      unit->reduce_dtype = communication_dtype(options_.reduce_dtype ? options_.reduce_dtype : options_.param_dtype,
                                               unit->flat.scalar_type());
      sync.push_back(unit->flat);
    }
    sync.insert(sync.end(), others.begin(), others.end());
    sync.insert(sync.end(), buffers.begin(), buffers.end());
    collective("setup", [&] { c10d::broadcast_coalesced(pg, sync, kBroadcastBucketBytes, 0); });
    for (const auto& unit : units) {
      make_shard(unit);
      for (auto& fp : unit->params) by_param_.insert_or_assign(fp.param.unsafeGetTensorImpl(), Slot{unit, &fp});
      if (sharded()) install_hooks(unit);
      if (full_shard()) free_parameters(*unit);
      // NOTE: SHARD_GRAD_OP's forward reads the rounded parameters from the first step on.
      if (keeps_rounded(*unit)) gather_parameters(*unit, "setup");
      state->units.push_back(unit);
    }
    modules_.push_back(state);
    return ModuleState{std::move(state)};
  }

  /// Rewrites the optimizer's param_groups to hold, for each parameter of a set-up module, the part of it
  /// that this process steps (SHARD_GRAD_OP; NO_SHARD keeps the parameters). Refuses an optimizer that
  /// holds a parameter no set-up module has, or that has stepped already.
  template <class O>
  void setup_optimizer(O& optimizer) {
    torch::optim::Optimizer& opt = optimizer;
    std::size_t index = 0;
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        const auto it = by_param_.find(p.unsafeGetTensorImpl());
        if (it == by_param_.end() || it->second.unit.expired()) {
          if (pieces_.count(p.unsafeGetTensorImpl()) != 0) {
            detail::raise("FSDP: this optimizer was set up already (parameter {} is a shard); set up an optimizer once",
                          index);
          }
          detail::raise(
              "FSDP: the optimizer's parameter {} (shape {}) is not a parameter of a module set up with FSDP, so "
              "no process would hold its shard; create the optimizer over the set-up module's parameters "
              "(model->parameters()), after or together with setup_module",
              index, detail::shape_str(p.sizes()));
        }
        ++index;
      }
    }
    if (!opt.state().empty()) {
      detail::raise(
          "FSDP: expected an optimizer that has not stepped yet, found one with state for {} parameters; FSDP shards "
          "the optimizer state at setup: set up the optimizer before its first step",
          opt.state().size());
    }
    if (!sharded()) return;
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        const auto& slot = by_param_.at(p.unsafeGetTensorImpl());
        p = slot.param->piece;
      }
    }
  }

  /// Runs before each wrapped forward: FULL_SHARD gathers the root unit (the parameters outside the units),
  /// which stays whole until its gradients are reduced in backward.
  /// It starts recording the order the units run in; with forward_prefetch the first unit of the last
  /// forward's order is prefetched while the root unit is gathered.
  void pre_forward(ModuleState& state) {
    auto& module = *state.fsdp;
    module.forwarding = true;
    module.recording.clear();
    if (!full_shard()) return;
    detail::FSDPUnit* first = options_.forward_prefetch && !module.order.empty() ? module.order.front() : nullptr;
    for (const auto& unit : module.units) {
      if (unit->module) continue;
      gather_unit(*unit, "forward", first);
      first = nullptr;
    }
    if (first != nullptr) prefetch(*first, "forward");
  }
  /// Runs after each wrapped forward: a forward with gradients makes the next backward reduce them; one
  /// without frees the root unit again (FULL_SHARD). The order the units ran in replaces the recorded one
  /// when it differs, and units prefetched for it that this forward did not run are freed.
  template <class Out>
  void post_forward(ModuleState& state, const Out& /*output*/) {
    auto& module = *state.fsdp;
    module.forwarding = false;
    if (module.recording != module.order) {
      module.order = module.recording;
      ++module.orders_recorded;
    }
    if (c10::GradMode::is_enabled()) {
      module.pending = true;
    } else if (full_shard()) {
      for (const auto& unit : module.units) {
        if (!unit->module) free_parameters(*unit);
      }
    }
    if (full_shard()) release_prefetched(module);
  }

  /// What prefetch did since the strategy was made (FULL_SHARD): all-gathers issued ahead, those a unit then
  /// used, those limit_all_gathers held back, and the most units (the root unit aside) whose flat buffers held
  /// their bytes at once, counted after each all-gather of a forward or backward was issued.
  struct PrefetchStats {
    std::size_t issued = 0;
    std::size_t used = 0;
    std::size_t skipped_by_limit = 0;
    std::size_t max_gathered = 0;
  };
  const PrefetchStats& prefetch_stats() const noexcept { return stats_; }
  /// What the gradient reductions did since the strategy was made: the reductions issued, and the most
  /// whose unsharded gradients (the reduce-scatter's flat input, sharded strategies) were alive at once —
  /// at most `max_reductions_in_flight`, which bounds backward's peak to a few units' whole gradients.
  struct ReductionStats {
    std::size_t issued = 0;
    std::size_t max_in_flight = 0;
  };
  const ReductionStats& reduction_stats() const noexcept { return reduction_stats_; }
  /// Sharded, how many units' reductions may be in flight at once: the oldest is completed (waited for, its
  /// shard cut, its unsharded gradients freed) before a third one's gradients are flattened. Two keep a
  /// unit's reduction running beside the backward of the unit before it.
  static constexpr std::size_t max_reductions_in_flight = 2;
  /// The units (the root unit aside) of a set-up module whose parameters are gathered now, counted from the
  /// bytes their flat buffers hold.
  std::size_t gathered_units(const ModuleState& state) const { return count_gathered(*state.fsdp); }
  /// The units in the order the last forward first ran them (by name: "unit `blocks.0`"), which prefetch
  /// follows, and how many times a forward recorded a new order.
  std::vector<std::string> unit_order(const ModuleState& state) const {
    std::vector<std::string> names;
    for (const auto* unit : state.fsdp->order) names.push_back(unit->name);
    return names;
  }
  std::size_t orders_recorded(const ModuleState& state) const { return state.fsdp->orders_recorded; }
  /// The dtypes a set-up module communicates in, as setup resolved param_dtype and reduce_dtype: training's
  /// all-gathers of the parameters and the gradients' reductions.
  struct CommunicationDtypes {
    c10::ScalarType parameters = c10::ScalarType::Undefined;
    c10::ScalarType gradients = c10::ScalarType::Undefined;
  };
  CommunicationDtypes communication_dtypes(const ModuleState& state) const {
    const auto& unit = *state.fsdp->units.front();
    return {unit.gather_dtype, unit.reduce_dtype};
  }

  /// The guard summon_full_params returns: the module's parameters are whole while it lives.
  class FullParams {
   public:
    FullParams(FSDP& fsdp, std::shared_ptr<detail::FSDPModule> module) : fsdp_(&fsdp), module_(std::move(module)) {
      for (const auto& unit : module_->units) {
        if (fsdp_->full_shard() || unit->rounded) fsdp_->gather_unit(*unit, "summon_full_params");
      }
    }
    ~FullParams() {
      if (fsdp_ == nullptr) return;
      for (const auto& unit : module_->units) {
        if (fsdp_->full_shard()) {
          fsdp_->free_parameters(*unit);
        } else if (fsdp_->keeps_rounded(*unit)) {
          // NOTE: SHARD_GRAD_OP's parameters go back to their rounded values (what forward reads); a failed
          // collective has marked the strategy failed, and a destructor must not throw.
          try {
            fsdp_->gather_parameters(*unit, "setup");
          } catch (...) {
          }
        }
      }
    }
    FullParams(FullParams&& other) noexcept
        : fsdp_(std::exchange(other.fsdp_, nullptr)), module_(std::move(other.module_)) {}
    FullParams& operator=(FullParams&&) = delete;
    FullParams(const FullParams&) = delete;
    FullParams& operator=(const FullParams&) = delete;

   private:
    FSDP* fsdp_;
    std::shared_ptr<detail::FSDPModule> module_;
  };
  /// Gathers the parameters of a set-up module while the guard lives (PyTorch's `summon_full_params`), so
  /// that they can be read outside forward: under FULL_SHARD a module at rest holds only its shards, and its
  /// parameters must not be read otherwise. A collective: every process calls it. Changes made to the
  /// parameters inside are lost (the shards are what the optimizer steps).
  ///
  ///     { auto full = fabric.strategy().summon_full_params(model.strategy_state()); print(model->fc->weight); }
  FullParams summon_full_params(ModuleState& state) { return FullParams(*this, state.fsdp); }

  /// The guard that no_backward_sync returns: while it lives, backward leaves the (unsharded) gradients
  /// in the parameters, accumulating locally; the next synced backward reduces them.
  class NoSyncGuard {
   public:
    NoSyncGuard(detail::FSDPModule& module, bool enabled) : module_(&module), previous_(module.sync) {
      if (enabled) module.sync = false;
    }
    ~NoSyncGuard() {
      if (module_ != nullptr) module_->sync = previous_;
    }
    NoSyncGuard(NoSyncGuard&& other) noexcept
        : module_(std::exchange(other.module_, nullptr)), previous_(other.previous_) {}
    NoSyncGuard& operator=(NoSyncGuard&&) = delete;
    NoSyncGuard(const NoSyncGuard&) = delete;
    NoSyncGuard& operator=(const NoSyncGuard&) = delete;

   private:
    detail::FSDPModule* module_;
    bool previous_;
  };
  /// Returns the guard that skips the gradient reduction (when enabled) for the backward passes made
  /// while it lives. The skipped gradients are held whole on every process until the synced backward: as
  /// in Lightning, accumulating costs the memory of unsharded gradients.
  NoSyncGuard no_backward_sync(ModuleState& state, bool enabled) { return NoSyncGuard(*state.fsdp, enabled); }

  /// Runs backward through the precision, then reduces the gradients of every module whose forward ran
  /// (outside no_backward_sync): averaged into each process's shard (SHARD_GRAD_OP; the whole gradients are
  /// freed) or all-reduced (NO_SHARD). A failed reduction raises `backward failed on rank R of W`.
  /// The reductions are issued as each unit's last gradient arrives and waited for here, after autograd
  /// returns: a unit's reduction runs while backward goes on with the units before it (NCCL runs it on its
  /// own stream; Gloo on its threads).
  template <class P, class... Args>
  void backward(const at::Tensor& loss, P& precision, Args&&... args) {
    try {
      ParallelStrategy::backward(loss, precision, std::forward<Args>(args)...);
    } catch (...) {
      pending_.clear();
      throw;
    }
    collective("backward", [&] {
      for (const auto& module : modules_) {
        if (!module->pending) continue;
        // NOTE: units whose every gradient arrived were reduced (and freed) in backward by the hooks; here
        // the rest: units with parameters the forward did not use, and (without units) the whole model.
        for (const auto& unit : module->units) {
          if (!unit->done) finish_unit_backward(*unit, /*in_autograd=*/false);
          unit->done = false;
          unit->ready = 0;
        }
        if (full_shard()) release_prefetched(*module);
        if (module->sync) module->pending = false;
      }
    });
    finish_reductions();
  }

  /// Steps the optimizer through the precision on this process's shards, then all-gathers the updated
  /// shards into every process's parameters.
  template <class O, class P, class Closure>
  at::Tensor optimizer_step(O& optimizer, P& precision, Closure&& closure) {
    if constexpr (requires { P::name; }) {
      if (P::name == std::string_view("16-mixed") && sharded()) {
        detail::raise(
            "FSDP: 16-mixed scales the loss and skips steps whose gradients are not finite, but with sharded "
            "gradients each process sees only its shard and the processes could disagree; use bf16-mixed, or "
            "sharding_strategy = NO_SHARD");
      }
    }
    at::Tensor loss = precision.optimizer_step(optimizer, std::forward<Closure>(closure));
    // NOTE: FULL_SHARD gathers the updated shards at the next forward, unit by unit.
    if (!sharded() || full_shard()) return loss;
    std::vector<std::shared_ptr<detail::FSDPUnit>> units;
    const torch::optim::Optimizer& opt = optimizer;
    for (const auto& group : opt.param_groups()) {
      for (const auto& p : group.params()) {
        const auto it = pieces_.find(p.unsafeGetTensorImpl());
        if (it == pieces_.end()) continue;
        auto unit = it->second.unit.lock();
        if (unit && std::find(units.begin(), units.end(), unit) == units.end()) units.push_back(std::move(unit));
      }
    }
    for (const auto& unit : units) gather_parameters(*unit);
    return loss;
  }

  /// Unscales the gradients where the precision scales, then clips the gradients the optimizer holds (this
  /// process's shards): by value, or by the norm over all processes' shards (returned, before clipping).
  template <class M, class State, class O, class P>
  std::optional<at::Tensor> clip_gradients(M& /*module*/, State& /*state*/, O& optimizer, P& precision,
                                           const ClipOptions& options) {
    static_assert(!ClipsGradients<P>,
                  "fabric: FSDP clips the sharded gradients itself, over every process's shards, and cannot call a "
                  "precision's own clip_gradients (fabric::ClipsGradients); use DDP or SingleDevice with this "
                  "precision, or drop its clip_gradients to clip through unscale_gradients");
    precision.unscale_gradients(optimizer);
    const auto grads = optimizer_gradients(optimizer);
    if (options.clip_val) {
      clip_gradients_value(grads, *options.clip_val);
      return std::nullopt;
    }
    if (!sharded()) return fabric::clip_gradients(optimizer, options, device_);
    at::NoGradGuard no_grad;
    const double p = options.norm_type;
    const bool inf = std::isinf(p);
    double local = 0.0;
    for (const auto& g : grads) {
      if (g.numel() == 0) continue;
      const at::Tensor v = g.detach().abs().to(at::kDouble);
      local = inf ? std::max(local, v.max().item<double>()) : local + v.pow(p).sum().item<double>();
    }
    at::Tensor reduced = at::scalar_tensor(local, at::TensorOptions().dtype(at::kDouble).device(device_)).reshape({1});
    // NOTE: over the shard group: under HYBRID_SHARD each node holds the whole (averaged) gradients once.
    reduced = all_reduce(reduced, inf ? ReduceOp::max : ReduceOp::sum, shard_group_);
    const double norm = inf ? reduced.item<double>() : std::pow(reduced.item<double>(), 1.0 / p);
    at::Tensor total = at::scalar_tensor(norm, at::TensorOptions().device(device_));
    if (options.error_if_nonfinite && !std::isfinite(norm)) {
      detail::raise(
          "clip_gradients: the total norm of order {} of the gradients is non-finite ({}), so they cannot be "
          "clipped; check the loss, or pass error_if_nonfinite = false",
          p, norm);
    }
    const at::Tensor coef = (*options.max_norm / (total + 1e-6)).clamp_max(1.0);
    for (auto g : grads) g.mul_(coef.to(g.device()));
    return total;
  }

  // ---- checkpoints ----

  /// Saves the state. Without a set-up module or its optimizers in it, as every parallel strategy (rank 0
  /// writes through the checkpoint format). With them, as state_dict_type says: "sharded" writes a directory
  /// where each process writes its shards of the parameters and of the optimizer state (PyTorch's layout,
  /// `optimizer/state/<index>/exp_avg`) and rank 0 the rest; "full" writes one torch.save file on rank 0 (the
  /// consolidated sharded checkpoint). Filters apply to the plain entries only.
  void save_checkpoint(const std::filesystem::path& path, const State& state, const Filters& filters = {}) {
    const auto found = find_entries(state);
    if (found.modules.empty() && found.optimizers.empty()) {
      ParallelStrategy::save_checkpoint(path, state, filters);
      return;
    }
    for (const auto& [key, filter] : filters) {
      if (found.modules.contains(key) || found.optimizers.contains(key)) {
        detail::raise(
            "save: FSDP saves the set-up module and optimizer \"{}\" whole; expected filters for the other "
            "entries only, found one for \"{}\"",
            key, key);
      }
    }
    if (options_.state_dict_type == "sharded") {
      save_sharded(path, state, filters, found);
      return;
    }
    const std::filesystem::path staging = path.string() + ".fsdp-shards";
    on_rank_zero_agreed("save", [&] {
      std::error_code ec;
      if (std::filesystem::is_directory(path, ec)) {
        detail::raise(
            "save: the path {} exists and is a directory; a full checkpoint is one file: remove the "
            "directory or save elsewhere",
            path.string());
      }
    });
    save_sharded(staging, state, filters, found);
    on_rank_zero_agreed("save", [&] {
      const std::filesystem::path partial = path.string() + ".partial";
      std::error_code ec;
      std::filesystem::remove(partial, ec);
      consolidate_checkpoint(staging, partial);
      std::filesystem::rename(partial, path);
      std::filesystem::remove_all(staging, ec);
    });
  }

  /// Restores the state in place: from a sharded checkpoint directory (written by any number of processes)
  /// or a full checkpoint file (torch.save's format: "full" save, one-device fabric with TorchCheckpointIO,
  /// Python); each process reads only its shards' ranges of the set-up modules and optimizers. Returns the
  /// entries of the checkpoint that state did not ask for. A failure on one process fails them all.
  State load_checkpoint(const std::filesystem::path& path, State& state, bool strict) {
    const auto found = find_entries(state);
    if (found.modules.empty() && found.optimizers.empty()) {
      return ParallelStrategy::load_checkpoint(path, state, strict);
    }
    State rest = on_all_ranks_agreed("load", [&] { return load_entries(path, state, strict, found); });
    if (!full_shard()) {
      for (const auto& [key, module] : found.modules) {
        for (const auto& unit : module->units) gather_parameters(*unit, "load");
      }
    }
    return rest;
  }

  /// Loads a module from a torch::save file (or a full checkpoint's state dict file) on every process: a
  /// set-up module gathers its parameters, loads them whole and keeps its shards. An optimizer whose state
  /// is sharded is refused (load it with load, from a checkpoint with its module).
  template <class T>
  void load_raw(const std::filesystem::path& path, T& target, bool strict) {
    const torch::nn::Module* raw = nullptr;
    const torch::optim::Optimizer* opt = nullptr;
    if constexpr (std::is_base_of_v<torch::nn::Module, T>) {
      raw = &target;
    } else if constexpr (std::is_base_of_v<torch::optim::Optimizer, T>) {
      opt = &target;
    } else if constexpr (requires { target.module(); }) {  // the set-up wrapper
      raw = &target.module();
    } else if constexpr (requires { target.optimizer(); }) {
      opt = &target.optimizer();
    } else if constexpr (requires { target.get(); }) {  // a TORCH_MODULE holder
      if constexpr (std::is_base_of_v<torch::nn::Module, std::remove_pointer_t<decltype(target.get())>>) {
        raw = target.get();
      }
    }
    if (opt != nullptr) {
      for (const auto& p : detail::optimizer_params(*opt)) {
        if (pieces_.contains(p.unsafeGetTensorImpl())) {
          detail::raise(
              "load_raw: loading a single optimizer object from a file is not supported with FSDP (its "
              "state is sharded); save and load it with fabric.save / fabric.load together with its model");
        }
      }
    }
    const auto module = raw != nullptr ? module_of(raw) : nullptr;
    if (!module) {
      ParallelStrategy::load_raw(path, target, strict);
      return;
    }
    for (const auto& unit : module->units) gather_unit(*unit, "load_raw");
    std::exception_ptr failure;
    try {
      ParallelStrategy::load_raw(path, target, strict);
    } catch (...) {
      failure = std::current_exception();
    }
    at::NoGradGuard no_grad;
    for (const auto& unit : module->units) {
      if (owns_shard(*unit) && !failure) {
        unit->shard.copy_(unit->flat.narrow(0, shard_rank_ * unit->shard_size, unit->shard_size));
      }
      free_parameters(*unit);
      if (keeps_rounded(*unit)) gather_parameters(*unit, "setup");
    }
    if (failure) std::rethrow_exception(failure);
  }

  /// Gathers FULL_SHARD parameters back into the set-up modules (a collective: every process reaches it at
  /// the Fabric's end), so that a module used after the Fabric holds its trained values; removes the
  /// strategy's hooks; then closes the process groups as every parallel strategy does. After a failed
  /// collective, or while an exception unwinds, nothing is gathered (the modules keep only their shards).
  void teardown() noexcept {
    // NOTE: FULL_SHARD gives the module its parameters back whole, and buffers holding rounded parameters
    // (param_dtype) get their exact values.
    bool gather = launched() && !failed() && std::uncaught_exceptions() == 0;
    pending_.clear();
    for (const auto& module : modules_) {
      for (const auto& unit : module->units) {
        if (gather && (full_shard() || unit->rounded)) {
          try {
            gather_unit(*unit, "teardown");
          } catch (...) {
            gather = false;
          }
        }
        if (unit->module && unit->hook) detail::remove_unit_hook(*unit->module, *unit->hook);
        unit->hook.reset();
        unit->released = true;
      }
    }
    modules_.clear();
    shard_group_ = {};
    replica_group_ = {};
    shard_pg_.reset();
    replica_pg_.reset();
    ParallelStrategy::teardown();
  }

  /// Bytes this process holds for a set-up module, counted from its tensors: the parameters (the flat
  /// buffers and, sharded, the shards the optimizer steps) and the gradients (whole ones left in the
  /// parameters, the shards' averaged ones).
  struct Memory {
    std::int64_t parameters = 0;
    std::int64_t gradients = 0;
  };
  Memory memory(const ModuleState& state) const {
    Memory m;
    for (const auto& unit : state.fsdp->units) {
      m.parameters += static_cast<std::int64_t>(unit->flat.storage().nbytes());
      if (owns_shard(*unit)) m.parameters += static_cast<std::int64_t>(unit->shard.storage().nbytes());
      for (const auto& fp : unit->params) {
        if (fp.param.grad().defined()) m.gradients += fp.param.grad().nbytes();
        if (fp.piece.defined() && fp.piece.grad().defined()) {
          m.gradients += fp.piece.grad().numel() * static_cast<std::int64_t>(fp.piece.grad().element_size());
        }
      }
    }
    return m;
  }

 private:
  static constexpr std::size_t kBroadcastBucketBytes = 250u * 1024u * 1024u;

  struct Slot {
    std::weak_ptr<detail::FSDPUnit> unit;
    detail::FSDPParam* param;
  };

  /// Copies the unit's parameters into one flat buffer padded to a multiple of the world size and makes
  /// each parameter a view of it.
  void flatten(detail::FSDPUnit& unit) {
    at::NoGradGuard no_grad;
    const std::int64_t world = shard_world_;
    unit.shard_size = (unit.total + world - 1) / world;
    const auto& first = unit.params.front().param;
    unit.flat = at::zeros({unit.shard_size * world}, first.options().requires_grad(false));
    for (auto& fp : unit.params) {
      at::Tensor view = unit.flat.narrow(0, fp.offset, fp.numel).view(fp.param.sizes());
      view.copy_(fp.param.detach());
      fp.param.set_data(view);
    }
  }
  /// Copies this process's shard out of the flat buffer and cuts the pieces the optimizer steps.
  void make_shard(const std::shared_ptr<detail::FSDPUnit>& owner) {
    if (!sharded()) return;
    auto& unit = *owner;
    const std::weak_ptr<detail::FSDPUnit> weak = owner;
    at::NoGradGuard no_grad;
    const std::int64_t lo = shard_rank_ * unit.shard_size;
    const std::int64_t hi = lo + unit.shard_size;
    // NOTE: FULL_SHARD frees the flat buffer, so its shard has storage of its own, as has one that is gathered
    // rounded (the flat buffer then holds the rounded copy); otherwise the shard is this process's part of the
    // flat buffer (the all-gather after the step then works in place).
    const bool own = full_shard() || unit.gather_dtype != unit.flat.scalar_type();
    unit.shard = own ? unit.flat.narrow(0, lo, unit.shard_size).clone() : unit.flat.narrow(0, lo, unit.shard_size);
    for (auto& fp : unit.params) {
      const std::int64_t a = std::clamp(fp.offset, lo, hi);
      const std::int64_t b = std::clamp(fp.offset + fp.numel, lo, hi);
      fp.begin = a - fp.offset;
      fp.in_shard = a - lo;
      fp.piece = unit.shard.narrow(0, a - lo, b - a).detach();
      fp.piece.set_requires_grad(true);
      pieces_.insert_or_assign(fp.piece.unsafeGetTensorImpl(), Slot{weak, &fp});
    }
  }

  /// The c10d group a unit is sharded over: the node's processes under HYBRID_SHARD on several nodes, else all.
  const c10::intrusive_ptr<c10d::ProcessGroup>& shard_pg() const noexcept { return shard_pg_; }
  c10d::AllreduceOptions sum_options() const {
    c10d::AllreduceOptions all;
    all.reduceOp = c10d::ReduceOp::SUM;
    all.timeout = parallel_options().timeout;
    return all;
  }

  /// Makes the groups of HYBRID_SHARD on several nodes (a collective of the world, once): the shard group of
  /// each node (ranks node * per_node .. node * per_node + per_node - 1) and the replica group of each local
  /// rank (the same place on every node). Otherwise units are sharded over the world.
  void make_shard_groups() {
    if (shard_pg_) return;
    shard_pg_ = process_group();
    shard_rank_ = global_rank();
    shard_world_ = world_size();
    const bool wants = options_.sharding_strategy == ShardingStrategy::HYBRID_SHARD ||
                       options_.sharding_strategy == ShardingStrategy::HYBRID_SHARD_ZERO2;
    if (!wants || nodes_ <= 1) return;
    const int world = world_size();
    if (world % nodes_ != 0) {
      detail::raise("FSDP: HYBRID_SHARD expected the same number of processes on each of the {} nodes, found {} in all",
                    nodes_, world);
    }
    const int per_node = world / nodes_;
    for (int node = 0; node < nodes_; ++node) {
      std::vector<int> ranks;
      for (int r = 0; r < per_node; ++r) ranks.push_back(node * per_node + r);
      auto g = new_group(std::move(ranks));
      if (g.is_member()) shard_group_ = std::move(g);
    }
    for (int local = 0; local < per_node; ++local) {
      std::vector<int> ranks;
      for (int node = 0; node < nodes_; ++node) ranks.push_back(node * per_node + local);
      auto g = new_group(std::move(ranks));
      if (g.is_member()) replica_group_ = std::move(g);
    }
    shard_pg_ = shard_group_.impl()->pg;
    shard_rank_ = shard_group_.rank();
    shard_world_ = per_node;
    replica_pg_ = replica_group_.impl()->pg;
  }

  /// A unit's gradient reduction in flight: issued as the unit's last gradient arrives, finished in backward.
  struct PendingReduction {
    detail::FSDPUnit* unit = nullptr;
    c10::intrusive_ptr<c10d::Work> work;
    at::Tensor full;     ///< the unit's gradients, flat: all-reduced in place, or the reduce-scatter's input
    at::Tensor reduced;  ///< this process's shard of the sum: the reduce-scatter's output (Gloo: cut after the wait)
  };

  /// Issues the reduction of the unit's gradients without waiting for it (finish_reductions, at the end of
  /// backward, waits and averages): a reduce-scatter into this process's shard (NCCL; Gloo: an all-reduce),
  /// or an all-reduce (NO_SHARD). Sharded, the whole gradients are freed at once (they were copied).
  void reduce_gradients(detail::FSDPUnit& unit) {
    at::NoGradGuard no_grad;
    bool any = false;
    for (const auto& fp : unit.params) any = any || fp.param.grad().defined();
    if (!any) return;
    if (sharded()) {
      // NOTE: without this bound every unit's unsharded gradients would stay alive until backward ends:
      // the whole model's gradients at the peak, as under DDP, which is what sharding them is for.
      while (in_flight() >= max_reductions_in_flight) complete_oldest();
    }
    PendingReduction r;
    r.unit = &unit;
    r.full = at::zeros({unit.flat.numel()}, unit.flat.options().dtype(unit.reduce_dtype));
    for (auto& fp : unit.params) {
      if (!fp.param.grad().defined()) continue;
      r.full.narrow(0, fp.offset, fp.numel).copy_(fp.param.grad().reshape({-1}));
      if (sharded()) fp.param.mutable_grad() = at::Tensor();
    }
    collective("backward", [&] {
      if (!sharded() || backend() == "gloo") {
        // NOTE: Gloo of LibTorch 1.13 has no reduce_scatter: all-reduce, then keep this process's shard.
        std::vector<at::Tensor> tensors{r.full};
        r.work = shard_pg()->allreduce(tensors, sum_options());
      } else {
        r.reduced = at::empty({unit.shard_size}, r.full.options());
        c10d::ReduceScatterOptions rs;
        rs.reduceOp = c10d::ReduceOp::SUM;
        rs.timeout = parallel_options().timeout;
        r.work = shard_pg()->_reduce_scatter_base(r.reduced, r.full, rs);
      }
    });
    pending_.push_back(std::move(r));
    ++reduction_stats_.issued;
    if (sharded()) reduction_stats_.max_in_flight = std::max(reduction_stats_.max_in_flight, in_flight());
  }
  /// How many of this backward's reductions still hold their unsharded gradients (sharded strategies).
  std::size_t in_flight() const noexcept {
    return static_cast<std::size_t>(
        std::count_if(pending_.begin(), pending_.end(), [](const PendingReduction& r) { return r.full.defined(); }));
  }
  /// Completes the oldest reduction that holds its unsharded gradients: waits for it, keeps this process's
  /// shard of the sum, frees the rest (finish_reductions averages the shard later, with the others).
  void complete_oldest() {
    for (auto& r : pending_) {
      if (!r.full.defined()) continue;
      complete(r);
      return;
    }
  }
  void complete(PendingReduction& r) {
    if (r.work) wait(r.work, "backward");
    r.work.reset();
    if (!r.reduced.defined()) {
      r.reduced = r.full.narrow(0, shard_rank_ * r.unit->shard_size, r.unit->shard_size).clone();
    }
    r.full = at::Tensor();
  }
  /// Waits for the reductions issued in this backward (in the order they were issued, the same on every
  /// process), all-reduces the shards across the nodes (HYBRID_SHARD), and averages them into the shards'
  /// gradients (adding to what they hold: gradients accumulate until zero_grad, as on one device) or, under
  /// NO_SHARD, into the parameters' gradients.
  void finish_reductions() {
    std::vector<PendingReduction> pending = std::move(pending_);
    pending_.clear();
    if (pending.empty()) return;
    at::NoGradGuard no_grad;
    for (auto& r : pending) {
      if (r.work) wait(r.work, "backward");
      r.work.reset();
    }
    if (sharded()) {
      for (auto& r : pending) {
        if (r.full.defined()) complete(r);
      }
    }
    if (hybrid()) {
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      collective("backward", [&] {
        for (auto& r : pending) {
          std::vector<at::Tensor> tensors{r.reduced};
          works.push_back(replica_pg_->allreduce(tensors, sum_options()));
        }
      });
      for (const auto& w : works) wait(w, "backward");
    }
    const double world = static_cast<double>(world_size());
    for (auto& r : pending) {
      auto& unit = *r.unit;
      // NOTE: reduced in reduce_dtype, averaged in the parameters' dtype.
      const auto dtype = unit.flat.scalar_type();
      if (r.full.defined() && r.full.scalar_type() != dtype) r.full = r.full.to(dtype);
      if (r.reduced.defined() && r.reduced.scalar_type() != dtype) r.reduced = r.reduced.to(dtype);
      if (!sharded()) {
        r.full.div_(world);
        for (auto& fp : unit.params) {
          at::Tensor g = fp.param.mutable_grad();
          if (g.defined()) {
            g.copy_(r.full.narrow(0, fp.offset, fp.numel).view(g.sizes()));
          } else {
            fp.param.mutable_grad() = r.full.narrow(0, fp.offset, fp.numel).view(fp.param.sizes()).clone();
          }
        }
        continue;
      }
      r.reduced.div_(world);
      for (auto& fp : unit.params) {
        at::Tensor part = r.reduced.narrow(0, fp.in_shard, fp.piece.numel());
        if (fp.piece.grad().defined()) {
          fp.piece.mutable_grad().add_(part);
        } else {
          fp.piece.mutable_grad() = part;
        }
      }
    }
  }

  /// Runs a unit's hooks: gathers before its forward (and its recomputation), frees after it, and, when a
  /// backward will follow, gathers again as the gradient of its output arrives (FULL_SHARD).
  class UnitHook final : public detail::UnitHook {
   public:
    UnitHook(FSDP& fsdp, std::weak_ptr<detail::FSDPUnit> unit) : fsdp_(&fsdp), unit_(std::move(unit)) {}
    void pre_forward(torch::nn::Module& /*module*/) override {
      if (auto unit = unit_.lock(); unit && !unit->released) fsdp_->unit_pre_forward(*unit);
    }
    void post_forward(torch::nn::Module& /*module*/, std::vector<at::Tensor>& outputs) override {
      auto unit = unit_.lock();
      if (!unit || unit->released || !fsdp_->full_shard()) return;
      fsdp_->free_parameters(*unit);
      if (!c10::GradMode::is_enabled()) return;
      for (auto& t : outputs) {
        if (!t.requires_grad()) continue;
        FSDP* fsdp = fsdp_;
        std::weak_ptr<detail::FSDPUnit> weak = unit_;
        t.register_hook([fsdp, weak](const at::Tensor& grad) {
          if (auto u = weak.lock(); u && !u->released) fsdp->unit_pre_backward(*u);
          return grad;
        });
      }
    }

   private:
    FSDP* fsdp_;
    std::weak_ptr<detail::FSDPUnit> unit_;
  };
  /// Runs after a parameter's gradient is accumulated: the unit's last one reduces the unit's gradients
  /// (and frees its parameters) while backward goes on with the units before it.
  class GradReadyHook final : public torch::autograd::FunctionPostHook {
   public:
    GradReadyHook(FSDP& fsdp, std::weak_ptr<detail::FSDPUnit> unit) : fsdp_(&fsdp), unit_(std::move(unit)) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list& /*inputs*/) override {
      auto unit = unit_.lock();
      if (unit && !unit->released && !unit->done && ++unit->ready == unit->params.size()) {
        fsdp_->finish_unit_backward(*unit, /*in_autograd=*/true);
      }
      return outputs;
    }

   private:
    FSDP* fsdp_;
    std::weak_ptr<detail::FSDPUnit> unit_;
  };

  /// Hooks the unit's parameters' gradient accumulators and, for a unit module, its forward.
  void install_hooks(const std::shared_ptr<detail::FSDPUnit>& unit) {
    for (auto& fp : unit->params) {
      auto acc = torch::autograd::impl::grad_accumulator(fp.param);
      acc->add_post_hook(std::make_unique<GradReadyHook>(*this, unit));
      unit->accumulators.push_back(std::move(acc));
    }
    if (unit->module) {
      unit->hook = std::make_shared<UnitHook>(*this, unit);
      detail::add_unit_hook(*unit->module, unit->hook);
    }
  }

  /// The unit `step` places after `unit` in the order of the last forward (-1: the one whose backward comes
  /// next), or null.
  static detail::FSDPUnit* neighbour(const detail::FSDPModule& module, const detail::FSDPUnit& unit, int step) {
    const auto it = std::find(module.order.begin(), module.order.end(), &unit);
    if (it == module.order.end()) return nullptr;
    const auto index = static_cast<std::ptrdiff_t>(it - module.order.begin()) + step;
    if (index < 0 || index >= static_cast<std::ptrdiff_t>(module.order.size())) return nullptr;
    return module.order[static_cast<std::size_t>(index)];
  }
  /// The units (the root unit aside) of a module whose flat buffers hold their bytes now.
  static std::size_t count_gathered(const detail::FSDPModule& module) {
    std::size_t n = 0;
    for (const auto& unit : module.units) {
      if (unit->module && unit->flat.storage().nbytes() > 0) ++n;
    }
    return n;
  }
  /// A unit's forward starts: records the order (in the module's forward, not in a recomputation), gathers
  /// the unit and, with forward_prefetch, issues the all-gather of the unit that followed it last time.
  void unit_pre_forward(detail::FSDPUnit& unit) {
    detail::FSDPModule* module = unit.owner;
    const bool outer = module != nullptr && module->forwarding;
    if (outer && std::find(module->recording.begin(), module->recording.end(), &unit) == module->recording.end()) {
      module->recording.push_back(&unit);
    }
    if (!full_shard()) return;
    gather_unit(unit, "forward", outer && options_.forward_prefetch ? neighbour(*module, unit, +1) : nullptr);
  }
  /// The gradient of a unit's output arrived: gathers the unit for its backward and, with BACKWARD_PRE,
  /// issues the all-gather of the unit whose backward comes next.
  void unit_pre_backward(detail::FSDPUnit& unit) {
    const bool pre = options_.backward_prefetch == BackwardPrefetch::BACKWARD_PRE && unit.owner != nullptr;
    gather_unit(unit, "backward", pre ? neighbour(*unit.owner, unit, -1) : nullptr);
  }
  /// Ends a unit's backward: issues the reduction of its gradients (unless no_backward_sync), frees its
  /// parameters (FULL_SHARD) and, with BACKWARD_POST, prefetches the unit whose backward comes next.
  void finish_unit_backward(detail::FSDPUnit& unit, bool in_autograd) {
    unit.done = true;
    if (unit.owner == nullptr || unit.owner->sync) reduce_gradients(unit);
    if (!full_shard()) return;
    free_parameters(unit);
    if (in_autograd && options_.backward_prefetch == BackwardPrefetch::BACKWARD_POST && unit.owner != nullptr) {
      if (auto* next = neighbour(*unit.owner, unit, -1)) prefetch(*next, "backward");
    }
  }
  /// Gives the unit's flat buffer its bytes back and issues the all-gather of the shards into it, without
  /// waiting (nothing when the buffer holds them or they are on their way).
  void issue_gather(detail::FSDPUnit& unit, std::string_view what) {
    if (unit.gathered && !(unit.rounded && !rounds(what))) return;
    wait_gather(unit, what);
    if (!unit.gathered) {
      detail::resize_storage(unit.flat, static_cast<std::size_t>(unit.flat.numel()) * unit.flat.element_size());
    }
    unit.gathered = true;
    unit.gathering = start_all_gather(unit, what);
    // NOTE: training's gathers only (summon_full_params, load_raw and teardown gather every unit on purpose).
    if (unit.owner != nullptr && (what == "forward" || what == "backward")) {
      stats_.max_gathered = std::max(stats_.max_gathered, count_gathered(*unit.owner));
    }
  }
  /// Waits for the unit's all-gather in flight, if any.
  void wait_gather(detail::FSDPUnit& unit, std::string_view what) {
    if (!unit.gathering) return;
    const auto work = std::move(unit.gathering);
    unit.gathering.reset();
    wait(work, what);
    finish_gather(unit);
  }
  /// Says whether the unit's shard has storage of its own (FULL_SHARD, or gathered rounded) rather than being
  /// this process's part of the flat buffer.
  static bool owns_shard(const detail::FSDPUnit& unit) noexcept {
    return unit.shard.defined() &&
           unit.shard.storage().unsafeGetStorageImpl() != unit.flat.storage().unsafeGetStorageImpl();
  }
  /// Says whether the unit's whole parameters hold its shards rounded to gather_dtype between steps
  /// (SHARD_GRAD_OP with a narrower param_dtype), so that what gathers them exactly gathers them rounded again.
  bool keeps_rounded(const detail::FSDPUnit& unit) const noexcept {
    return sharded() && !full_shard() && unit.gather_dtype != unit.flat.scalar_type();
  }
  /// Copies a rounded all-gather that arrived into the flat buffer (the parameters' dtype).
  static void finish_gather(detail::FSDPUnit& unit) {
    if (!unit.gather_out.defined()) return;
    at::NoGradGuard no_grad;
    unit.flat.copy_(unit.gather_out);
    unit.gather_out = at::Tensor();
    unit.gather_in = at::Tensor();
  }
  /// Says whether a gather is training's, which sends the shards in param_dtype: forward's, backward's, the
  /// one after a step, a load or setup; summon_full_params, load_raw and teardown gather them exactly.
  static bool rounds(std::string_view what) noexcept {
    return what == "forward" || what == "backward" || what == "optimizer step" || what == "load" || what == "setup";
  }
  /// The dtype of a unit's collectives: the option, else on NCCL the precision's compute dtype, where
  /// narrower than the parameters' floating dtype (float32 parameters under bf16-mixed: bfloat16); else the
  /// parameters'. Gloo's default is the parameters' dtype (Gloo of LibTorch 1.13 has no bfloat16).
  c10::ScalarType communication_dtype(std::optional<c10::ScalarType> option, c10::ScalarType param) const {
    if (!c10::isFloatingType(param)) return param;
    const c10::ScalarType wanted = option ? *option : backend() == "nccl" ? precision_dtype_ : param;
    if (wanted == c10::ScalarType::Undefined || !c10::isFloatingType(wanted)) return param;
    if (c10::elementSize(wanted) >= c10::elementSize(param)) return param;
    if (detail::torch_gloo_refuses_bfloat16 && wanted == c10::ScalarType::BFloat16 && backend() == "gloo") {
      detail::raise(
          "FSDP: expected a dtype Gloo can send for param_dtype/reduce_dtype, found BFloat16 (Gloo of LibTorch "
          "{}.{} has no bfloat16); use torch::kHalf, leave them empty (the parameters' dtype on Gloo), or train on "
          "CUDA with NCCL",
          TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
    }
    return wanted;
  }
  /// Makes the unit's parameters whole (idempotent): waits for its prefetched all-gather, or gathers it now;
  /// `next` is prefetched between issuing this unit's all-gather and waiting for it.
  void gather_unit(detail::FSDPUnit& unit, std::string_view what, detail::FSDPUnit* next = nullptr) {
    if (unit.prefetched) {
      unit.prefetched = false;
      ++stats_.used;
    }
    issue_gather(unit, what);
    if (next != nullptr && next != &unit) prefetch(*next, what);
    wait_gather(unit, what);
  }
  /// Issues a unit's all-gather ahead of its use, unless it is gathered already, its backward is over, or
  /// (limit_all_gathers) two units hold their parameters already.
  void prefetch(detail::FSDPUnit& unit, std::string_view what) {
    if (unit.gathered || unit.done || unit.released || unit.owner == nullptr) return;
    if (options_.limit_all_gathers && count_gathered(*unit.owner) >= 2) {
      ++stats_.skipped_by_limit;
      return;
    }
    issue_gather(unit, what);
    unit.prefetched = true;
    ++stats_.issued;
  }
  /// Frees the units gathered ahead that were not used (a forward that skipped them or changed the order).
  void release_prefetched(detail::FSDPModule& module) {
    for (const auto& unit : module.units) {
      if (unit->prefetched) free_parameters(*unit);
    }
  }
  /// Takes the bytes of the unit's flat buffer (FULL_SHARD at rest: the parameters keep their shapes, but
  /// hold no data until gathered); an all-gather in flight into it is waited for first.
  void free_parameters(detail::FSDPUnit& unit) {
    if (!full_shard() || !unit.gathered) return;
    wait_gather(unit, "forward");
    detail::resize_storage(unit.flat, 0);
    unit.gathered = false;
    unit.prefetched = false;
  }

  /// Issues the all-gather of the unit's shards into every process's flat buffer (of the shard group).
  /// Issues the all-gather of the unit's shards into every process's flat buffer (of the shard group); for
  /// training (`rounds`), in the unit's gather_dtype, into gather_out, which finish_gather copies over.
  c10::intrusive_ptr<c10d::Work> start_all_gather(detail::FSDPUnit& unit, std::string_view what) {
    at::NoGradGuard no_grad;
    c10::intrusive_ptr<c10d::Work> work;
    const bool rounded = rounds(what) && unit.gather_dtype != unit.flat.scalar_type();
    at::Tensor out = unit.flat;
    at::Tensor in = unit.shard;
    if (rounded) {
      unit.gather_in = in = unit.shard.to(unit.gather_dtype);
      unit.gather_out = out = at::empty({unit.flat.numel()}, unit.flat.options().dtype(unit.gather_dtype));
    }
    unit.rounded = rounded;
    collective(what, [&] {
      c10d::AllgatherOptions opts;
      opts.timeout = parallel_options().timeout;
      if (backend() == "gloo") {
        // NOTE: Gloo of LibTorch 1.13 has no _allgather_base: one output view of the flat buffer per process.
        std::vector<std::vector<at::Tensor>> outputs(1);
        for (int r = 0; r < shard_world_; ++r)
          outputs[0].push_back(out.narrow(0, r * unit.shard_size, unit.shard_size));
        std::vector<at::Tensor> inputs{in};
        work = shard_pg()->allgather(outputs, inputs, opts);
      } else {
        work = shard_pg()->_allgather_base(out, in, opts);
      }
    });
    return work;
  }
  /// All-gathers the unit's updated shards into every process's flat buffer (and so its parameters).
  void gather_parameters(detail::FSDPUnit& unit, std::string_view what = "optimizer step") {
    wait(start_all_gather(unit, what), what);
    finish_gather(unit);
  }

  /// The entries of a state that FSDP saves and loads itself: its set-up modules and their optimizers.
  struct Entries {
    std::map<std::string, std::shared_ptr<detail::FSDPModule>> modules;
    std::map<std::string, torch::optim::Optimizer*> optimizers;
  };
  std::shared_ptr<detail::FSDPModule> module_of(const torch::nn::Module* m) const {
    for (const auto& module : modules_) {
      if (module->module == m) return module;
    }
    return nullptr;
  }
  Entries find_entries(const State& state) const {
    Entries found;
    for (const auto& [key, entry] : state) {
      if (entry.kind() == StateEntry::Kind::module) {
        if (auto module = module_of(entry.module().get())) found.modules.emplace(key, std::move(module));
      } else if (entry.kind() == StateEntry::Kind::optimizer) {
        for (const auto& p : detail::optimizer_params(*entry.optimizer())) {
          if (param_of(p) != nullptr) {
            found.optimizers.emplace(key, entry.optimizer());
            break;
          }
        }
      }
    }
    return found;
  }
  /// The set-up parameter an optimizer's tensor stands for (its piece, or itself under NO_SHARD).
  const detail::FSDPParam* param_of(const at::Tensor& t) const {
    if (const auto it = pieces_.find(t.unsafeGetTensorImpl()); it != pieces_.end() && !it->second.unit.expired()) {
      return it->second.param;
    }
    if (const auto it = by_param_.find(t.unsafeGetTensorImpl()); it != by_param_.end() && !it->second.unit.expired()) {
      return it->second.param;
    }
    return nullptr;
  }
  /// The range of a parameter's elements this process writes and reads: its piece (sharded), or all of it
  /// (NO_SHARD: rank 0 writes them, every process reads them).
  std::pair<std::int64_t, std::int64_t> range_of(const detail::FSDPParam& fp, bool reading) const {
    if (sharded())
      return fp.piece.numel() == 0 ? std::pair<std::int64_t, std::int64_t>{0, 0}
                                   : std::pair<std::int64_t, std::int64_t>{fp.begin, fp.piece.numel()};
    return {0, reading || global_rank() == 0 ? fp.numel : 0};
  }
  static TensorShard shard_of(std::string key, const at::Tensor& like_param, at::ScalarType dtype, std::int64_t begin,
                              at::Tensor local) {
    return TensorShard{std::move(key), like_param.sizes().vec(), dtype, begin, std::move(local)};
  }

  /// Writes the sharded checkpoint directory (a collective: every process calls it).
  void save_sharded(const std::filesystem::path& dir, const State& state, const Filters& filters,
                    const Entries& found) {
    std::vector<TensorShard> shards;
    Checkpoint meta(c10::StringType::get(), c10::AnyType::get());
    std::exception_ptr failure;
    try {
      State rest;
      for (const auto& [key, entry] : state) {
        if (!found.modules.contains(key) && !found.optimizers.contains(key)) rest.emplace(key, entry);
      }
      meta = detail::to_checkpoint(rest, filters);
      auto kinds = meta.at(detail::marker_key).toGenericDict().at("kinds").toGenericDict();
      for (const auto& [key, module] : found.modules) {
        kinds.insert_or_assign(key, std::string("module"));
        std::unordered_set<std::string> names;
        for (const auto& unit : module->units) {
          for (const auto& fp : unit->params) {
            names.insert(fp.name);
            const auto [begin, n] = range_of(fp, false);
            if (n == 0) continue;
            at::Tensor local = sharded() ? fp.piece.detach() : fp.param.detach().reshape({-1});
            shards.push_back(
                shard_of(key + "/" + fp.name, fp.param, fp.param.scalar_type(), begin, local.contiguous()));
          }
        }
        if (global_rank() != 0) continue;
        for (const auto& [name, tensor] : detail::module_tensors(*module->module)) {
          if (names.contains(name) || !tensor.defined()) continue;
          shards.push_back(
              shard_of(key + "/" + name, tensor, tensor.scalar_type(), 0, tensor.detach().reshape({-1}).contiguous()));
        }
      }
      for (const auto& [key, optimizer] : found.optimizers) {
        kinds.insert_or_assign(key, std::string("optimizer"));
        c10::IValue python = detail::torch_pickle::optimizer_to_python(
            key, detail::optimizer_to_ivalue(key, *optimizer).toGenericDict());
        const auto params = detail::optimizer_params(*optimizer);
        auto state_dict = python.toGenericDict().at("state").toGenericDict();
        for (const auto& item : state_dict) {
          const std::int64_t index = item.key().toInt();
          const detail::FSDPParam* fp =
              index < static_cast<std::int64_t>(params.size()) ? param_of(params[index]) : nullptr;
          auto fields = item.value().toGenericDict();
          for (const auto& field : fields) {
            if (!field.value().isTensor() || field.value().toTensor().dim() == 0 || fp == nullptr) continue;
            const at::Tensor v = field.value().toTensor();
            const auto [begin, n] = range_of(*fp, false);
            if (n > 0) {
              shards.push_back(shard_of(fmt::format("{}/state/{}/{}", key, index, field.key().toStringRef()), fp->param,
                                        v.scalar_type(), begin, v.detach().reshape({-1}).contiguous()));
            }
            fields.insert_or_assign(field.key(), c10::IValue());
          }
        }
        meta.insert_or_assign(key, python);
      }
    } catch (...) {
      failure = std::current_exception();
    }
    if (!reduce_boolean_decision(failure == nullptr, true)) {
      if (failure) std::rethrow_exception(failure);
      detail::raise("save: another rank failed to prepare its shards (its error says why); nothing was written");
    }
    on_rank_zero_agreed("save", [&] { detail::prepare_sharded_save(dir); });
    on_all_ranks_agreed("save", [&] {
      // NOTE: one copy of the shards: the first node's processes write them (all processes unless HYBRID_SHARD).
      if (global_rank() < shard_world_) detail::write_shards(dir, shard_rank_, shard_world_, shards);
      if (global_rank() == 0) detail::write_sharded_meta(dir, shard_world_, meta);
      return true;
    });
    on_rank_zero_agreed("save", [&] { detail::commit_sharded_save(dir); });
  }

  /// Looks up a '/'-path in a full checkpoint's nested dictionaries (integer keys where the dictionary has them).
  static std::optional<at::Tensor> lookup(const Checkpoint& root, const std::string& key) {
    c10::IValue node = root;
    std::size_t start = 0;
    while (true) {
      const std::size_t slash = key.find('/', start);
      const std::string part = key.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
      if (!node.isGenericDict()) return std::nullopt;
      const auto dict = node.toGenericDict();
      c10::IValue k;
      if (dict.keyType()->kind() == c10::TypeKind::IntType) {
        if (part.empty() || part.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
        k = static_cast<std::int64_t>(std::stoll(part));
      } else {
        k = part;
      }
      if (!dict.contains(k)) return std::nullopt;
      node = dict.at(k);
      if (slash == std::string::npos) break;
      start = slash + 1;
    }
    if (!node.isTensor()) return std::nullopt;
    return node.toTensor();
  }

  /// Reads this process's ranges of the set-up modules and optimizers and restores the state (no
  /// collective: on_all_ranks_agreed runs it).
  State load_entries(const std::filesystem::path& path, State& state, bool strict, const Entries& found) {
    const bool directory = detail::is_sharded_checkpoint(path);
    Checkpoint root(c10::StringType::get(), c10::AnyType::get());
    if (directory) {
      root = detail::read_sharded_meta(path);
    } else {
      std::error_code ec;
      if (!std::filesystem::is_regular_file(path, ec)) {
        detail::raise(
            "load: the path {} does not point to a valid checkpoint: expected a sharded checkpoint "
            "directory or a full checkpoint file",
            path.string());
      }
      const auto value = detail::read_python_file(path);
      if (!value || !value->isGenericDict()) {
        detail::raise(
            "load: FSDP reads a sharded checkpoint directory or a full checkpoint in torch.save's format "
            "(\".ckpt\", \".pt\", \".pth\"), found {}; save it with FSDP or TorchCheckpointIO",
            path.string());
      }
      root = value->toGenericDict();
    }
    std::vector<TensorShard> wanted;
    auto fill = [&](std::vector<TensorShard>& shards) {
      if (directory) {
        const auto missing = detail::load_shards(path, shards, strict);
        std::erase_if(shards, [&](const TensorShard& s) {
          return std::find(missing.begin(), missing.end(), s.key) != missing.end();
        });
        return;
      }
      std::vector<std::string> missing;
      for (auto& s : shards) {
        const auto t = lookup(root, s.key);
        if (!t) {
          missing.push_back(s.key);
          continue;
        }
        if (t->sizes().vec() != s.shape || t->scalar_type() != s.dtype) {
          detail::raise("cannot load \"{}\" from {}: it is a {} tensor of shape {}, expected a {} tensor of shape {}",
                        s.key, path.string(), c10::toString(t->scalar_type()), detail::shape_str(t->sizes()),
                        c10::toString(s.dtype), detail::shape_str(s.shape));
        }
        at::NoGradGuard no_grad;
        s.local.copy_(t->reshape({-1}).narrow(0, s.begin, s.local.numel()));
      }
      if (strict && !missing.empty()) {
        detail::raise(
            "cannot load {}: the checkpoint has no \"{}\"; load with strict = false to leave them as they are",
            path.string(), fmt::join(missing, "\", \""));
      }
      std::erase_if(shards, [&](const TensorShard& s) {
        return std::find(missing.begin(), missing.end(), s.key) != missing.end();
      });
    };
    // The modules: read into new tensors first, copied in once everything is checked.
    std::vector<at::Tensor> targets;
    for (const auto& [key, module] : found.modules) {
      std::unordered_set<std::string> names;
      for (const auto& unit : module->units) {
        for (const auto& fp : unit->params) {
          names.insert(fp.name);
          const auto [begin, n] = range_of(fp, true);
          at::Tensor into = sharded() ? fp.piece.detach() : fp.param.detach().view({-1});
          targets.push_back(into);
          wanted.push_back(shard_of(key + "/" + fp.name, fp.param, fp.param.scalar_type(), begin,
                                    at::empty({n}, fp.param.options().requires_grad(false))));
        }
      }
      for (const auto& [name, tensor] : detail::module_tensors(*module->module)) {
        if (names.contains(name) || !tensor.defined()) continue;
        targets.push_back(tensor.detach());
        wanted.push_back(shard_of(key + "/" + name, tensor, tensor.scalar_type(), 0,
                                  at::empty({tensor.numel()}, tensor.options().requires_grad(false))));
      }
    }
    fill(wanted);
    for (const auto& [key, module] : found.modules) {
      if (root.contains(key)) (void)root.erase(key);
    }
    // The optimizers: PyTorch's layout with this process's ranges, as LibTorch's archive.
    for (const auto& [key, optimizer] : found.optimizers) {
      if (!root.contains(key)) continue;  // load_state reports it (strict) or leaves it
      const c10::IValue stored = root.at(key);
      if (!detail::torch_pickle::is_python_optimizer(stored)) {
        detail::raise("load: \"{}\" is not an optimizer's state in PyTorch's layout in {}", key, path.string());
      }
      const auto params = detail::optimizer_params(*optimizer);
      c10::impl::GenericDict local_state(c10::IntType::get(), c10::AnyType::get());
      std::vector<TensorShard> parts;
      for (const auto& item : stored.toGenericDict().at("state").toGenericDict()) {
        const std::int64_t index = item.key().toInt();
        if (index < 0 || index >= static_cast<std::int64_t>(params.size())) {
          detail::raise("load: \"{}\": the checkpoint has state for parameter {}, but the optimizer holds {}", key,
                        index, params.size());
        }
        const detail::FSDPParam* fp = param_of(params[index]);
        c10::impl::GenericDict fields(c10::StringType::get(), c10::AnyType::get());
        for (const auto& field : item.value().toGenericDict()) {
          const c10::IValue& v = field.value();
          const bool sharded_field = v.isNone() || (v.isTensor() && v.toTensor().dim() > 0);
          if (!sharded_field || fp == nullptr) {
            fields.insert(field.key(), v);
            continue;
          }
          const auto [begin, n] = range_of(*fp, true);
          const at::ScalarType dtype = v.isTensor() ? v.toTensor().scalar_type() : fp->param.scalar_type();
          parts.push_back(shard_of(fmt::format("{}/state/{}/{}", key, index, field.key().toStringRef()), fp->param,
                                   dtype, begin,
                                   at::empty({n}, fp->param.options().dtype(dtype).requires_grad(false))));
          fields.insert(field.key(), c10::IValue());
        }
        local_state.insert(index, fields);
      }
      fill(parts);
      // NOTE: fill dropped the missing ones (not strict): match the rest by key.
      std::map<std::string, at::Tensor> by_key;
      for (auto& part : parts) by_key.emplace(part.key, part.local);
      for (const auto& item : local_state) {
        const std::int64_t index = item.key().toInt();
        const detail::FSDPParam* fp = param_of(params[index]);
        auto fields = item.value().toGenericDict();
        for (const auto& field : fields) {
          if (!field.value().isNone()) continue;
          const auto t = by_key.find(fmt::format("{}/state/{}/{}", key, index, field.key().toStringRef()));
          if (t == by_key.end()) continue;
          fields.insert_or_assign(field.key(), sharded() ? t->second : t->second.view(fp->param.sizes()));
        }
      }
      c10::impl::GenericDict python(c10::StringType::get(), c10::AnyType::get());
      python.insert("state", local_state);
      python.insert("param_groups", stored.toGenericDict().at("param_groups"));
      root.insert_or_assign(key, detail::torch_pickle::optimizer_from_python(key, python));
    }
    State rest;
    for (const auto& [key, entry] : state) {
      if (!found.modules.contains(key)) rest.emplace(key, entry);
    }
    State unexpected = detail::load_state(root, path, rest, strict);
    at::NoGradGuard no_grad;
    std::map<std::string, const TensorShard*> loaded;
    for (const auto& s : wanted) loaded.emplace(s.key, &s);
    std::size_t i = 0;
    for (const auto& [key, module] : found.modules) {
      auto copy = [&](const std::string& name, at::Tensor into) {
        const auto it = loaded.find(key + "/" + name);
        if (it != loaded.end()) into.view({-1}).copy_(it->second->local);
      };
      for (const auto& unit : module->units) {
        for (const auto& fp : unit->params) copy(fp.name, targets[i++]);
      }
      std::unordered_set<std::string> names;
      for (const auto& unit : module->units) {
        for (const auto& fp : unit->params) names.insert(fp.name);
      }
      for (const auto& [name, tensor] : detail::module_tensors(*module->module)) {
        if (names.contains(name) || !tensor.defined()) continue;
        copy(name, targets[i++]);
      }
    }
    return unexpected;
  }

  Options options_{};
  /// The set-up modules (reduced in backward; held until teardown, which gathers them).
  std::vector<std::shared_ptr<detail::FSDPModule>> modules_{};
  /// The reductions this backward issued and has not waited for.
  std::vector<PendingReduction> pending_{};
  PrefetchStats stats_{};
  ReductionStats reduction_stats_{};
  int nodes_ = 1;
  /// The group a unit is sharded over and this process's place in it (the world unless HYBRID_SHARD), and
  /// the group its shards are replicated over (HYBRID_SHARD on several nodes).
  ProcessGroup shard_group_{};
  ProcessGroup replica_group_{};
  c10::intrusive_ptr<c10d::ProcessGroup> shard_pg_{};
  c10::intrusive_ptr<c10d::ProcessGroup> replica_pg_{};
  int shard_rank_ = 0;
  int shard_world_ = 1;
  /// The precision's compute dtype (setup_precision), the default of param_dtype and reduce_dtype.
  c10::ScalarType precision_dtype_ = c10::ScalarType::Undefined;
  /// The set-up parameters, and the pieces the optimizers step, by their TensorImpl.
  std::unordered_map<const void*, Slot> by_param_{};
  std::unordered_map<const void*, Slot> pieces_{};
};

}  // namespace fabric
