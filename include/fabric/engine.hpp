#pragma once
// fabric::Fabric: the class a training loop talks to. It holds the policies, checks what it is given and
// hands every step to the strategy, which hands precision work to the precision and file work to its
// CheckpointIO.

#include "fabric/accelerators/accelerator.hpp"
#include "fabric/accelerators/auto.hpp"
#include "fabric/core/concepts.hpp"
#include "fabric/core/config.hpp"
#include "fabric/core/error.hpp"
#include "fabric/core/hooks.hpp"
#include "fabric/core/options.hpp"
#include "fabric/core/type_list.hpp"
#include "fabric/detail/setup.hpp"
#include "fabric/fwd.hpp"
#include "fabric/io/state.hpp"
#include "fabric/loggers/logger.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/precision/fp32.hpp"
#include "fabric/precision/precision.hpp"
#include "fabric/strategies/group.hpp"
#include "fabric/strategies/single_device.hpp"
#include "fabric/strategies/strategy.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/utils/seed.hpp"
#include "fabric/wrappers/data_loader.hpp"
#include "fabric/wrappers/module.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// Checks Fabric's parameters slot by slot: one message for a policy in the wrong slot or lacking a
/// member, then the combination checks of the strategy and the precision.
template <class A, class S, class P, class... Cbs>
consteval bool check_policies() {
  if constexpr (!PolicyOf<A, accelerator_tag>) {
    static_assert(dependent_false_v<A>,
                  "fabric: the first argument of Fabric must be an accelerator policy; write "
                  "Fabric<Accelerator, Strategy, Precision, Callbacks...>, e.g. Fabric<fabric::CPU, "
                  "fabric::SingleDevice, fabric::FP32>");
  } else if constexpr (!PolicyOf<S, strategy_tag>) {
    static_assert(dependent_false_v<S>,
                  "fabric: the second argument of Fabric must be a strategy policy; write "
                  "Fabric<Accelerator, Strategy, Precision, Callbacks...>, e.g. Fabric<fabric::CPU, "
                  "fabric::SingleDevice, fabric::FP32>");
  } else if constexpr (!PolicyOf<P, precision_tag>) {
    static_assert(dependent_false_v<P>,
                  "fabric: the third argument of Fabric must be a precision policy; write "
                  "Fabric<Accelerator, Strategy, Precision, Callbacks...>, e.g. Fabric<fabric::CPU, "
                  "fabric::SingleDevice, fabric::FP32>");
  } else if constexpr (!is_unique_v<TypeList<Cbs...>>) {
    static_assert(dependent_false_v<A>,
                  "fabric: a callback type appears twice in Fabric's callback list; list each callback type once");
  } else if constexpr (check_accelerator<A>() && check_strategy<S>() && check_precision<P>()) {
    S::template check<A, P>();
    P::template check<A>();
    if constexpr (checks_strategy<P, S>) P::template check_strategy<S>();
  }
  // NOTE: every failed check above has fired its own static_assert; returning true keeps it the only error.
  return true;
}

/// Waits, for the ranks that do not go first, until rank zero has left the guarded block.
template <class F>
class RankZeroFirstGuard {
 public:
  RankZeroFirstGuard(F& fabric, bool first) : fabric_(fabric), first_(first) {
    if (!first_) fabric_.barrier("rank_zero_first");
  }
  ~RankZeroFirstGuard() noexcept(false) {
    if (first_) fabric_.barrier("rank_zero_first");
  }
  RankZeroFirstGuard(const RankZeroFirstGuard&) = delete;
  RankZeroFirstGuard& operator=(const RankZeroFirstGuard&) = delete;

 private:
  F& fabric_;
  bool first_;
};

/// Returns the data of a collective as it travels: a number becomes a scalar tensor on the device.
template <class T>
decltype(auto) as_collective_data(T&& data, const c10::Device& device) {
  if constexpr (std::is_arithmetic_v<std::remove_cvref_t<T>>) {
    return at::scalar_tensor(static_cast<double>(data), at::TensorOptions().device(device));
  } else {
    return std::remove_cvref_t<T>(std::forward<T>(data));
  }
}

/// Returns one value as it is, several as a tuple (what setup_optimizers and setup_dataloaders return).
template <class... Ts>
auto one_or_tuple(Ts&&... values) {
  if constexpr (sizeof...(Ts) == 1) {
    return (std::forward<Ts>(values), ...);
  } else {
    return std::tuple<std::remove_cvref_t<Ts>...>{std::forward<Ts>(values)...};
  }
}

/// Returns true when the arguments of a backward (gradient, retain_graph, create_graph) keep the graph
/// for another backward: retain_graph, which defaults to create_graph, as in at::Tensor::backward.
template <class... Args>
bool retains_graph(const Args&... args) {
  const auto values = std::forward_as_tuple(args...);
  bool retain = false;
  if constexpr (sizeof...(Args) >= 3) {
    if constexpr (std::is_convertible_v<std::tuple_element_t<2, std::tuple<Args...>>, bool>) {
      retain = static_cast<bool>(std::get<2>(values));
    }
  }
  if constexpr (sizeof...(Args) >= 2) {
    using R = std::tuple_element_t<1, std::tuple<Args...>>;
    if constexpr (std::is_convertible_v<R, c10::optional<bool>>) {
      const c10::optional<bool> r = std::get<1>(values);
      if (r.has_value()) retain = *r;
    } else if constexpr (std::is_convertible_v<R, bool>) {
      retain = static_cast<bool>(std::get<1>(values));
    }
  }
  return retain;
}

}  // namespace detail

/// The training engine: `Fabric<Accelerator, Strategy, Precision, Callbacks...>`.
///
/// Each policy is a type checked by a concept; a policy that lacks a member, or a wrong combination,
/// fails to compile with one message that says how to fix it. Runtime settings come in an aggregate
/// (fabric::Options). Every step goes to the strategy.
///
///     fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32> fabric;
///     auto [model, optimizer] = fabric.setup(net, adamw);
///     for (auto& batch : fabric.setup_dataloaders(loader)) {
///       auto loss = torch::nn::functional::cross_entropy(model(batch.data), batch.target);
///       fabric.backward(loss);
///       optimizer.step();
///       optimizer.zero_grad();
///     }
///     fabric.save("ckpt/last.ckpt", {{"model", model}, {"optimizer", optimizer}, {"epoch", epoch}});
template <Policy A = Auto, Policy S = SingleDevice, Policy P = FP32, Callback... Cbs>
class Fabric {
  static_assert(detail::check_policies<A, S, P, Cbs...>());

 public:
  using accelerator_type = A;
  using strategy_type = S;
  using precision_type = P;
  using callbacks_type = TypeList<Cbs...>;
  /// True when the precision or the strategy works in the module wrapper's forward
  /// (fabric::NeedsWrappedForward), so that backward rejects a loss no wrapped forward produced.
  static constexpr bool checks_bypassed_forward = NeedsWrappedForward<P> || NeedsWrappedForward<S>;
  /// True when the precision or the strategy must run the backward itself (fabric::NeedsFabricBackward),
  /// so that the wrapper's forward hooks its outputs and `loss.backward()` on them throws.
  static constexpr bool checks_fabric_backward = NeedsFabricBackward<P> || NeedsFabricBackward<S>;
  /// True when a step of the LibTorch optimizer behind a set-up optimizer would skip something: the
  /// precision's (fabric::NeedsFabricStep: FP16Mixed's gradient scaler) or the strategy's step, or the
  /// `on_after_optimizer_step` hook of a callback; backward then checks that none happened.
  static constexpr bool checks_optimizer_step =
      NeedsFabricStep<P> || NeedsFabricStep<S> ||
      (std::remove_cvref_t<decltype(hooks::on_after_optimizer_step)>::template declared_by<Cbs>() || ...);

  /// Creates a fabric from runtime options and callback objects.
  explicit Fabric(Options options = {}, Cbs... callbacks)
      : Fabric(std::move(options), A{}, S{}, P{}, std::move(callbacks)...) {}
  /// Creates a fabric from runtime options, configured strategy and precision objects, and callbacks.
  Fabric(Options options, S strategy, P precision, Cbs... callbacks)
      : Fabric(std::move(options), A{}, std::move(strategy), std::move(precision), std::move(callbacks)...) {}
  /// Creates a fabric from runtime options, configured accelerator, strategy and precision objects,
  /// and callbacks: the accelerator checks the devices, the strategy reads the topology, the
  /// accelerator picks this process's device, and strategy and precision bind to it.
  ///
  ///     fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16> fabric(
  ///         {}, fabric::CUDA{{.float32_matmul_precision = "high"}}, {}, {});
  Fabric(Options options, A accelerator, S strategy, P precision, Cbs... callbacks)
      : options_(std::move(options)),
        accelerator_(std::move(accelerator)),
        strategy_(std::move(strategy)),
        precision_(std::move(precision)),
        callbacks_(std::move(callbacks)...) {
    if (options_.num_nodes < 1) {
      detail::raise("expected num_nodes >= 1, found {}; pass the number of machines", options_.num_nodes);
    }
    resolve_devices();
    accelerator_.check(options_.devices);
    strategy_.setup_environment(options_);
    device_ = accelerator_.select_device(strategy_.local_rank(), options_.devices);
    strategy_.setup_device(device_);
    precision_.setup_device(device_);
    if constexpr (requires { strategy_.setup_precision(precision_); }) strategy_.setup_precision(precision_);
  }
  Fabric(const Fabric&) = delete;
  Fabric& operator=(const Fabric&) = delete;
  Fabric(Fabric&&) = delete;
  Fabric& operator=(Fabric&&) = delete;
  /// Tears the strategy down (closing process groups, ending started processes), then the accelerator.
  ~Fabric() {
    strategy_.teardown();
    accelerator_.teardown();
  }

  // ---- launch and topology ---------------------------------------------------------------------

  /// Starts the processes of the strategy (nothing to start for one device).
  ///
  /// With DDP the original process becomes local rank 0 and re-executes the program for the other
  /// local ranks (unless fabric-run, torchrun, mpirun or SLURM started them), then every process
  /// joins the process group. Call it once, before setup.
  void launch() {
    strategy_.launch(device_);
    launched_ = true;
  }
  /// Starts the processes and runs fn(fabric, args...) in each, returning its result (Lightning's
  /// `launch(function, *args)`). A function that does not take the Fabric first does not compile.
  ///
  ///     auto loss = fabric.launch([](auto& fabric, int epochs) { return train(fabric, epochs); }, 10);
  template <class Fn, class... Args>
  requires std::invocable<Fn, Fabric&, Args...>
  decltype(auto) launch(Fn&& fn, Args&&... args) {
    launch();
    return std::invoke(std::forward<Fn>(fn), *this, std::forward<Args>(args)...);
  }

  /// Returns the device of this process.
  const c10::Device& device() const noexcept { return device_; }
  /// Returns the rank of this process among all processes.
  int global_rank() const noexcept { return strategy_.global_rank(); }
  /// Returns the rank of this process on its machine.
  int local_rank() const noexcept { return strategy_.local_rank(); }
  /// Returns the index of this machine.
  int node_rank() const noexcept { return strategy_.node_rank(); }
  /// Returns the number of processes.
  int world_size() const noexcept { return strategy_.world_size(); }
  /// Returns true on global rank zero.
  bool is_global_zero() const noexcept { return global_rank() == 0; }
  /// Returns the runtime options.
  const Options& options() const noexcept { return options_; }
  /// Returns the accelerator object.
  A& accelerator() noexcept { return accelerator_; }
  /// Returns the strategy object.
  S& strategy() noexcept { return strategy_; }
  /// Returns the precision object.
  P& precision() noexcept { return precision_; }

  // ---- setup -----------------------------------------------------------------------------------

  /// Sets up a module and its optimizers: converts the module to the precision, moves it to the
  /// device (optimizers keep their references), lets the strategy prepare both, and returns the
  /// wrapped module, or a tuple of the module and one wrapper per optimizer.
  template <class M, class... Os>
  auto setup(M&& module, Os&&... optimizers) {
    return setup(SetupOptions{}, std::forward<M>(module), std::forward<Os>(optimizers)...);
  }
  /// setup with options, e.g. `setup({.move_to_device = false}, model, optimizer)`.
  template <class M, class... Os>
  auto setup(SetupOptions options, M&& module, Os&&... optimizers) {
    check_launched("setup");
    static_assert(detail::check_module_arg<M>());
    static_assert((detail::check_optimizer_arg<Os>() && ...));
    const torch::nn::Module& raw = detail::module_ref(module);
    check_not_set_up(&raw, "module");
    (check_not_set_up(&detail::optimizer_ref(optimizers), "optimizer"), ...);
    (detail::check_belongs(raw, detail::optimizer_ref(optimizers)), ...);
    (detail::check_not_meta(detail::optimizer_ref(optimizers), "setup"), ...);
    auto wrapped = setup_module_impl(options, std::forward<M>(module));
    if constexpr (sizeof...(Os) == 0) {
      call(hooks::on_after_setup, *this, wrapped);
      return wrapped;
    } else {
      auto result = std::tuple{std::move(wrapped), setup_optimizer_impl(std::forward<Os>(optimizers))...};
      call(hooks::on_after_setup, *this, std::get<0>(result));
      return result;
    }
  }
  /// Sets up a module alone (as setup without optimizers, without the on_after_setup hook).
  template <class M>
  auto setup_module(M&& module, SetupOptions options = {}) {
    check_launched("setup_module");
    static_assert(detail::check_module_arg<M>());
    check_not_set_up(&detail::module_ref(module), "module");
    return setup_module_impl(options, std::forward<M>(module));
  }
  /// Sets up optimizers alone; returns one wrapper, or a tuple of them.
  template <class... Os>
  requires(sizeof...(Os) > 0) auto setup_optimizers(Os&&... optimizers) {
    check_launched("setup_optimizers");
    static_assert((detail::check_optimizer_arg<Os>() && ...));
    (check_not_set_up(&detail::optimizer_ref(optimizers), "optimizer"), ...);
    (detail::check_not_meta(detail::optimizer_ref(optimizers), "setup_optimizers"), ...);
    return detail::one_or_tuple(setup_optimizer_impl(std::forward<Os>(optimizers))...);
  }

  /// Wraps LibTorch data loaders (std::unique_ptr from make_data_loader, a shared_ptr, or a loader
  /// object that outlives the wrapper) so that iterating yields batches on the device; returns one
  /// wrapper or a tuple of them.
  template <class... Ls>
  requires(sizeof...(Ls) > 0) auto setup_dataloaders(Ls&&... loaders) {
    return setup_dataloaders(DataOptions{}, std::forward<Ls>(loaders)...);
  }
  /// setup_dataloaders with options, e.g. `setup_dataloaders({.move_to_device = false}, loader)`.
  template <class... Ls>
  requires(sizeof...(Ls) > 0) auto setup_dataloaders(DataOptions options, Ls&&... loaders) {
    check_launched("setup_dataloaders");
    static_assert((detail::check_loader_arg<Ls>() && ...));
    (check_shards<typename detail::pointee<std::remove_cvref_t<Ls>>::type>(options), ...);
    return detail::one_or_tuple(DataLoader<typename detail::pointee<std::remove_cvref_t<Ls>>::type>(
        detail::share<typename detail::pointee<std::remove_cvref_t<Ls>>::type>(std::forward<Ls>(loaders)), device_,
        options.move_to_device)...);
  }
  /// Builds a set-up loader from a map-style dataset: batches of `options.batch_size`, shuffled per
  /// epoch from the global seed when `options.shuffle`, sharded across ranks by distributed strategies.
  ///
  ///     auto train = fabric.dataloader(dataset.map(torch::data::transforms::Stack<>()), {.batch_size = 64});
  template <class D>
  auto dataloader(D dataset, LoaderOptions options, DataOptions data_options = {}) {
    check_launched("dataloader");
    const bool shard = data_options.use_distributed_sampler && strategy_.shards_data();
    return setup_built(data_options, detail::make_loader(std::move(dataset), options,
                                                         shard ? static_cast<std::size_t>(world_size()) : 1,
                                                         shard ? static_cast<std::size_t>(global_rank()) : 0,
                                                         global_seed(), options.pin_memory && device_.is_cuda()));
  }
  /// Builds a set-up loader as torch::data::make_data_loader does, from the same arguments
  /// (`(dataset, options)`, `(dataset, batch_size)`, `make_data_loader<SequentialSampler>(...)`), so that
  /// porting a loader changes only `torch::data::` to `fabric.`. Batches come on the device; under a
  /// strategy that shards data the sampler is fabric's DistributedSampler over the ranks (shuffled per
  /// epoch from the global seed for LibTorch's default RandomSampler, in order for SequentialSampler);
  /// on one process it is LibTorch's own, so the batches are LibTorch's. The sampler is wrapped in a
  /// fabric::ResumableSampler, so the loader's position can be saved (state_dict).
  ///
  ///     auto train = fabric.make_data_loader(std::move(dataset), torch::data::DataLoaderOptions(64).workers(2));
  template <TorchSampler Sampler = torch::data::samplers::RandomSampler, TorchDataset D>
  auto make_data_loader(D dataset, torch::data::DataLoaderOptions options = torch::data::DataLoaderOptions(),
                        DataOptions data_options = {}) {
    check_launched("make_data_loader");
    if constexpr (D::is_stateful) {
      // NOTE: a stateful dataset has no sampler; it decides itself what each rank reads.
      return setup_dataloaders(data_options, torch::data::make_data_loader(std::move(dataset), std::move(options)));
    } else {
      const auto size = dataset.size();
      if (!size) detail::raise("make_data_loader needs a dataset with a known size, found size() = nullopt");
      if constexpr (S::is_distributed) {
        const bool shard = data_options.use_distributed_sampler && strategy_.shards_data();
        auto sampler = detail::distributed_sampler_for<Sampler>(
            *size, shard ? static_cast<std::size_t>(world_size()) : 1,
            shard ? static_cast<std::size_t>(global_rank()) : 0, global_seed());
        return setup_built(data_options, detail::build_loader(std::move(dataset), std::move(sampler),
                                                              std::move(options), std::nullopt, shard_rank()));
      } else {
        Sampler sampler(*size);
        const auto samples = detail::sampler_samples(sampler, *size);
        return setup_built(data_options, detail::build_loader(std::move(dataset), std::move(sampler),
                                                              std::move(options), samples, shard_rank()));
      }
    }
  }
  /// make_data_loader with a sampler of one's own, as torch::data::make_data_loader(dataset, sampler,
  /// options); under a strategy that shards data the sampler must shard by rank (see setup_dataloaders), or
  /// `{.use_distributed_sampler = false}` keeps it. LibTorch's and fabric's samplers are wrapped in a
  /// fabric::ResumableSampler (wrap a sampler of your own yourself: fabric cannot know that its save()
  /// captures a pass).
  template <TorchDataset D, TorchSampler Sampler>
  auto make_data_loader(D dataset, Sampler sampler, torch::data::DataLoaderOptions options,
                        DataOptions data_options = {}) {
    check_launched("make_data_loader");
    if constexpr (detail::is_known_sampler_v<Sampler> || detail::is_resumable_sampler_v<Sampler>) {
      const auto size = dataset.size();
      const auto samples = size ? detail::sampler_samples(sampler, *size) : std::nullopt;
      return setup_built(data_options, detail::build_loader(std::move(dataset), std::move(sampler), std::move(options),
                                                            samples, shard_rank()));
    } else {
      return setup_dataloaders(
          data_options, torch::data::make_data_loader(std::move(dataset), std::move(sampler), std::move(options)));
    }
  }

  // ---- the step --------------------------------------------------------------------------------

  /// Runs backward on the loss through the strategy and the precision (loss scaling); extra
  /// arguments go to at::Tensor::backward (gradient, retain_graph, create_graph).
  ///
  /// When the precision or the strategy works in the wrapper's forward (checks_bypassed_forward), a
  /// backward with no wrapped forward since the last one is an error: `model->forward(x)` would
  /// have skipped them. A backward that retains the graph keeps the count for the next one.
  /// Where a step of the LibTorch optimizer itself would skip something (checks_optimizer_step), a
  /// backward also fails when the parameters of a set-up optimizer changed since the previous backward
  /// while no step of a set-up optimizer ran (`optimizer->step()` instead of `optimizer.step()`).
  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    if (!loss.defined()) detail::raise("backward: expected a loss tensor, found an undefined tensor");
    if (!loss.requires_grad()) {
      detail::raise(
          "backward: expected a loss that requires grad, found one that does not; compute it from the output of "
          "the module returned by setup(), outside of a NoGradGuard");
    }
    if constexpr (checks_bypassed_forward) {
      if (modules_set_up_ && wrapped_forwards_ == 0) raise_bypassed_forward();
      if (!detail::retains_graph(args...)) wrapped_forwards_ = 0;
    }
    if constexpr (checks_optimizer_step) check_optimizer_steps();
    if constexpr (checks_fabric_backward) {
      detail::FabricBackwardScope in_fabric_backward;
      strategy_.backward(loss, precision_, std::forward<Args>(args)...);
    } else {
      strategy_.backward(loss, precision_, std::forward<Args>(args)...);
    }
  }
  /// Clips the gradients of the optimizer's parameters through the strategy, unscaling them first
  /// where the precision scales; returns the total norm before clipping for max_norm, nothing for
  /// clip_val.
  ///
  ///     fabric.clip_gradients(model, optimizer, {.max_norm = 1.0});
  template <class M, class O>
  std::optional<at::Tensor> clip_gradients(Module<M, Fabric>& module, Optimizer<O, Fabric>& optimizer,
                                           const ClipOptions& options) {
    if (options.max_norm.has_value() == options.clip_val.has_value()) {
      detail::raise("clip_gradients: expected exactly one of max_norm and clip_val, found {}",
                    options.max_norm ? "both" : "neither");
    }
    return strategy_.clip_gradients(*module, module.strategy_state(), *optimizer, precision_, options);
  }
  /// Returns the guard that runs code outside forward (e.g. the loss) in the precision's context.
  ///
  ///     { auto guard = fabric.autocast(); loss = criterion(model(x), y); }
  auto autocast() { return precision_.forward_context(); }
  /// Returns the guard under which new modules are created in the precision's dtype (float64 for
  /// FP64, bfloat16 for BF16True, ...). NOTE: LibTorch has no default device, so modules are created
  /// on the CPU and setup() moves them.
  /// A strategy with `module_init_context(precision)` (fabric::ProvidesModuleInitContext) returns the guard
  /// itself, as Lightning's `strategy.module_init_context()`.
  auto init_module() const {
    check_launched("init_module");
    if constexpr (ProvidesModuleInitContext<S, P>) {
      return strategy_.module_init_context(precision_);
    } else {
      return DefaultDtypeGuard(P::param_dtype());
    }
  }
  /// Returns the guard under which new tensors are created in the precision's dtype; a strategy with
  /// `tensor_init_context(precision)` (fabric::ProvidesTensorInitContext) returns it itself.
  auto init_tensor() const {
    if constexpr (ProvidesTensorInitContext<S, P>) {
      return strategy_.tensor_init_context(precision_);
    } else {
      return DefaultDtypeGuard(P::param_dtype());
    }
  }
  /// Returns the guard that skips the gradient synchronisation of the module while it lives (for
  /// gradient accumulation); nothing to skip on one device.
  template <class W>
  auto no_backward_sync(W& module, bool enabled = true) {
    static_assert(detail::is_fabric_module_v<W>,
                  "fabric: no_backward_sync needs the module returned by setup(); pass that wrapper, not the "
                  "original module");
    return strategy_.no_backward_sync(module.strategy_state(), enabled);
  }

  /// Moves a module to the fabric's device in place and returns it.
  template <ModuleLike M>
  M& to_device(M& module) {
    return fabric::to_device(module, device_);
  }
  /// Returns data (tensors, Example, nested standard containers) with every tensor on the device.
  template <class T>
  requires(!ModuleLike<T>) std::remove_cvref_t<T> to_device(T&& data) {
    return fabric::to_device(std::forward<T>(data), device_);
  }
  /// Seeds every generator; see fabric::seed_everything. Unlike the free function, `workers` defaults to
  /// true (`PL_SEED_WORKERS=1`), as Lightning's `Fabric.seed_everything`.
  static std::uint64_t seed_everything(std::optional<std::uint64_t> seed = std::nullopt, bool workers = true) {
    return fabric::seed_everything(seed, workers);
  }
  /// Prints an fmt-formatted line on local rank zero only (once per machine), and flushes stdout.
  template <class... Args>
  void print(fmt::format_string<Args...> format, Args&&... args) const {
    print(PrintOptions{}, format, std::forward<Args>(args)...);
  }
  /// Prints on local rank zero only, ending with `options.end` (Python's `print(..., end="")`), e.g. a
  /// progress line redrawn in place: `fabric.print({.end = "\r"}, "step {}", step)`.
  template <class... Args>
  void print(const PrintOptions& options, fmt::format_string<Args...> format, Args&&... args) const {
    if (local_rank() != 0) return;
    fmt::print(options.file, "{}{}", fmt::format(format, std::forward<Args>(args)...), options.end);
    if (options.flush) std::fflush(options.file);
  }

  // ---- captured step ---------------------------------------------------------------------------

  /// Returns the training step `fn(batch...) -> loss` (forward, loss, fabric.backward, optimizer step,
  /// zero_grad) as a callable that runs it eagerly for options.warmup_steps calls, then records it in
  /// one CUDA graph and replays it for every later batch of the same shapes (fabric::CapturedStep).
  /// Refuses with a fabric::Error what a graph cannot replay, or runs it eagerly with
  /// `{.fallback = true}`. Lightning has no counterpart (Python: `torch.compile(mode="reduce-overhead")`).
  /// CapturedStep is defined in `fabric/utils/capture.hpp` (part of `fabric/fabric.hpp`): the engine
  /// itself does not depend on the CUDA-graph headers.
  ///
  ///     auto step = fabric.capture([&](const at::Tensor& x, const at::Tensor& y) {
  ///       auto loss = F::cross_entropy(model(x), y);
  ///       fabric.backward(loss);
  ///       optimizer.step();
  ///       optimizer.zero_grad();
  ///       return loss;
  ///     });
  ///     for (auto& batch : loader) fabric.print("{}", step(batch.data, batch.target).item<float>());
  template <class Fn>
  CapturedStep<Fabric, std::decay_t<Fn>> capture(Fn&& fn, const CaptureOptions& options = {}) {
    return CapturedStep<Fabric, std::decay_t<Fn>>(*this, std::forward<Fn>(fn), options);
  }

  // ---- collectives -----------------------------------------------------------------------------

  /// Waits until every process (of the group, default: all) reaches it; the name, as Lightning's
  /// `barrier(name)`, shows in the error of a barrier that fails or times out.
  ///
  ///     fabric.barrier("data ready");
  void barrier(std::string_view name = {}, const ProcessGroup& group = {}) {
    detail::check_member(group, global_rank(), "barrier");
    strategy_.barrier(name, group);
  }
  /// Reduces every tensor in data across processes (mean by default) and returns the result; a
  /// number becomes a tensor on the device first, as in Lightning.
  template <class T>
  auto all_reduce(T&& data, ReduceOp op = ReduceOp::mean) {
    return all_reduce(std::forward<T>(data), ProcessGroup{}, op);
  }
  /// all_reduce over the processes of a group made by new_group (Lightning's `all_reduce(data, group,
  /// reduce_op)`); the mean divides by the group's size.
  template <class T>
  auto all_reduce(T&& data, const ProcessGroup& group, ReduceOp op = ReduceOp::mean) {
    detail::check_member(group, global_rank(), "all_reduce");
    auto fn = [&](at::Tensor t) { return strategy_.all_reduce(t, op, group); };
    return detail::map_tensors(detail::as_collective_data(std::forward<T>(data), device_), fn);
  }
  /// Gathers every tensor in data from all processes (of the group); with several processes each gains a
  /// leading dimension of their number, with one it is returned as it is (Lightning's shapes). With
  /// sync_grads the gradient flows back through the gather (Lightning's `sync_grads=True`): every
  /// process gets the gradient of its own tensor summed over the processes, and all of them must run
  /// the backward.
  ///
  ///     auto all = fabric.all_gather(embedding, {}, /*sync_grads=*/true);   // {} is every process
  template <class T>
  auto all_gather(T&& data, const ProcessGroup& group = {}, bool sync_grads = false) {
    detail::check_member(group, global_rank(), "all_gather");
    auto fn = [&](at::Tensor t) { return strategy_.all_gather(t, group, sync_grads); };
    return detail::map_tensors(detail::as_collective_data(std::forward<T>(data), device_), fn);
  }
  /// Returns the value of rank src (a global rank; of the group, when one is given) on every process.
  /// As Lightning's, src defaults to 0; a src that is not a rank of the job is an error on one device
  /// too (where Lightning returns the value), so that the code fails before it runs under DDP.
  template <class T>
  std::remove_cvref_t<T> broadcast(T&& value, int src = 0, const ProcessGroup& group = {}) {
    if (src < 0 || src >= world_size()) {
      detail::raise("broadcast: expected 0 <= src < world_size = {}, found {}", world_size(), src);
    }
    detail::check_member(group, global_rank(), "broadcast");
    if (!group.contains(src)) {
      detail::raise(
          "broadcast: expected src to be a member of the group of ranks [{}], found src = {}; pass one of them",
          fmt::join(group.ranks(), ", "), src);
    }
    return strategy_.broadcast(std::remove_cvref_t<T>(std::forward<T>(value)), src, group);
  }
  /// Creates a group of processes for the collectives (torch.distributed's `new_group(ranks)`): every
  /// process calls it, with the same global ranks and in the same order of new_group calls; the
  /// members connect, and a collective over the group runs on its members only (elsewhere it is an
  /// error). On one device the only group is {0}.
  ///
  ///     auto evens = fabric.new_group({0, 2});
  ///     if (evens.is_member()) fabric.all_reduce(metric, evens, fabric::ReduceOp::sum);
  ProcessGroup new_group(std::vector<int> ranks) { return strategy_.new_group(std::move(ranks)); }

  /// Lets rank zero (of the machine, with local) run the guarded block before the others, e.g. to
  /// download or preprocess data once.
  detail::RankZeroFirstGuard<Fabric> rank_zero_first(bool local = false) {
    return detail::RankZeroFirstGuard<Fabric>(*this, (local ? local_rank() : global_rank()) == 0);
  }

  // ---- callbacks and loggers -------------------------------------------------------------------

  /// Calls the hook on every callback that declares it, with the arguments; callbacks without it
  /// are skipped at compile time.
  ///
  ///     fabric.call(fabric::hooks::on_train_epoch_end, epoch, loss);
  template <Hook H, class... Args>
  void call(const H& /*hook*/, Args&&... args) {
    detail::dispatch<H>(callbacks_, args...);
  }
  /// Returns the callback object of type C.
  template <class C>
  C& callback() noexcept {
    static_assert(contains_v<C, callbacks_type>,
                  "fabric: callback<C>() needs a C from Fabric's callback list; add C to Fabric<..., Callbacks...>");
    return std::get<C>(callbacks_);
  }
  /// Returns the loggers.
  const std::vector<std::shared_ptr<Logger>>& loggers() const noexcept { return options_.loggers; }
  /// Returns the first logger (or null).
  Logger* logger() const noexcept { return options_.loggers.empty() ? nullptr : options_.loggers.front().get(); }
  /// Logs one metric to every logger (on global rank zero only).
  void log(const std::string& name, double value, std::optional<std::int64_t> step = std::nullopt) {
    log_dict({{name, value}}, step);
  }
  /// Logs one scalar tensor to every logger (on global rank zero only).
  void log(const std::string& name, const at::Tensor& value, std::optional<std::int64_t> step = std::nullopt) {
    log(name, scalar_of("log", name, value), step);
  }
  /// Logs several one-element tensors (e.g. losses) to every logger, as numbers (Lightning's log_dict of
  /// tensors): `fabric.log_dict({{"loss", loss}, {"acc", acc}}, step)`.
  void log_dict(const std::map<std::string, at::Tensor>& metrics, std::optional<std::int64_t> step = std::nullopt) {
    Metrics values;
    for (const auto& [name, value] : metrics) values.emplace(name, scalar_of("log_dict", name, value));
    log_dict(values, step);
  }
  /// Logs several metrics to every logger, then calls the `on_log_metrics` hook (on global rank zero only).
  void log_dict(const Metrics& metrics, std::optional<std::int64_t> step = std::nullopt) {
    if (!is_global_zero()) return;
    for (const auto& logger : options_.loggers) logger->log_metrics(metrics, step);
    call(hooks::on_log_metrics, metrics, step);
  }

  // ---- checkpoints -----------------------------------------------------------------------------

  /// Saves the state through the strategy (rank zero writes, atomically; every rank agrees):
  /// modules and optimizers by their state, Stateful objects by their state_dict(), plain values as
  /// they are. Parent directories are created. With filters, an entry keeps the items of its state that
  /// its Filter chooses (Lightning's `filter=`); a filter key that is not in the state is an error.
  void save(const std::filesystem::path& path, const State& state, const Filters& filters = {}) {
    if constexpr (ScopesCheckpoints<P>) {
      precision_.checkpoint_scope(false, [&] { save_impl(path, state, filters); });
    } else {
      save_impl(path, state, filters);
    }
  }
  /// Restores the state in place from a checkpoint and returns the entries of the file that the
  /// state did not ask for. With strict, a missing key (or module tensor) is an error; shapes and
  /// types must always match. Nothing is changed when any check fails.
  State load(const std::filesystem::path& path, State& state, bool strict = true) {
    if constexpr (ScopesCheckpoints<P>) {
      return precision_.checkpoint_scope(true, [&] { return strategy_.load_checkpoint(path, state, strict); });
    } else {
      return strategy_.load_checkpoint(path, state, strict);
    }
  }
  /// load with the state written in place, for modules and optimizers restored where they are:
  /// `fabric.load(path, {{"model", model}, {"optimizer", optimizer}})`.
  State load(const std::filesystem::path& path, State&& state, bool strict = true) { return load(path, state, strict); }
  /// Loads every entry of a checkpoint as plain values.
  State load(const std::filesystem::path& path) {
    State none;
    return load(path, none, false);
  }
  /// Loads a module's or an optimizer's state from a file written without fabric (LibTorch's torch::save,
  /// Python's torch.save of a state_dict, safetensors), through the format that recognises the file.
  template <class T>
  void load_raw(const std::filesystem::path& path, T& target, bool strict = true) {
    if constexpr (ScopesCheckpoints<P>) {
      precision_.checkpoint_scope(true, [&] { strategy_.load_raw(path, target, strict); });
    } else {
      strategy_.load_raw(path, target, strict);
    }
  }

 private:
  void save_impl(const std::filesystem::path& path, const State& state, const Filters& filters) {
    if constexpr (detail::strategy_saves_filtered<S>) {
      strategy_.save_checkpoint(path, state, filters);
    } else {
      if (!filters.empty()) {
        detail::raise(
            "save: this strategy's save_checkpoint(path, state) takes no filters; expected "
            "save_checkpoint(path, state, filters), as fabric::StrategyBase has, or save without filters");
      }
      strategy_.save_checkpoint(path, state);
    }
  }

  template <class, class>
  friend class Module;
  template <class, class>
  friend class Optimizer;

  /// What the step check keeps of a set-up optimizer: how long it counts, and what a step changes
  /// (detail::step_fingerprint) at the last backward (nothing before the first).
  struct StepRecord {
    std::weak_ptr<const void> life;
    const torch::optim::Optimizer* optimizer;
    std::optional<std::int64_t> versions;
  };

  /// What the policies do in backward, for the messages of the guards.
  static std::string policies_that(bool precision, bool strategy) {
    std::string policies;
    if (precision) policies = fmt::format("the precision ({})", P::name);
    if (strategy) policies += fmt::format("{}the strategy ({})", policies.empty() ? "" : " and ", S::name);
    return policies;
  }
  /// Throws from the hook of a set-up module's output when a backward runs outside Fabric::backward.
  [[noreturn]] static void raise_raw_backward() {
    detail::raise(
        "loss.backward() on the output of a set-up module skips the backward of {}: the current strategy and "
        "precision selection requires you to call fabric.backward(loss) (or model.backward(loss)) instead of "
        "loss.backward()",
        policies_that(NeedsFabricBackward<P>, NeedsFabricBackward<S>));
  }
  /// Fails when what a step changes of a set-up optimizer changed since the previous backward while no
  /// step of a set-up optimizer ran; then records it for the next backward.
  void check_optimizer_steps() {
    // NOTE: a closure's backward inside fabric's step (LBFGS) sees the step's own updates.
    if (optimizer_steps_running_ > 0) return;
    const bool stepped = std::exchange(stepped_since_backward_, false);
    for (auto& record : step_records_) {
      if (record.life.expired()) continue;
      const std::int64_t versions = detail::step_fingerprint(*record.optimizer);
      if (!stepped && record.versions && *record.versions != versions) raise_raw_step();
      record.versions = versions;
    }
  }
  [[noreturn]] static void raise_raw_step() {
    std::string skipped;
    if constexpr (NeedsFabricStep<P> || NeedsFabricStep<S>) {
      skipped = "the step of " + policies_that(NeedsFabricStep<P>, NeedsFabricStep<S>);
    }
    if constexpr ((std::remove_cvref_t<decltype(hooks::on_after_optimizer_step)>::template declared_by<Cbs>() || ...)) {
      skipped += fmt::format("{}the callbacks' on_after_optimizer_step", skipped.empty() ? "" : " and ");
    }
    detail::raise(
        "backward: the parameters of a set-up optimizer changed since the last backward, but no step of a set-up "
        "optimizer ran: optimizer->step() (the LibTorch optimizer behind the wrapper) skips {}; call "
        "optimizer.step() on the wrapper setup() returned",
        skipped);
  }

  /// Returns the number a one-element tensor holds; raises for any other tensor.
  static double scalar_of(std::string_view what, const std::string& name, const at::Tensor& value) {
    if (!value.defined() || value.numel() != 1) {
      detail::raise(
          "{}: expected a tensor with one element for \"{}\", found {}; it cannot be converted to a scalar: reduce "
          "it first (mean(), sum())",
          what, name, value.defined() ? fmt::format("{} elements", value.numel()) : std::string("an undefined tensor"));
    }
    return value.item<double>();
  }
  [[noreturn]] static void raise_bypassed_forward() {
    std::string skipped;
    if constexpr (NeedsWrappedForward<P>) skipped = fmt::format("the precision ({})", P::name);
    if constexpr (NeedsWrappedForward<S>) {
      skipped += fmt::format("{}the strategy ({})", skipped.empty() ? "" : " and ", S::name);
    }
    detail::raise(
        "backward: the loss did not come through a set-up module's forward; model->forward(x) skips {}: call the "
        "wrapper, model(x) or model.forward(x)",
        skipped);
  }
  /// Settles `devices`: the launcher's processes per node under a distributed strategy whose cluster environment
  /// detected a launcher that says how many (torchrun, fabric-run, srun, jsrun, mpirun), else 1; a number given
  /// that disagrees with the launcher's is an error.
  void resolve_devices() {
    if constexpr (ReportsLauncherDevices<S>) {
      if (const auto launched = strategy_.parallel_options().cluster_environment.launcher_devices()) {
        if (options_.devices == Options::auto_devices) {
          options_.devices = launched->devices;
        } else if (options_.devices != launched->devices) {
          detail::raise(
              "expected devices = {} processes per node, as {} started, found devices = {}; leave devices at its "
              "default (fabric::Options::auto_devices) to take the launcher's number, or start {} per node",
              launched->devices, launched->source, options_.devices, options_.devices);
        }
      }
    }
    if (options_.devices == Options::auto_devices) options_.devices = 1;
  }
  void check_launched(std::string_view what) const {
    if (S::is_distributed && !launched_) {
      detail::raise(
          "{}: the {} strategy needs its processes first; call fabric.launch() before {} (fabric-run, torchrun, "
          "mpirun and srun start the processes, launch() then only connects them)",
          what, S::name, what);
    }
  }
  /// Refuses, under a strategy that shards data, a LibTorch loader whose sampler gives every rank every
  /// sample (unless options.use_distributed_sampler is off).
  template <class L>
  void check_shards(const DataOptions& options) {
    using Sampler = typename detail::loader_sampler<L>::type;
    if constexpr (!std::is_void_v<Sampler> && !is_distributed_sampler_v<Sampler>) {
      if (options.use_distributed_sampler && strategy_.shards_data()) {
        detail::raise(
            "setup_dataloaders: expected a loader that shards across the {} processes of the {} strategy, found one "
            "whose sampler ({}) gives every rank every sample; build it with fabric.make_data_loader(dataset, "
            "options) or with a fabric::DistributedSampler, or pass {{.use_distributed_sampler = false}} to "
            "setup_dataloaders to keep it as it is",
            world_size(), S::name, detail::sampler_name<Sampler>());
      }
    }
  }
  /// Returns the shard of the data this process reads (its rank when the strategy shards data, else 0).
  std::size_t shard_rank() { return strategy_.shards_data() ? static_cast<std::size_t>(global_rank()) : 0; }
  /// Sets up a loader that fabric built, keeping its sampler and dataset beside it.
  template <class L>
  DataLoader<L> setup_built(const DataOptions& options, detail::BuiltLoader<L> built) {
    check_shards<L>(options);
    return DataLoader<L>(std::shared_ptr<L>(std::move(built.loader)), device_, options.move_to_device,
                         std::move(built.parts));
  }
  void check_not_set_up(const void* object, std::string_view what) const {
    if (const auto it = set_up_.find(object); it != set_up_.end() && !it->second.expired()) {
      detail::raise(
          "this {0} was already set up by this Fabric; expected a {0} not set up yet, found one that "
          "setup() wrapped before; keep using the wrapper the first setup() returned",
          what);
    }
  }
  /// Records a set-up object until its entry expires, forgetting the expired ones: an object that died
  /// (or whose wrapper did) no longer counts, so a new one built at its address can be set up.
  void remember(const void* object, std::weak_ptr<const void> life) {
    std::erase_if(set_up_, [](const auto& entry) { return entry.second.expired(); });
    set_up_.insert_or_assign(object, std::move(life));
  }
  template <class M>
  auto setup_module_impl(const SetupOptions& options, M&& module) {
    using Impl = typename detail::module_class<std::remove_cvref_t<M>>::type;
    std::shared_ptr<Impl> ptr = detail::share<Impl>(std::forward<M>(module));
    precision_.convert_module(*ptr);
    if (options.move_to_device) {
      detail::warn_mixed_devices(*ptr);
      ptr->to(device_);
    }
    auto state = strategy_.setup_module(*ptr);
    auto life = detail::track_set_up(ptr);
    remember(static_cast<const torch::nn::Module*>(ptr.get()), std::move(life));
    modules_set_up_ = true;
    return Module<Impl, Fabric>(std::move(ptr), *this, std::move(state));
  }
  template <class O>
  auto setup_optimizer_impl(O&& optimizer) {
    using Opt = typename detail::pointee<std::remove_cvref_t<O>>::type;
    std::shared_ptr<Opt> ptr = detail::share<Opt>(std::forward<O>(optimizer));
    if constexpr (SetsUpOptimizers<P>) precision_.setup_optimizer(*ptr);
    strategy_.setup_optimizer(*ptr);
    auto life = detail::track_set_up(ptr);
    if constexpr (checks_optimizer_step) {
      std::erase_if(step_records_, [](const StepRecord& r) { return r.life.expired(); });
      step_records_.push_back({life, ptr.get(), std::nullopt});
    }
    remember(static_cast<const torch::optim::Optimizer*>(ptr.get()), std::move(life));
    return Optimizer<Opt, Fabric>(std::move(ptr), *this);
  }

  Options options_;
  FABRIC_NO_UNIQUE_ADDRESS A accelerator_;
  S strategy_;
  P precision_;
  std::tuple<Cbs...> callbacks_;
  c10::Device device_{c10::DeviceType::CPU};
  /// The set-up modules and optimizers by address, each with what it counts as set up for (see
  /// detail::track_set_up).
  std::unordered_map<const void*, std::weak_ptr<const void>> set_up_{};
  bool launched_ = false;
  bool modules_set_up_ = false;
  /// Wrapped forwards since the last backward (counted when checks_bypassed_forward).
  std::uint64_t wrapped_forwards_ = 0;
  /// The set-up optimizers the step check watches (when checks_optimizer_step).
  std::vector<StepRecord> step_records_{};
  /// Whether a set-up optimizer's step ran since the last backward, and how many are running.
  bool stepped_since_backward_ = false;
  int optimizer_steps_running_ = 0;
};

/// True for the wrappers that setup, setup_optimizers and setup_dataloaders return.
template <class T>
inline constexpr bool is_wrapped_v =
    detail::is_fabric_module_v<std::remove_cvref_t<T>> || detail::is_fabric_optimizer_v<std::remove_cvref_t<T>> ||
    detail::is_fabric_loader_v<std::remove_cvref_t<T>>;

}  // namespace fabric
