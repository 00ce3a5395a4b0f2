#pragma once
// Data loading: fabric::DataLoader (the wrapper setup_dataloaders returns, a C++20 input range of
// batches on the device) and fabric::DistributedSampler (PyTorch's DistributedSampler in C++).

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/detail/zip_check.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/utils/seed.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randperm.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <c10/util/Type.h>
#include <torch/data/dataloader.h>
#include <torch/data/dataloader/stateful.h>
#include <torch/data/dataloader_options.h>
#include <torch/data/datasets/base.h>
#include <torch/data/samplers/base.h>
#include <torch/data/samplers/distributed.h>
#include <torch/data/samplers/random.h>
#include <torch/data/samplers/sequential.h>
#include <torch/data/samplers/stream.h>
#include <torch/serialize/archive.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// What a set-up loader and a sampler that can be positioned exchange while the loader starts a pass:
/// LibTorch's `loader.begin()` calls the sampler's `reset()` on the calling thread, where the set-up
/// loader has put this record. The loader asks for a restored position; the sampler gives back its state
/// at the start of the pass (what a resume needs), in its own save() format.
struct PassHandshake {
  /// The sampler's archive (as bytes) to restore, or null for a plain reset.
  const at::Tensor* restore = nullptr;
  /// With restore: the saved pass was finished, so load the state and then start the next pass.
  bool new_pass = false;
  /// With restore of an unfinished pass: the indices the user already had, skipped unread.
  std::size_t skip = 0;
  /// Set by the sampler: its archive at the start of this pass.
  at::Tensor pass_state{};
  /// Set by the sampler: it took part.
  bool positioned = false;
};
inline thread_local PassHandshake* pass_handshake = nullptr;

/// Puts a handshake in place for the calling thread while it lives (restoring the previous one, so
/// that a loader started inside another's dataset keeps its own).
class PassHandshakeGuard {
 public:
  explicit PassHandshakeGuard(PassHandshake* handshake) noexcept : previous_(pass_handshake) {
    pass_handshake = handshake;
  }
  ~PassHandshakeGuard() { pass_handshake = previous_; }
  PassHandshakeGuard(const PassHandshakeGuard&) = delete;
  PassHandshakeGuard& operator=(const PassHandshakeGuard&) = delete;

 private:
  PassHandshake* previous_;
};

/// Returns a sampler's save() archive as a tensor of bytes.
template <class S>
at::Tensor sampler_archive(const S& sampler) {
  torch::serialize::OutputArchive archive;
  sampler.save(archive);
  std::string bytes;
  archive.save_to([&](const void* data, std::size_t n) {
    bytes.append(static_cast<const char*>(data), n);
    return n;
  });
  at::Tensor t = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  return t;
}
/// Loads a sampler from the bytes sampler_archive wrote.
template <class S>
void load_sampler_archive(S& sampler, const at::Tensor& bytes) {
  const at::Tensor b = bytes.contiguous();
  torch::serialize::InputArchive archive;
  (void)check_torch_zip(static_cast<const char*>(b.data_ptr()), static_cast<std::size_t>(b.numel()),
                        "the sampler state in the checkpoint");
  archive.load_from(static_cast<const char*>(b.data_ptr()), static_cast<std::size_t>(b.numel()));
  sampler.load(archive);
}

/// Starts a pass of a sampler that can be positioned: `reset()` starts a plain pass, `skip(n)` passes
/// over n indices unread. Without a handshake (the loader iterated directly) it is a plain reset.
template <class S, class Reset, class Skip>
void reset_positioned(S& sampler, Reset&& reset, Skip&& skip) {
  PassHandshake* handshake = pass_handshake;
  {
    // NOTE: a sampler wrapped in another that can be positioned sees no handshake: the outer one answers.
    PassHandshakeGuard inner(nullptr);
    if (handshake != nullptr && handshake->restore != nullptr) {
      load_sampler_archive(sampler, *handshake->restore);
      if (handshake->new_pass) reset();
    } else {
      reset();
    }
  }
  if (handshake == nullptr) return;
  handshake->pass_state = sampler_archive(sampler);
  handshake->positioned = true;
  if (handshake->restore != nullptr && !handshake->new_pass && handshake->skip > 0) {
    PassHandshakeGuard inner(nullptr);
    skip(handshake->skip);
  }
}

}  // namespace detail

/// Yields the indices of this rank's shard, in batches, like PyTorch's DistributedSampler: with
/// shuffle a new permutation each epoch from `seed + epoch`; without drop_last the index list is
/// padded by repeating its start so every rank gets the same number of samples (an evaluation can
/// count those samples twice); with one replica it is a plain random or sequential sampler. A set-up
/// loader can position it (state_dict / load_state_dict).
class DistributedSampler final : public torch::data::samplers::Sampler<> {
 public:
  /// Settings of the sampler.
  struct Options {
    std::size_t num_replicas = 1;
    std::size_t rank = 0;
    bool shuffle = true;
    std::uint64_t seed = 0;
    bool drop_last = false;
  };

  DistributedSampler(std::size_t size, Options options) : size_(size), options_(options) {
    if (options_.num_replicas < 1 || options_.rank >= options_.num_replicas) {
      detail::raise("DistributedSampler: expected 0 <= rank < num_replicas, found rank = {} and num_replicas = {}",
                    options_.rank, options_.num_replicas);
    }
  }

  /// Builds the next epoch's indices (called by the loader at the start of each pass).
  void reset(c10::optional<std::size_t> new_size = c10::nullopt) override {
    detail::reset_positioned(
        *this,
        [&] {
          if (new_size) size_ = *new_size;
          indices_ = shard_indices(epoch_);
          position_ = 0;
          ++epoch_;
        },
        [&](std::size_t n) { position_ = std::min(indices_.size(), position_ + n); });
  }
  /// Returns the next batch of indices, or nothing at the end of the shard.
  c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override {
    if (position_ >= indices_.size()) return c10::nullopt;
    const std::size_t n = std::min(batch_size, indices_.size() - position_);
    std::vector<std::size_t> batch(indices_.begin() + static_cast<std::ptrdiff_t>(position_),
                                   indices_.begin() + static_cast<std::ptrdiff_t>(position_ + n));
    position_ += n;
    return batch;
  }
  /// Writes the epoch the next pass uses and the position in the current one.
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("epoch", c10::IValue(static_cast<std::int64_t>(epoch_)));
    archive.write("position", c10::IValue(static_cast<std::int64_t>(position_)));
  }
  /// Reads what save wrote and rebuilds the current pass's indices (those of epoch - 1).
  void load(torch::serialize::InputArchive& archive) override {
    c10::IValue epoch;
    archive.read("epoch", epoch);
    c10::IValue position(static_cast<std::int64_t>(0));
    archive.try_read("position", position);
    if (!epoch.isInt() || epoch.toInt() < 0 || !position.isInt() || position.toInt() < 0) {
      detail::raise("DistributedSampler::load: expected a non-negative epoch and position, found {} and {}",
                    epoch.tagKind(), position.tagKind());
    }
    epoch_ = static_cast<std::size_t>(epoch.toInt());
    indices_ = epoch_ > 0 ? shard_indices(epoch_ - 1) : std::vector<std::size_t>{};
    position_ = std::min(indices_.size(), static_cast<std::size_t>(position.toInt()));
  }

  /// Sets the epoch the next pass uses (the loader counts passes by itself).
  void set_epoch(std::size_t epoch) noexcept { epoch_ = epoch; }
  /// Returns the epoch the next pass will use.
  std::size_t epoch() const noexcept { return epoch_; }
  /// Returns the size of the dataset it samples from.
  std::size_t size() const noexcept { return size_; }
  /// Returns its settings.
  const Options& options() const noexcept { return options_; }
  /// Returns how many samples this rank sees per epoch.
  std::size_t num_samples() const noexcept {
    const std::size_t r = options_.num_replicas;
    if (options_.drop_last && size_ % r != 0) {
      // NOTE: PyTorch's ceil((size - r) / r), which is 0 when there are fewer samples than ranks.
      return size_ < r ? 0 : (size_ - r) / r + ((size_ - r) % r != 0 ? 1 : 0);
    }
    return (size_ + r - 1) / r;
  }

  /// Returns this rank's indices for an epoch.
  std::vector<std::size_t> shard_indices(std::size_t epoch) const {
    std::vector<std::size_t> all;
    all.reserve(size_);
    if (options_.shuffle) {
      auto generator = at::make_generator<at::CPUGeneratorImpl>(options_.seed + epoch);
      const at::Tensor perm = at::randperm(static_cast<std::int64_t>(size_), generator, at::kLong);
      const auto* p = perm.data_ptr<std::int64_t>();
      for (std::size_t i = 0; i < size_; ++i) all.push_back(static_cast<std::size_t>(p[i]));
    } else {
      for (std::size_t i = 0; i < size_; ++i) all.push_back(i);
    }
    const std::size_t total = num_samples() * options_.num_replicas;
    if (!options_.drop_last && !all.empty()) {
      for (std::size_t i = 0; all.size() < total; ++i) all.push_back(all[i % size_]);
    }
    all.resize(std::min(all.size(), total));
    std::vector<std::size_t> mine;
    for (std::size_t i = options_.rank; i < all.size(); i += options_.num_replicas) mine.push_back(all[i]);
    return mine;
  }

 private:
  std::size_t size_;
  Options options_;
  std::size_t epoch_ = 0;
  std::vector<std::size_t> indices_{};
  std::size_t position_ = 0;
};

/// Says whether a sampler gives each rank its own part of the data (fabric's DistributedSampler and
/// LibTorch's distributed samplers do); setup_dataloaders refuses, under a strategy that shards data,
/// a loader whose sampler does not. Specialize it for a sampler of your own that shards by rank.
template <class S>
struct is_distributed_sampler : std::bool_constant<std::is_base_of_v<DistributedSampler, S> ||
                                                   std::is_base_of_v<torch::data::samplers::DistributedSampler<>, S>> {
};
/// True for the samplers fabric::is_distributed_sampler accepts.
template <class S>
inline constexpr bool is_distributed_sampler_v = is_distributed_sampler<S>::value;

/// A LibTorch dataset (what torch::data::make_data_loader takes): it answers batch requests and says
/// whether it is stateful (then it has no sampler).
template <class D>
concept TorchDataset = requires {
  typename D::BatchRequestType;
  { D::is_stateful } -> std::convertible_to<bool>;
};
/// A LibTorch sampler: reset at the start of each pass, then asked for batches of indices.
template <class S>
concept TorchSampler = requires(S& s, std::size_t n) {
  typename S::BatchRequestType;
  s.reset();
  s.next(n);
};

/// Makes a LibTorch sampler one that a set-up loader can position: it passes every call through, and at
/// the start of each pass gives the loader its `save()` state, so that `state_dict()` can resume the pass
/// where the user was. The loaders fabric builds use it around LibTorch's samplers; wrap a sampler of
/// your own in it when its `save()`/`load()` capture a pass (LibTorch's samplers do). Copies share the
/// sampler, so the set-up loader can hand it out while the LibTorch loader holds it.
///
///     auto loader = torch::data::make_data_loader(dataset, fabric::ResumableSampler(MySampler(n)), options);
template <TorchSampler S>
class ResumableSampler final : public torch::data::samplers::Sampler<typename S::BatchRequestType> {
 public:
  using sampler_type = S;
  using BatchRequestType = typename S::BatchRequestType;

  /// Wraps a sampler; num_samples says how many indices it yields per pass, where that is known (size()
  /// of the set-up loader needs it).
  explicit ResumableSampler(S sampler, std::optional<std::size_t> num_samples = std::nullopt)
      : state_(std::make_shared<State>(State{std::move(sampler), num_samples})) {}

  /// Starts a pass (restoring the position a set-up loader asks for).
  void reset(c10::optional<std::size_t> new_size = c10::nullopt) override {
    S& s = state_->sampler;
    detail::reset_positioned(
        s, [&] { s.reset(new_size); }, [&](std::size_t n) { (void)s.next(n); });
  }
  /// Returns the wrapped sampler's next batch request.
  c10::optional<BatchRequestType> next(std::size_t batch_size) override { return state_->sampler.next(batch_size); }
  /// Saves the wrapped sampler.
  void save(torch::serialize::OutputArchive& archive) const override { state_->sampler.save(archive); }
  /// Loads the wrapped sampler.
  void load(torch::serialize::InputArchive& archive) override { state_->sampler.load(archive); }

  /// Returns the wrapped sampler (the one the loader draws from).
  S& sampler() const noexcept { return state_->sampler; }
  /// Returns how many indices a pass yields, where known.
  std::optional<std::size_t> num_samples() const noexcept { return state_->num_samples; }

 private:
  struct State {
    S sampler;
    std::optional<std::size_t> num_samples;
  };
  std::shared_ptr<State> state_;
};

template <class S>
struct is_distributed_sampler<ResumableSampler<S>> : is_distributed_sampler<S> {};

/// Says whether a set-up loader can position a sampler (state_dict / load_state_dict): fabric's
/// DistributedSampler and ResumableSampler.
template <class S>
inline constexpr bool is_positionable_sampler_v = std::is_base_of_v<DistributedSampler, S>;
template <class S>
inline constexpr bool is_positionable_sampler_v<ResumableSampler<S>> = true;

template <class L>
class DataLoader;

namespace detail {
template <class L>
struct has_iterable_dataset : std::false_type {};
template <class D>
struct has_iterable_dataset<torch::data::StatefulDataLoader<D>> : std::true_type {};
template <class L>
struct has_iterable_dataset<DataLoader<L>> : has_iterable_dataset<L> {};
}  // namespace detail
/// True for a loader of a stateful LibTorch dataset (a ChunkDataset: it yields batches in its own order,
/// without a sampler or a length), Lightning's `has_iterable_dataset`; for a LibTorch loader type or a
/// set-up loader.
template <class L>
inline constexpr bool has_iterable_dataset_v = detail::has_iterable_dataset<std::remove_cvref_t<L>>::value;

/// Wraps a dataset so that every CPU tensor of its batches is copied into pinned (page-locked)
/// memory, as PyTorch's `pin_memory=True` does, which makes the loader's copy to a GPU asynchronous.
/// It runs in the loader's worker threads; disabled, it passes batches through (one type for both,
/// so the choice can be made at run time). Pinning needs a LibTorch with CUDA.
///
///     fabric::PinMemoryDataset pinned(dataset.map(torch::data::transforms::Stack<>()));
///     auto loader = torch::data::make_data_loader(std::move(pinned), torch::data::DataLoaderOptions(64).workers(2));
template <class D>
class PinMemoryDataset : public torch::data::datasets::BatchDataset<PinMemoryDataset<D>, typename D::BatchType,
                                                                    typename D::BatchRequestType> {
 public:
  explicit PinMemoryDataset(D dataset, bool enabled = true) : dataset_(std::move(dataset)), enabled_(enabled) {}

  /// Returns the wrapped dataset's batch with its tensors pinned (or unchanged when disabled).
  typename D::BatchType get_batch(typename D::BatchRequestType request) override {
    auto batch = dataset_.get_batch(std::move(request));
    return enabled_ ? detail::pin_memory(std::move(batch)) : batch;
  }
  /// Returns the wrapped dataset's size.
  c10::optional<std::size_t> size() const override { return dataset_.size(); }
  /// Returns true when batches are pinned.
  bool enabled() const noexcept { return enabled_; }
  /// Returns the wrapped dataset.
  const D& dataset() const noexcept { return dataset_; }

 private:
  D dataset_;
  bool enabled_;
};

/// What a dataset running in a loader that fabric built knows about the batch it is loading, as
/// PyTorch's `get_worker_info()` tells a worker who it is. LibTorch's workers are threads that take
/// batches in no fixed order, so fabric seeds by the batch, not by the worker: `batch_seed` comes from
/// (global seed, epoch, the batch's indices), the same whichever thread loads it, however many workers
/// there are, and in a resumed run.
struct BatchInfo {
  /// The global seed (PL_GLOBAL_SEED, 0 without seed_everything).
  std::uint64_t seed = 0;
  /// The pass over the data (0 for the first).
  std::size_t epoch = 0;
  /// This process's shard of the data (its global rank when the loader shards, else 0).
  std::size_t rank = 0;
  /// The seed of this batch.
  std::uint64_t batch_seed = 0;
};

namespace detail {

/// The batch a thread is loading: what batch_info() says, and the generator batch_generator() hands out.
struct BatchContext {
  BatchInfo info;
  std::optional<at::Generator> generator{};
};
inline thread_local BatchContext* current_batch = nullptr;

/// Mixes a value into a seed (splitmix64's finaliser), so that nearby inputs give unrelated seeds.
constexpr std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t value) noexcept {
  std::uint64_t z = seed ^ (value + 0x9e3779b97f4a7c15ULL + (seed << 6) + (seed >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Where the loader's passes are, for its workers: the set-up loader writes the epoch before each pass.
struct LoaderClock {
  std::atomic<std::size_t> epoch{0};
  std::uint64_t seed = 0;
  std::size_t rank = 0;
};

/// The dataset of a loader that fabric builds: passes batches through, telling the dataset (through
/// fabric::batch_info()) which batch it loads.
template <class D>
class FabricDataset : public torch::data::datasets::BatchDataset<FabricDataset<D>, typename D::BatchType,
                                                                 typename D::BatchRequestType> {
 public:
  FabricDataset(D dataset, std::shared_ptr<LoaderClock> clock)
      : dataset_(std::move(dataset)), clock_(std::move(clock)) {}

  /// Returns the wrapped dataset's batch, loaded with fabric::batch_info() set.
  typename D::BatchType get_batch(typename D::BatchRequestType request) override {
    BatchContext context{.info = {.seed = clock_->seed, .epoch = clock_->epoch.load(), .rank = clock_->rank}};
    std::uint64_t h = mix_seed(context.info.seed, context.info.epoch);
    if constexpr (std::ranges::range<typename D::BatchRequestType>) {
      for (const auto i : request) h = mix_seed(h, static_cast<std::uint64_t>(i));
    } else if constexpr (std::is_integral_v<typename D::BatchRequestType>) {
      h = mix_seed(h, static_cast<std::uint64_t>(request));
    }
    context.info.batch_seed = h;
    BatchContext* previous = current_batch;
    current_batch = &context;
    struct Restore {
      BatchContext* previous;
      ~Restore() { current_batch = previous; }
    } restore{previous};
    return dataset_.get_batch(std::move(request));
  }
  /// Returns the wrapped dataset's size.
  c10::optional<std::size_t> size() const override { return dataset_.size(); }
  /// Returns the wrapped dataset.
  const D& dataset() const noexcept { return dataset_; }

 private:
  D dataset_;
  std::shared_ptr<LoaderClock> clock_;
};

}  // namespace detail

/// Returns what the dataset is loading when called from its get_batch() or get() in a loader that fabric
/// built (fabric.dataloader, fabric.make_data_loader), or nothing elsewhere (PyTorch's get_worker_info()).
inline std::optional<BatchInfo> batch_info() {
  if (detail::current_batch == nullptr) return std::nullopt;
  return detail::current_batch->info;
}
/// Returns the CPU generator of the batch being loaded, seeded with its batch_seed (one generator per
/// batch: calls while loading it share it): a random transform that draws from it gives the same batch the
/// same augmentation in every run, whichever worker thread loads it. Outside a loader fabric built it is an
/// error.
///
///     auto flip = torch::rand({1}, fabric::batch_generator()).item<double>() < 0.5;
inline at::Generator batch_generator() {
  if (detail::current_batch == nullptr) {
    detail::raise(
        "batch_generator: expected a call from a dataset's get_batch() or get() in a loader that fabric "
        "built (fabric.dataloader, fabric.make_data_loader), found none under way");
  }
  auto& context = *detail::current_batch;
  if (!context.generator) context.generator = at::make_generator<at::CPUGeneratorImpl>(context.info.batch_seed);
  return *context.generator;
}
/// Returns a new CPU generator for one sample, seeded from (global seed, epoch, index): the same sample draws
/// the same numbers in every run and under any batch size, worker count or world size. Call it once in a
/// dataset's get(index) in a loader fabric built (each call starts the same sequence again).
inline at::Generator sample_generator(std::size_t index) {
  const auto info = batch_info();
  if (!info) {
    detail::raise(
        "sample_generator: expected a call from a dataset's get() in a loader that fabric built "
        "(fabric.dataloader, fabric.make_data_loader), found none under way");
  }
  return at::make_generator<at::CPUGeneratorImpl>(
      detail::mix_seed(detail::mix_seed(info->seed, info->epoch), index ^ 0x5a5a5a5a5a5a5a5aULL));
}

/// Returns how many data-loading workers each of `local_world_size` processes on this machine should use,
/// as Lightning's `suggested_max_num_workers`: the CPUs this process may run on, shared among the local
/// processes, less one for the main thread (at least 1).
inline std::size_t suggested_max_num_workers(std::size_t local_world_size, std::size_t cpus) {
  if (local_world_size < 1) {
    detail::raise(
        "suggested_max_num_workers: expected local_world_size >= 1, found {}; pass the processes per "
        "machine",
        local_world_size);
  }
  const std::size_t per_process = std::max<std::size_t>(cpus, 1) / local_world_size;
  return std::max<std::size_t>(1, per_process > 1 ? per_process - 1 : 1);
}
/// suggested_max_num_workers with the CPUs of this process's affinity mask.
inline std::size_t suggested_max_num_workers(std::size_t local_world_size) {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::size_t cpus = std::max(1u, std::thread::hardware_concurrency());
  if (::sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) cpus = CPU_COUNT(&set);
  return suggested_max_num_workers(local_world_size, cpus);
}

namespace detail {

/// Where a set-up loader is: passes started, batches the user had in the current one, and the
/// sampler's state at its start; and a position loaded but not applied yet (applied by the next pass).
struct LoaderPosition {
  std::size_t passes = 0;
  std::size_t batches = 0;
  bool in_pass = false;
  at::Tensor sampler_state{};
  /// Bumped by load_state_dict, so that an iterator of an earlier pass no longer counts.
  std::uint64_t generation = 0;
  bool pending = false;
  bool pending_in_pass = false;
  std::size_t pending_batches = 0;
  at::Tensor pending_state{};
};

/// The sampler and dataset types of a LibTorch loader type (void for a stateful loader, which has no
/// sampler).
template <class L>
struct loader_sampler {
  using type = void;
  using dataset = void;
};
template <class D, class S>
struct loader_sampler<torch::data::StatelessDataLoader<D, S>> {
  using type = S;
  using dataset = D;
};

template <class D>
struct unwrap_pinned {
  using type = std::conditional_t<std::is_void_v<D>, int, D>;
  template <class T>
  static const T& get(const T& d) noexcept {
    return d;
  }
};
template <class D>
struct unwrap_pinned<PinMemoryDataset<D>> {
  using type = typename unwrap_pinned<D>::type;
  static const type& get(const PinMemoryDataset<D>& d) noexcept { return unwrap_pinned<D>::get(d.dataset()); }
};
template <class D>
struct unwrap_pinned<FabricDataset<D>> {
  using type = typename unwrap_pinned<D>::type;
  static const type& get(const FabricDataset<D>& d) noexcept { return unwrap_pinned<D>::get(d.dataset()); }
};

/// Returns the name messages give a sampler type.
template <class S>
std::string sampler_name();

template <class T>
inline constexpr bool is_resumable_sampler_v = false;
template <class S>
inline constexpr bool is_resumable_sampler_v<ResumableSampler<S>> = true;
template <class T>
struct resumable_inner {
  using type = std::conditional_t<std::is_void_v<T>, int, T>;
};
template <class S>
struct resumable_inner<ResumableSampler<S>> {
  using type = S;
};

/// What the loaders fabric builds keep beside the LibTorch loader, which hides them: a handle on the
/// sampler and a copy of the dataset (LibTorch gives each worker its own copy too).
template <class L>
struct LoaderParts {
  using Sampler = typename loader_sampler<L>::type;
  using Dataset = typename loader_sampler<L>::dataset;
  std::optional<std::conditional_t<is_resumable_sampler_v<Sampler>, Sampler, int>> sampler{};
  std::shared_ptr<const std::conditional_t<std::is_void_v<Dataset>, int, Dataset>> dataset{};
  std::shared_ptr<LoaderClock> clock{};
};

}  // namespace detail

/// Wraps a LibTorch data loader: iterating it yields batches already on the fabric's device (tensors
/// in pinned memory are copied to a GPU asynchronously). It is a C++20 input range (`std::ranges::input_range`), so
/// standard and range-v3 views compose with it:
///
///     for (auto& [images, labels] : fabric.setup_dataloaders(loader) | std::views::take(100)) { ... }
///
/// Its position is state: `state_dict()` says where the user is (the epoch, the batches already yielded,
/// the sampler's order), and after `load_state_dict` the next pass continues with the next batch, in the
/// same order, without loading the skipped batches.
template <class L>
class DataLoader {
  using torch_iterator = decltype(std::declval<L&>().begin());
  using torch_sampler = typename detail::loader_sampler<L>::type;
  using torch_dataset = typename detail::loader_sampler<L>::dataset;

 public:
  using loader_type = L;
  using batch_type = std::remove_cvref_t<decltype(*std::declval<torch_iterator&>())>;
  /// The type sampler() returns: what fabric::ResumableSampler wraps (the loader's sampler otherwise).
  using sampler_type = typename detail::resumable_inner<torch_sampler>::type;
  /// The type dataset() returns: the dataset the loader was built from.
  using dataset_type = typename detail::unwrap_pinned<torch_dataset>::type;

  /// The input iterator over batches; copies share the underlying loader position.
  class iterator {
   public:
    using value_type = batch_type;
    using reference = batch_type&;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;
    using iterator_category = std::input_iterator_tag;

    iterator() = default;
    iterator(torch_iterator it, torch_iterator end, const c10::Device& device, bool move,
             std::shared_ptr<detail::LoaderPosition> position)
        : it_(std::move(it)), end_(std::move(end)), device_(device), move_(move), position_(std::move(position)) {
      generation_ = position_->generation;
      fetch();
    }

    reference operator*() const noexcept { return *current_; }
    batch_type* operator->() const noexcept { return &*current_; }
    iterator& operator++() {
      ++*it_;
      fetch();
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& it, std::default_sentinel_t) noexcept { return !it.current_; }

   private:
    void fetch() {
      if (*it_ == *end_) {
        current_.reset();
      } else if (move_) {
        current_.emplace(detail::move_batch(batch_type(**it_), device_));
      } else {
        current_.emplace(std::move(**it_));
      }
      // NOTE: a batch counts as yielded once the user holds it: a checkpoint written while training on it
      // resumes with the one after.
      if (position_->generation != generation_ || !position_->in_pass) return;
      if (current_) {
        ++position_->batches;
      } else {
        position_->in_pass = false;
      }
    }

    std::optional<torch_iterator> it_{};
    std::optional<torch_iterator> end_{};
    mutable std::optional<batch_type> current_{};
    c10::Device device_{c10::DeviceType::CPU};
    bool move_ = true;
    std::shared_ptr<detail::LoaderPosition> position_{};
    std::uint64_t generation_ = 0;
  };

  DataLoader(std::shared_ptr<L> loader, c10::Device device, bool move_to_device, detail::LoaderParts<L> parts = {})
      : loader_(std::move(loader)),
        device_(device),
        move_(move_to_device && !device.is_cpu()),
        moves_(move_to_device),
        parts_(std::move(parts)),
        position_(std::make_shared<detail::LoaderPosition>()) {}

  /// Starts a pass over the data (a new epoch for fabric's sampler), or continues the pass that
  /// load_state_dict restored.
  iterator begin() {
    auto& p = *position_;
    detail::PassHandshake handshake;
    if (p.pending) {
      handshake.restore = &p.pending_state;
      handshake.new_pass = !p.pending_in_pass;
      handshake.skip = p.pending_batches * batch_size();
    }
    const std::size_t epoch = p.passes;
    if (parts_.clock) parts_.clock->epoch.store(epoch);
    if constexpr (detail::is_resumable_sampler_v<torch_sampler>) {
      // NOTE: as Lightning's loader, each pass sets the epoch of a sampler that has set_epoch (LibTorch's
      // distributed samplers would repeat the first epoch's order otherwise); a restored one reads its own.
      if constexpr (requires(sampler_type & s) { s.set_epoch(epoch); }) {
        if (parts_.sampler) parts_.sampler->sampler().set_epoch(epoch);
      }
    }
    std::optional<torch_iterator> it;
    {
      detail::PassHandshakeGuard guard(&handshake);
      it.emplace(loader_->begin());
    }
    if (p.pending && !handshake.positioned) {
      detail::raise(
          "DataLoader: expected the loader's sampler to take the restored position, found that it did not "
          "(was it reset outside this loader?); build the loader with fabric.make_data_loader");
    }
    p.batches = p.pending && p.pending_in_pass ? p.pending_batches : 0;
    p.pending = false;
    p.pending_state = at::Tensor();
    ++p.passes;
    p.in_pass = true;
    p.sampler_state = handshake.positioned ? std::move(handshake.pass_state) : at::Tensor();
    return iterator(std::move(*it), loader_->end(), device_, move_, position_);
  }
  /// Marks the end of a pass.
  std::default_sentinel_t end() const noexcept { return {}; }

  /// Returns the loader's position: `epoch` (the pass under way, or the next one when the last has
  /// finished), `batches` (yielded to the user in it), `mid_epoch`, `batch_size` and the `sampler`'s
  /// order at the start of the pass. A checkpoint entry (`{"loader", loader}`) saves it.
  c10::Dict<std::string, c10::IValue> state_dict() const {
    check_positionable("state_dict");
    const auto& p = *position_;
    auto state = c10::impl::toTypedDict<std::string, c10::IValue>(
        c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()));
    const bool mid = p.pending ? p.pending_in_pass : p.in_pass;
    const std::size_t epoch = p.pending ? p.passes : (p.in_pass ? p.passes - 1 : p.passes);
    const at::Tensor& sampler = p.pending ? p.pending_state : p.sampler_state;
    state.insert("epoch", static_cast<std::int64_t>(epoch));
    state.insert("batches", static_cast<std::int64_t>(p.pending ? p.pending_batches : (mid ? p.batches : 0)));
    state.insert("mid_epoch", mid);
    state.insert("batch_size", static_cast<std::int64_t>(batch_size()));
    state.insert("sampler", sampler.defined() ? sampler : at::empty({0}, at::kByte));
    return state;
  }
  /// Restores a position state_dict returned: the next pass (begin()) continues that epoch with the next
  /// batch, in the same order, skipping the batches already yielded without loading them; after a
  /// finished epoch it starts the next one. Nothing changes when the state is malformed.
  void load_state_dict(const c10::Dict<std::string, c10::IValue>& state) {
    check_positionable("load_state_dict");
    const auto get = [&](const char* key, bool (c10::IValue::*is)() const, const char* kind) {
      if (!state.contains(key)) {
        detail::raise(
            "DataLoader::load_state_dict: expected the key \"{}\" ({}) of a loader's state_dict(), found "
            "a state without it; pass what DataLoader::state_dict() returned",
            key, kind);
      }
      c10::IValue v = state.at(key);
      if (!(v.*is)()) {
        detail::raise("DataLoader::load_state_dict: expected \"{}\" to be {}, found {}", key, kind, v.tagKind());
      }
      return v;
    };
    const std::int64_t epoch = get("epoch", &c10::IValue::isInt, "an integer").toInt();
    const std::int64_t batches = get("batches", &c10::IValue::isInt, "an integer").toInt();
    const bool mid = get("mid_epoch", &c10::IValue::isBool, "a bool").toBool();
    const std::int64_t saved_batch_size = get("batch_size", &c10::IValue::isInt, "an integer").toInt();
    const at::Tensor sampler = get("sampler", &c10::IValue::isTensor, "a tensor").toTensor();
    if (epoch < 0 || batches < 0) {
      detail::raise("DataLoader::load_state_dict: expected epoch >= 0 and batches >= 0, found {} and {}", epoch,
                    batches);
    }
    if (sampler.scalar_type() != at::kByte || sampler.dim() != 1) {
      detail::raise(
          "DataLoader::load_state_dict: expected \"sampler\" to be a 1-D uint8 tensor (the sampler's "
          "archive), found {} of {} dimensions",
          c10::toString(sampler.scalar_type()), sampler.dim());
    }
    if (mid && sampler.numel() == 0) {
      detail::raise(
          "DataLoader::load_state_dict: expected the sampler's order of the epoch under way, found an "
          "empty \"sampler\"; pass what DataLoader::state_dict() returned");
    }
    if (!mid && batches != 0) {
      detail::raise("DataLoader::load_state_dict: expected batches = 0 between epochs (mid_epoch false), found {}",
                    batches);
    }
    const auto own = static_cast<std::int64_t>(batch_size());
    if (saved_batch_size != own) {
      detail::raise(
          "DataLoader::load_state_dict: expected the batch size of the saved loader, {}, found a loader "
          "with batch size {}; build the loader with the batch size it was saved with",
          saved_batch_size, own);
    }
    auto& p = *position_;
    ++p.generation;
    p.in_pass = false;
    p.batches = 0;
    p.passes = static_cast<std::size_t>(epoch);
    p.sampler_state = at::Tensor();
    p.pending = sampler.numel() > 0;
    p.pending_in_pass = mid;
    p.pending_batches = static_cast<std::size_t>(batches);
    p.pending_state = p.pending ? sampler.clone() : at::Tensor();
  }

  /// Returns the number of batches a pass yields on this rank (Lightning's `len(dataloader)`), for the
  /// loaders fabric builds (fabric.dataloader, fabric.make_data_loader), whose sampler it knows.
  std::size_t size() const {
    if constexpr (!requires(L & l) { l.options(); } && std::ranges::sized_range<L>) {
      return static_cast<std::size_t>(std::ranges::size(*loader_));  // a range of batches
    }
    const std::size_t n = num_samples("size");
    const std::size_t b = batch_size();
    return loader_->options().drop_last ? n / b : (n + b - 1) / b;
  }
  /// Returns the sampler the loader draws from (a fabric::DistributedSampler under a strategy that
  /// shards data, LibTorch's otherwise), for the loaders fabric builds.
  sampler_type& sampler() const {
    static_assert(detail::is_resumable_sampler_v<torch_sampler>,
                  "fabric: sampler() needs a loader that fabric built (LibTorch's loader hides its sampler); build "
                  "it with fabric.make_data_loader(dataset, ...) or fabric.dataloader(dataset, ...)");
    if (!parts_.sampler) raise_hidden("sampler");
    return parts_.sampler->sampler();
  }
  /// Returns the dataset the loader reads (a copy: LibTorch gives each worker its own), for the loaders
  /// fabric builds.
  const dataset_type& dataset() const {
    static_assert(!std::is_void_v<torch_dataset>,
                  "fabric: dataset() needs a loader of a map-style dataset; a stateful LibTorch loader has none to "
                  "give");
    if (!parts_.dataset) raise_hidden("dataset");
    return detail::unwrap_pinned<torch_dataset>::get(*parts_.dataset);
  }

  /// Returns the wrapped LibTorch loader.
  L& loader() const noexcept { return *loader_; }
  /// Returns the device batches are moved to, or nothing when they are not moved (`move_to_device = false`,
  /// Lightning's `device` of None).
  c10::optional<c10::Device> device() const noexcept {
    return moves_ ? c10::optional<c10::Device>(device_) : c10::nullopt;
  }

 private:
  /// Returns the LibTorch loader's batch size (1 for a range of batches, which has no position to restore).
  std::size_t batch_size() const {
    if constexpr (requires { loader_->options().batch_size; }) {
      return loader_->options().batch_size;
    } else {
      return 1;
    }
  }
  [[noreturn]] static void raise_hidden(const char* what) {
    detail::raise(
        "DataLoader::{0}(): a LibTorch loader given to setup_dataloaders hides its sampler and dataset; "
        "build it with fabric.make_data_loader(dataset, ...) or fabric.dataloader(dataset, ...) to have "
        "{0}()",
        what);
  }
  std::size_t num_samples(const char* what) const {
    if constexpr (!requires(L & l) { l.options(); }) {
      detail::raise("DataLoader::{}(): a range of batches without a size() has no length to tell", what);
    } else if constexpr (std::is_void_v<torch_sampler>) {
      detail::raise(
          "DataLoader::{}(): a stateful LibTorch dataset (a ChunkDataset) yields batches until it is done, "
          "with no length to tell beforehand",
          what);
    } else if constexpr (detail::is_resumable_sampler_v<torch_sampler>) {
      if (parts_.sampler) {
        if constexpr (std::is_base_of_v<DistributedSampler, typename torch_sampler::sampler_type>) {
          return parts_.sampler->sampler().num_samples();
        } else {
          if (const auto n = parts_.sampler->num_samples()) return *n;
          detail::raise(
              "DataLoader::{}(): the loader's sampler ({}) does not say how many indices it yields per "
              "pass; give fabric::ResumableSampler(sampler, num_samples) the number",
              what, detail::sampler_name<typename torch_sampler::sampler_type>());
        }
      }
    }
    raise_hidden(what);
  }
  static void check_positionable(const char* what) {
    if constexpr (!requires(L & l) { l.options(); }) {
      detail::raise(
          "DataLoader::{}: a range of batches given to setup_dataloaders has no position fabric can "
          "restore; build a LibTorch loader with fabric.make_data_loader(dataset, ...)",
          what);
    } else if constexpr (std::is_void_v<torch_sampler>) {
      detail::raise(
          "DataLoader::{}: a stateful LibTorch loader (a ChunkDataset's) has no sampler to position; save "
          "the dataset's own state instead",
          what);
    } else if constexpr (!is_positionable_sampler_v<torch_sampler>) {
      detail::raise(
          "DataLoader::{}: the loader's sampler ({}) cannot be positioned (LibTorch's loader hides it); "
          "build the loader with fabric.make_data_loader(...) or fabric.dataloader(...), or give "
          "torch::data::make_data_loader a fabric::DistributedSampler or a "
          "fabric::ResumableSampler(sampler)",
          what, detail::sampler_name<torch_sampler>());
    }
  }

  std::shared_ptr<L> loader_;
  c10::Device device_;
  bool move_;
  bool moves_;
  detail::LoaderParts<L> parts_;
  std::shared_ptr<detail::LoaderPosition> position_;
};

namespace detail {
template <class T>
inline constexpr bool is_fabric_loader_v = false;
template <class L>
inline constexpr bool is_fabric_loader_v<DataLoader<L>> = true;
}  // namespace detail

/// A set-up data loader (what setup_dataloaders and dataloader return), for the parameters of user
/// functions:
///
///     double evaluate(fabric::ModelOf<Net> auto& model, fabric::SetUpLoader auto& loader);
template <class W>
concept SetUpLoader = detail::is_fabric_loader_v<std::remove_cvref_t<W>>;

namespace detail {

/// A LibTorch loader that fabric built, with what the set-up loader keeps beside it.
template <class L>
struct BuiltLoader {
  std::unique_ptr<L> loader;
  LoaderParts<L> parts;
};

/// Builds a LibTorch loader over the sampler wrapped in fabric::ResumableSampler (so the set-up loader
/// can position it and hand it out), keeping a copy of the dataset for DataLoader::dataset().
template <class D0, class S>
auto build_loader(D0 dataset0, S sampler, torch::data::DataLoaderOptions options, std::optional<std::size_t> samples,
                  std::size_t rank) {
  auto clock = std::make_shared<LoaderClock>();
  clock->seed = global_seed();
  clock->rank = rank;
  using D = FabricDataset<D0>;
  D dataset(std::move(dataset0), clock);
  using Sampler = std::conditional_t<is_resumable_sampler_v<S>, S, ResumableSampler<S>>;
  Sampler resumable = [&] {
    if constexpr (is_resumable_sampler_v<S>) {
      return std::move(sampler);
    } else {
      return Sampler(std::move(sampler), samples);
    }
  }();
  using L = torch::data::StatelessDataLoader<D, Sampler>;
  BuiltLoader<L> built;
  built.parts.sampler.emplace(resumable);
  built.parts.dataset = std::make_shared<const D>(dataset);
  built.parts.clock = std::move(clock);
  built.loader = std::make_unique<L>(std::move(dataset), std::move(resumable), std::move(options));
  return built;
}

/// Builds the loader of `Fabric::dataloader`: batches of options.batch_size drawn by a
/// DistributedSampler over `replicas` ranks (shuffled per epoch from seed), pinned in the workers when
/// `pin` is set.
template <class D>
auto make_loader(D dataset, const LoaderOptions& options, std::size_t replicas, std::size_t rank, std::uint64_t seed,
                 bool pin) {
  const auto size = dataset.size();
  if (!size) raise("dataloader() needs a dataset with a known size, found size() = nullopt");
  if (options.batch_size < 1) raise("dataloader(): expected batch_size >= 1, found 0");
  DistributedSampler sampler(
      *size, {.num_replicas = replicas, .rank = rank, .shuffle = options.shuffle, .seed = seed, .drop_last = false});
  // NOTE: pinning runs in the loader's workers; switched off, the wrapper passes batches through, so
  // the loader has one type either way.
  PinMemoryDataset<D> pinned(std::move(dataset), pin);
  return build_loader(std::move(pinned), std::move(sampler),
                      torch::data::DataLoaderOptions()
                          .batch_size(options.batch_size)
                          .workers(options.num_workers)
                          .drop_last(options.drop_last),
                      std::nullopt, rank);
}

/// Returns how many indices a LibTorch sampler yields per pass over a dataset of `size`, where fabric
/// knows (its own samplers and LibTorch's).
template <class S>
std::optional<std::size_t> sampler_samples(const S& sampler, std::size_t size) {
  namespace samplers = torch::data::samplers;
  if constexpr (std::is_same_v<S, samplers::RandomSampler> || std::is_same_v<S, samplers::SequentialSampler>) {
    return size;
  } else if constexpr (std::is_base_of_v<DistributedSampler, S>) {
    return sampler.num_samples();
  } else {
    return std::nullopt;
  }
}

/// True for the samplers of LibTorch whose save()/load() capture a pass, which fabric wraps in a
/// ResumableSampler itself (a sampler of the user's is kept as it is: fabric cannot know).
template <class S>
inline constexpr bool is_known_sampler_v =
    std::is_same_v<S, torch::data::samplers::RandomSampler> ||
    std::is_same_v<S, torch::data::samplers::SequentialSampler> ||
    std::is_same_v<S, torch::data::samplers::DistributedRandomSampler> ||
    std::is_same_v<S, torch::data::samplers::DistributedSequentialSampler> || std::is_base_of_v<DistributedSampler, S>;

/// Returns the name messages give a sampler type.
template <class S>
std::string sampler_name() {
  if constexpr (is_resumable_sampler_v<S>) {
    return sampler_name<typename S::sampler_type>();
  } else if constexpr (std::is_same_v<S, torch::data::samplers::RandomSampler>) {
    return "RandomSampler";
  } else if constexpr (std::is_same_v<S, torch::data::samplers::SequentialSampler>) {
    return "SequentialSampler";
  } else if constexpr (std::is_same_v<S, torch::data::samplers::StreamSampler>) {
    return "StreamSampler";
  } else {
    return c10::demangle_type<S>();
  }
}

/// Returns the DistributedSampler that stands in for LibTorch's default sampler S of make_data_loader
/// when the data is sharded: RandomSampler becomes a shuffled one (a new order each epoch from seed),
/// SequentialSampler an ordered one.
template <class S>
DistributedSampler distributed_sampler_for(std::size_t size, std::size_t replicas, std::size_t rank,
                                           std::uint64_t seed) {
  constexpr bool random = std::is_same_v<S, torch::data::samplers::RandomSampler>;
  static_assert(random || std::is_same_v<S, torch::data::samplers::SequentialSampler>,
                "fabric: make_data_loader<Sampler> under a distributed strategy shards RandomSampler and "
                "SequentialSampler only; pass a sampler that shards by rank as fabric.make_data_loader(dataset, "
                "sampler, options)");
  return DistributedSampler(
      size, {.num_replicas = replicas, .rank = rank, .shuffle = random, .seed = seed, .drop_last = false});
}

}  // namespace detail
}  // namespace fabric

// NOTE: size() is the batches of a whole pass, not what a restored pass yields, and it needs a loader
// fabric built: std::ranges and range-v3 must count by iterating.
namespace std::ranges {
template <class L>
inline constexpr bool disable_sized_range<fabric::DataLoader<L>> = true;
}  // namespace std::ranges
#if __has_include(<range/v3/range/primitives.hpp>)
#include <range/v3/range/primitives.hpp>
namespace ranges {
template <class L>
inline constexpr bool disable_sized_range<fabric::DataLoader<L>> = true;
}  // namespace ranges
#endif
