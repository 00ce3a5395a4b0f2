#pragma once
// Data loading: fabric::DataLoader (the wrapper setup_dataloaders returns, a C++20 input range of
// batches on the device) and fabric::DistributedSampler (PyTorch's DistributedSampler in C++).

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/randperm.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <c10/util/Type.h>
#include <torch/data/dataloader.h>
#include <torch/data/dataloader_options.h>
#include <torch/data/datasets/base.h>
#include <torch/data/samplers/base.h>
#include <torch/data/samplers/distributed.h>
#include <torch/data/samplers/random.h>
#include <torch/data/samplers/sequential.h>
#include <torch/data/samplers/stream.h>
#include <torch/serialize/archive.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

/// Yields the indices of this rank's shard, in batches, like PyTorch's DistributedSampler: with
/// shuffle a new permutation each epoch from `seed + epoch`; without drop_last the index list is
/// padded by repeating its start so every rank gets the same number of samples (an evaluation can
/// count those samples twice); with one replica it is a plain random or sequential sampler.
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
    if (new_size) size_ = *new_size;
    indices_ = shard_indices(epoch_);
    position_ = 0;
    ++epoch_;
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
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("epoch", c10::IValue(static_cast<std::int64_t>(epoch_)));
  }
  void load(torch::serialize::InputArchive& archive) override {
    c10::IValue epoch;
    archive.read("epoch", epoch);
    epoch_ = static_cast<std::size_t>(epoch.toInt());
  }

  /// Sets the epoch the next pass uses (the loader counts passes by itself).
  void set_epoch(std::size_t epoch) noexcept { epoch_ = epoch; }
  /// Returns the epoch the next pass will use.
  std::size_t epoch() const noexcept { return epoch_; }
  /// Returns how many samples this rank sees per epoch.
  std::size_t num_samples() const noexcept {
    const std::size_t r = options_.num_replicas;
    if (options_.drop_last && size_ % r != 0) return (size_ - r) / r + ((size_ - r) % r != 0 ? 1 : 0);
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

 private:
  D dataset_;
  bool enabled_;
};

/// Wraps a LibTorch data loader: iterating it yields batches already on the fabric's device (tensors
/// in pinned memory are copied to a GPU asynchronously). It is a C++20 input range (`std::ranges::input_range`), so
/// standard and range-v3 views compose with it:
///
///     for (auto& [images, labels] : fabric.setup_dataloaders(loader) | std::views::take(100)) { ... }
template <class L>
class DataLoader {
  using torch_iterator = decltype(std::declval<L&>().begin());

 public:
  using loader_type = L;
  using batch_type = std::remove_cvref_t<decltype(*std::declval<torch_iterator&>())>;

  /// The input iterator over batches; copies share the underlying loader position.
  class iterator {
   public:
    using value_type = batch_type;
    using reference = batch_type&;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;
    using iterator_category = std::input_iterator_tag;

    iterator() = default;
    iterator(L& loader, const c10::Device& device, bool move) : device_(device), move_(move) {
      it_.emplace(loader.begin());
      end_.emplace(loader.end());
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
    }

    std::optional<torch_iterator> it_{};
    std::optional<torch_iterator> end_{};
    mutable std::optional<batch_type> current_{};
    c10::Device device_{c10::DeviceType::CPU};
    bool move_ = true;
  };

  DataLoader(std::shared_ptr<L> loader, c10::Device device, bool move_to_device)
      : loader_(std::move(loader)), device_(device), move_(move_to_device && !device.is_cpu()) {}

  /// Starts a pass over the data (a new epoch for fabric's sampler).
  iterator begin() { return iterator(*loader_, device_, move_); }
  /// Marks the end of a pass.
  std::default_sentinel_t end() const noexcept { return {}; }

  /// Returns the wrapped LibTorch loader.
  L& loader() const noexcept { return *loader_; }
  /// Returns the device batches are moved to.
  const c10::Device& device() const noexcept { return device_; }

 private:
  std::shared_ptr<L> loader_;
  c10::Device device_;
  bool move_;
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
  return torch::data::make_data_loader(std::move(pinned), std::move(sampler),
                                       torch::data::DataLoaderOptions()
                                           .batch_size(options.batch_size)
                                           .workers(options.num_workers)
                                           .drop_last(options.drop_last));
}

/// The sampler type of a LibTorch loader type (void for a stateful loader, which has none).
template <class L>
struct loader_sampler {
  using type = void;
};
template <class D, class S>
struct loader_sampler<torch::data::StatelessDataLoader<D, S>> {
  using type = S;
};

/// Returns the name messages give a sampler type.
template <class S>
std::string sampler_name() {
  if constexpr (std::is_same_v<S, torch::data::samplers::RandomSampler>) {
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
