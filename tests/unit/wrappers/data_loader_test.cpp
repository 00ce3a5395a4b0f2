// Data: the set-up loader as a C++20 input range, fabric's DistributedSampler, the convenience loader,
// make_data_loader, the refusal of loaders that do not shard under DDP and of set-up calls before launch().
#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include "unit/solo_ddp.hpp"
#include "unit/test_data.hpp"

#include <fmt/format.h>
#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#include <range/v3/view/enumerate.hpp>
#include <range/v3/view/take.hpp>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <ranges>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

using Catch::Matchers::ContainsSubstring;
using fabric_test::indexed;

namespace {

std::vector<std::int64_t> ids(const torch::data::Example<>& batch) {
  const auto t = batch.target.contiguous();
  return {t.data_ptr<std::int64_t>(), t.data_ptr<std::int64_t>() + t.numel()};
}

/// Returns the sample ids of one pass over a loader.
template <class L>
std::vector<std::int64_t> pass(L& loader) {
  std::vector<std::int64_t> order;
  for (auto& batch : loader) {
    auto i = ids(batch);
    order.insert(order.end(), i.begin(), i.end());
  }
  return order;
}

/// A launched one-process DDP fabric (Gloo).
struct SoloDDP {
  SoloDDP() {
    require_gloo();
    fabric.launch();
  }
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric{{}, fabric::DDP({.cluster_environment = SoloEnvironment{}}), {}};
};

auto make_loader(std::int64_t n, std::size_t batch) {
  return torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      indexed(n).map(torch::data::transforms::Stack<>()), torch::data::DataLoaderOptions().batch_size(batch));
}

}  // namespace

TEST_CASE("setup_dataloaders wraps LibTorch loaders into input ranges", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto loader = fabric.setup_dataloaders(make_loader(10, 4));
  STATIC_REQUIRE(std::ranges::input_range<decltype(loader)>);
  std::vector<std::int64_t> seen;
  std::vector<std::int64_t> sizes;
  for (auto& batch : loader) {
    CHECK(batch.data.device() == fabric.device());
    auto i = ids(batch);
    seen.insert(seen.end(), i.begin(), i.end());
    sizes.push_back(batch.data.size(0));
  }
  CHECK(sizes == std::vector<std::int64_t>{4, 4, 2});
  std::vector<std::int64_t> all(10);
  std::iota(all.begin(), all.end(), 0);
  CHECK(seen == all);
  // A second pass yields the data again.
  CHECK(std::ranges::distance(loader.begin(), loader.end()) == 3);
}

TEST_CASE("the loader composes with std::ranges and range-v3 views", "[data][ranges]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto loader = fabric.setup_dataloaders(make_loader(20, 5));
  int n = 0;
  for (auto& batch : loader | std::views::take(2)) {
    CHECK(ids(batch).front() == 5 * n);
    ++n;
  }
  CHECK(n == 2);
  std::vector<std::size_t> indices;
  for (auto&& [i, batch] : loader | ranges::views::enumerate) {
    indices.push_back(i);
    CHECK(ids(batch).front() == static_cast<std::int64_t>(5 * i));
  }
  CHECK(indices == std::vector<std::size_t>{0, 1, 2, 3});
  int taken = 0;
  for (auto&& batch : loader | ranges::views::take(3)) {
    (void)batch;
    ++taken;
  }
  CHECK(taken == 3);
  auto firsts = loader | std::views::transform([](auto& b) { return b.data.size(0); }) | std::views::take(1);
  CHECK(*std::ranges::begin(firsts) == 5);
}

TEST_CASE("setup_dataloaders takes several loaders, references and options", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto owned = make_loader(6, 3);
  auto& raw = *owned;
  auto [a, b] = fabric.setup_dataloaders(make_loader(4, 2), raw);
  CHECK(&b.loader() == &raw);
  CHECK(std::ranges::distance(a) == 2);
  CHECK(std::ranges::distance(b) == 2);
  auto c = fabric.setup_dataloaders({.move_to_device = false, .use_distributed_sampler = false}, make_loader(3, 3));
  CHECK(std::ranges::distance(c) == 1);
  // Pairs and other nested batches are moved too.
  auto pairs = fabric.setup_dataloaders(torch::data::make_data_loader(
      indexed(4), torch::data::samplers::SequentialSampler(4), torch::data::DataLoaderOptions().batch_size(2)));
  for (auto& batch : pairs) CHECK(batch.size() == 2);
}

TEST_CASE("the convenience loader batches, shuffles per epoch and follows the seed", "[data][sampler]") {
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(3);
  auto loader =
      fabric.dataloader(indexed(10).map(torch::data::transforms::Stack<>()), {.batch_size = 4, .shuffle = true});
  auto epoch = [&] {
    std::vector<std::int64_t> order;
    for (auto& batch : loader) {
      auto i = ids(batch);
      order.insert(order.end(), i.begin(), i.end());
    }
    return order;
  };
  const auto e0 = epoch();
  const auto e1 = epoch();
  CHECK(e0.size() == 10);
  CHECK(std::set<std::int64_t>(e0.begin(), e0.end()).size() == 10);
  CHECK(e0 != e1);  // a new order each epoch
  // The same seed gives the same orders (they come from seed + epoch, as PyTorch's DistributedSampler).
  auto again =
      fabric.dataloader(indexed(10).map(torch::data::transforms::Stack<>()), {.batch_size = 4, .shuffle = true});
  std::vector<std::int64_t> a0;
  for (auto& batch : again) {
    auto i = ids(batch);
    a0.insert(a0.end(), i.begin(), i.end());
  }
  CHECK(a0 == e0);
  auto ordered =
      fabric.dataloader(indexed(5).map(torch::data::transforms::Stack<>()), {.batch_size = 2, .drop_last = true});
  std::vector<std::int64_t> o;
  for (auto& batch : ordered) {
    auto i = ids(batch);
    o.insert(o.end(), i.begin(), i.end());
  }
  CHECK(o == std::vector<std::int64_t>{0, 1, 2, 3});
  CHECK_THROWS_WITH(fabric.dataloader(indexed(5), {.batch_size = 0}), ContainsSubstring("expected batch_size >= 1"));
}

TEST_CASE("DistributedSampler shards are disjoint, cover the data and pad like PyTorch", "[data][sampler]") {
  for (std::size_t replicas : {1u, 2u, 3u, 4u}) {
    std::vector<std::size_t> all;
    for (std::size_t rank = 0; rank < replicas; ++rank) {
      fabric::DistributedSampler sampler(10, {.num_replicas = replicas, .rank = rank, .shuffle = true, .seed = 9});
      const auto mine = sampler.shard_indices(0);
      CHECK(mine.size() == (10 + replicas - 1) / replicas);
      CHECK(mine.size() == sampler.num_samples());
      all.insert(all.end(), mine.begin(), mine.end());
    }
    CHECK(std::set<std::size_t>(all.begin(), all.end()).size() == 10);  // covers everything
    CHECK(all.size() == ((10 + replicas - 1) / replicas) * replicas);   // padded to equal shards
    CHECK(all.size() - 10 == (replicas - 10 % replicas) % replicas);    // only the padding repeats
  }
  // Without shuffle, rank r takes every replicas-th index starting at r, padding from the start.
  fabric::DistributedSampler seq(5, {.num_replicas = 2, .rank = 1, .shuffle = false});
  CHECK(seq.shard_indices(0) == std::vector<std::size_t>{1, 3, 0});
  fabric::DistributedSampler dropped(5, {.num_replicas = 2, .rank = 1, .shuffle = false, .drop_last = true});
  CHECK(dropped.shard_indices(0) == std::vector<std::size_t>{1, 3});
  // Fewer samples than ranks with drop_last: nothing, as PyTorch's ceil((1 - 2) / 2).
  CHECK(fabric::DistributedSampler(1, {.num_replicas = 2, .rank = 1, .drop_last = true}).num_samples() == 0);
  CHECK(fabric::DistributedSampler(1, {.num_replicas = 2, .rank = 1, .drop_last = true}).shard_indices(0).empty());
  // Epochs reshuffle; the same epoch and seed reproduce.
  fabric::DistributedSampler s(100, {.seed = 1});
  CHECK(s.shard_indices(0) != s.shard_indices(1));
  CHECK(s.shard_indices(2) == fabric::DistributedSampler(100, {.seed = 1}).shard_indices(2));
  // Batching through the torch Sampler interface.
  s.reset();
  std::size_t total = 0;
  while (auto batch = s.next(30)) total += batch->size();
  CHECK(total == 100);
  CHECK(s.epoch() == 1);
  CHECK_THROWS_WITH(fabric::DistributedSampler(10, {.num_replicas = 2, .rank = 2}),
                    ContainsSubstring("expected 0 <= rank < num_replicas"));
}

TEST_CASE("make_data_loader takes torch's argument forms and yields torch's batches on one process", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto dataset = [] { return indexed(23).map(torch::data::transforms::Stack<>()); };
  // (dataset, options): torch's RandomSampler, the same order as torch's loader for the same seed.
  torch::manual_seed(11);
  auto reference = torch::data::make_data_loader(dataset(), torch::data::DataLoaderOptions(5));
  std::vector<std::vector<std::int64_t>> expected;
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (auto& batch : *reference) expected.push_back(ids(batch));
  }
  torch::manual_seed(11);
  auto loader = fabric.make_data_loader(dataset(), torch::data::DataLoaderOptions(5));
  STATIC_REQUIRE(std::is_same_v<decltype(loader)::sampler_type, torch::data::samplers::RandomSampler>);
  STATIC_REQUIRE(std::is_same_v<decltype(loader)::dataset_type, decltype(dataset())>);
  std::vector<std::vector<std::int64_t>> got;
  for (int epoch = 0; epoch < 2; ++epoch) {
    for (auto& batch : loader) {
      CHECK(batch.data.device() == fabric.device());
      got.push_back(ids(batch));
    }
  }
  CHECK(got == expected);
  CHECK(got.size() == 10);
  CHECK(got[0] != got[5]);  // a new order each epoch, as torch's
  // (dataset, batch_size), as torch::data::make_data_loader(dataset, 4) through DataLoaderOptions.
  torch::manual_seed(12);
  auto by_size_torch = torch::data::make_data_loader(dataset(), 4);
  const auto torch_order = pass(*by_size_torch);
  torch::manual_seed(12);
  auto by_size = fabric.make_data_loader(dataset(), 4);
  CHECK(pass(by_size) == torch_order);
  // An explicit sampler type, and (dataset, sampler, options).
  auto sequential = fabric.make_data_loader<torch::data::samplers::SequentialSampler>(dataset(), 10);
  std::vector<std::int64_t> all(23);
  std::iota(all.begin(), all.end(), 0);
  CHECK(pass(sequential) == all);
  auto with_sampler = fabric.make_data_loader(dataset(), torch::data::samplers::SequentialSampler(23),
                                              torch::data::DataLoaderOptions(6).drop_last(true));
  CHECK(pass(with_sampler) == std::vector<std::int64_t>(all.begin(), all.begin() + 18));
}

TEST_CASE("under DDP make_data_loader shards with fabric's sampler, seeded from the global seed", "[data][ddp]") {
  SoloDDP solo;
  auto& fabric = solo.fabric;
  fabric.seed_everything(5);
  auto loader =
      fabric.make_data_loader(indexed(17).map(torch::data::transforms::Stack<>()), torch::data::DataLoaderOptions(4));
  STATIC_REQUIRE(std::is_same_v<decltype(loader)::sampler_type, fabric::DistributedSampler>);
  const auto e0 = pass(loader);
  const auto e1 = pass(loader);
  // Rank 0 of 1: every sample once, in the order of DistributedSampler(seed 5) for epochs 0 and 1.
  const fabric::DistributedSampler sampler(17, {.num_replicas = 1, .rank = 0, .shuffle = true, .seed = 5});
  const auto order0 = sampler.shard_indices(0);
  const auto order1 = sampler.shard_indices(1);
  CHECK(e0 == std::vector<std::int64_t>(order0.begin(), order0.end()));
  CHECK(e1 == std::vector<std::int64_t>(order1.begin(), order1.end()));
  CHECK(e0 != e1);
  // SequentialSampler becomes an ordered DistributedSampler.
  auto ordered = fabric.make_data_loader<torch::data::samplers::SequentialSampler>(
      indexed(5).map(torch::data::transforms::Stack<>()), 2);
  CHECK(pass(ordered) == std::vector<std::int64_t>{0, 1, 2, 3, 4});
}

TEST_CASE("under DDP setup_dataloaders refuses a loader that does not shard, unless told to keep it", "[data][ddp]") {
  SoloDDP solo;
  auto& fabric = solo.fabric;
  auto dataset = [] { return indexed(6).map(torch::data::transforms::Stack<>()); };
  CHECK_THROWS_WITH(
      fabric.setup_dataloaders(torch::data::make_data_loader(dataset(), torch::data::DataLoaderOptions(2))),
      ContainsSubstring("expected a loader that shards across the 1 processes of the ddp strategy") &&
          ContainsSubstring("sampler (RandomSampler) gives every rank every sample") &&
          ContainsSubstring("fabric.make_data_loader(dataset, options)") &&
          ContainsSubstring("{.use_distributed_sampler = false}"));
  CHECK_THROWS_WITH(fabric.setup_dataloaders(make_loader(6, 2)), ContainsSubstring("sampler (SequentialSampler)"));
  // The same through make_data_loader with a sampler object that does not shard.
  CHECK_THROWS_WITH(fabric.make_data_loader(dataset(), torch::data::samplers::RandomSampler(6), 2),
                    ContainsSubstring("sampler (RandomSampler) gives every rank every sample"));
  // The opt-out keeps the loader as it is: every sample, on every rank.
  auto kept = fabric.setup_dataloaders({.use_distributed_sampler = false}, make_loader(6, 4));
  CHECK(pass(kept) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5});
  // Loaders that shard pass: fabric's DistributedSampler and LibTorch's distributed samplers.
  auto own = fabric.setup_dataloaders(torch::data::make_data_loader(
      dataset(), fabric::DistributedSampler(6, {.shuffle = false}), torch::data::DataLoaderOptions(3)));
  CHECK(pass(own) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5});
  auto libtorch = fabric.setup_dataloaders(torch::data::make_data_loader(
      dataset(), torch::data::samplers::DistributedSequentialSampler(6, 1, 0), torch::data::DataLoaderOptions(3)));
  CHECK(pass(libtorch).size() == 6);
  STATIC_REQUIRE(fabric::is_distributed_sampler_v<torch::data::samplers::DistributedRandomSampler>);
  STATIC_REQUIRE_FALSE(fabric::is_distributed_sampler_v<torch::data::samplers::RandomSampler>);
  // A single device never refuses.
  fabric::Fabric<fabric::CPU> single;
  auto plain = single.setup_dataloaders(make_loader(3, 3));
  CHECK(pass(plain) == std::vector<std::int64_t>{0, 1, 2});
}

// Lightning: tests_fabric/test_fabric.py::test_verify_launch_called
// (setup, setup_module, setup_dataloaders, the collectives and the init_module context before launch().)
TEST_CASE("under DDP what needs the processes is an error before launch()", "[data][ddp][errors]") {
  require_gloo();
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric{{}, fabric::DDP({.cluster_environment = SoloEnvironment{}}), {}};
  torch::nn::Linear net(2, 2);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  const auto before_launch = [](std::string_view what) {
    return ContainsSubstring(
        fmt::format("{0}: the ddp strategy needs its processes first; call fabric.launch() before {0}", what));
  };
  CHECK_THROWS_WITH(fabric.setup(net, sgd), before_launch("setup"));
  CHECK_THROWS_WITH(fabric.setup_module(net), before_launch("setup_module"));
  CHECK_THROWS_WITH(fabric.setup_optimizers(sgd), before_launch("setup_optimizers"));
  CHECK_THROWS_WITH(fabric.setup_dataloaders({.use_distributed_sampler = false}, make_loader(4, 2)),
                    before_launch("setup_dataloaders"));
  CHECK_THROWS_WITH(fabric.dataloader(indexed(4).map(torch::data::transforms::Stack<>()), {.batch_size = 2}),
                    before_launch("dataloader"));
  CHECK_THROWS_WITH(fabric.init_module(), before_launch("init_module"));
  const auto not_connected = ContainsSubstring("not connected yet; call fabric.launch() first");
  CHECK_THROWS_WITH(fabric.barrier(), not_connected);
  CHECK_THROWS_WITH(fabric.all_reduce(1.0), not_connected);
  CHECK_THROWS_WITH(fabric.all_gather(torch::ones({2})), not_connected);
  CHECK_THROWS_WITH(fabric.broadcast(torch::ones({2})), not_connected);
  // The checks changed nothing: after launch() the same objects set up, and init_module gives the dtype.
  fabric.launch();
  auto [model, optimizer] = fabric.setup(net, sgd);
  (void)optimizer;
  CHECK(&model.fabric() == &fabric);
  auto guard = fabric.init_module();
  CHECK(torch::nn::Linear(2, 2)->weight.dtype() == torch::kFloat32);
  CHECK(fabric.all_reduce(2.0).item<double>() == 2.0);
}

namespace {

/// Batches of a loader as lists of sample ids: the whole pass, or its first `count` batches.
template <class L>
std::vector<std::vector<std::int64_t>> batches(L& loader, std::size_t count = static_cast<std::size_t>(-1)) {
  std::vector<std::vector<std::int64_t>> out;
  if (count == 0) return out;
  for (auto& batch : loader) {
    out.push_back(ids(batch));
    if (out.size() == count) break;
  }
  return out;
}

template <class T>
std::vector<T> tail(const std::vector<T>& v, std::size_t from) {
  return {v.begin() + static_cast<std::ptrdiff_t>(from), v.end()};
}

/// indexed(n), counting the samples read (shared by the workers' copies).
struct Counted : torch::data::datasets::Dataset<Counted> {
  explicit Counted(std::int64_t n) : inner(indexed(n)), reads(std::make_shared<std::atomic<int>>(0)) {}
  torch::data::Example<> get(std::size_t i) override {
    ++*reads;
    return inner.get(i);
  }
  torch::optional<std::size_t> size() const override { return inner.size(); }
  fabric_test::XY inner;
  std::shared_ptr<std::atomic<int>> reads;
};

}  // namespace

TEST_CASE("a restored loader continues mid-epoch with the next batch, in the same order", "[data][state]") {
  const std::size_t workers = GENERATE(0u, 2u);
  CAPTURE(workers);
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(21);
  auto make = [&] {
    return fabric.dataloader(indexed(23).map(torch::data::transforms::Stack<>()),
                             {.batch_size = 4, .shuffle = true, .num_workers = workers});
  };
  auto reference = make();
  const auto e0 = batches(reference);
  const auto e1 = batches(reference);
  const auto e2 = batches(reference);
  REQUIRE(e0.size() == 6);
  REQUIRE(e0 != e1);
  // The interrupted run: epoch 0 whole, then three batches of epoch 1 (the third being trained on).
  auto run = make();
  CHECK(batches(run) == e0);
  std::vector<std::vector<std::int64_t>> seen;
  auto state = [&] {
    for (auto& batch : run) {
      seen.push_back(ids(batch));
      if (seen.size() == 3) return run.state_dict();
    }
    FAIL("the pass ended early");
    return run.state_dict();
  }();
  CHECK(seen == std::vector(e1.begin(), e1.begin() + 3));
  CHECK(state.at("epoch").toInt() == 1);
  CHECK(state.at("batches").toInt() == 3);
  CHECK(state.at("mid_epoch").toBool());
  CHECK(state.at("batch_size").toInt() == 4);
  // The resumed run, in a fresh loader: the rest of epoch 1, then epoch 2, as the uninterrupted run.
  auto resumed = make();
  resumed.load_state_dict(state);
  CHECK(resumed.state_dict().at("batches").toInt() == 3);  // what was loaded, until the pass starts
  CHECK(batches(resumed) == tail(e1, 3));
  CHECK(batches(resumed) == e2);
}

TEST_CASE("a loader restored at an epoch boundary starts the next epoch", "[data][state]") {
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(4);
  auto make = [&] {
    return fabric.dataloader(indexed(10).map(torch::data::transforms::Stack<>()), {.batch_size = 3, .shuffle = true});
  };
  auto reference = make();
  const auto e0 = batches(reference);
  const auto e1 = batches(reference);
  auto run = make();
  // Before the first pass: epoch 0, nothing under way; restoring it changes nothing.
  auto fresh = run.state_dict();
  CHECK(fresh.at("epoch").toInt() == 0);
  CHECK_FALSE(fresh.at("mid_epoch").toBool());
  (void)batches(run);
  const auto boundary = run.state_dict();
  CHECK(boundary.at("epoch").toInt() == 1);
  CHECK(boundary.at("batches").toInt() == 0);
  CHECK_FALSE(boundary.at("mid_epoch").toBool());
  auto resumed = make();
  resumed.load_state_dict(boundary);
  CHECK(batches(resumed) == e1);
  auto from_start = make();
  from_start.load_state_dict(fresh);
  CHECK(batches(from_start) == e0);
  // Saved while training on the last batch of a pass: the resumed pass yields nothing, the next is epoch 1.
  auto last = make();
  std::size_t n = 0;
  std::optional<c10::Dict<std::string, c10::IValue>> at_last;
  for (auto& batch : last) {
    (void)batch;
    if (++n == e0.size()) at_last = last.state_dict();
  }
  REQUIRE(at_last);
  CHECK(at_last->at("batches").toInt() == static_cast<std::int64_t>(e0.size()));
  auto after_last = make();
  after_last.load_state_dict(*at_last);
  CHECK(batches(after_last).empty());
  CHECK(batches(after_last) == e1);
}

TEST_CASE("the restored loader skips the batches already yielded without reading them", "[data][state]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto make = [&](Counted dataset) {
    return fabric.make_data_loader<torch::data::samplers::SequentialSampler>(
        dataset.map(torch::data::transforms::Stack<>()), torch::data::DataLoaderOptions(5));
  };
  Counted first(20);
  auto run = make(first);
  CHECK(batches(run, 2).size() == 2);
  const auto state = run.state_dict();
  Counted second(20);
  auto resumed = make(second);
  resumed.load_state_dict(state);
  const auto rest = batches(resumed);
  CHECK(rest == std::vector<std::vector<std::int64_t>>{{10, 11, 12, 13, 14}, {15, 16, 17, 18, 19}});
  CHECK(second.reads->load() == 10);  // only the two batches it yielded
}

TEST_CASE("make_data_loader's RandomSampler resumes the epoch's permutation, not a new draw", "[data][state]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto dataset = [] { return indexed(19).map(torch::data::transforms::Stack<>()); };
  torch::manual_seed(8);
  auto reference = fabric.make_data_loader(dataset(), torch::data::DataLoaderOptions(4).workers(2));
  const auto e0 = batches(reference);
  const auto e1 = batches(reference);
  torch::manual_seed(8);
  auto run = fabric.make_data_loader(dataset(), torch::data::DataLoaderOptions(4).workers(2));
  CHECK(batches(run, 2) == std::vector(e0.begin(), e0.begin() + 2));
  const auto state = run.state_dict();
  // The generator as a checkpoint with the random states restores it.
  const at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  torch::manual_seed(1234);  // the resumed process starts with another state
  auto resumed = fabric.make_data_loader(dataset(), torch::data::DataLoaderOptions(4));
  resumed.load_state_dict(state);
  auto generator = at::detail::getDefaultCPUGenerator();
  generator.set_state(rng);
  CHECK(batches(resumed) == tail(e0, 2));  // the saved permutation, drawing nothing from the generator
  CHECK(batches(resumed) == e1);
}

TEST_CASE("loaders with fabric's or a resumable sampler resume; others say what to use", "[data][state]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto dataset = [] { return indexed(12).map(torch::data::transforms::Stack<>()); };
  // setup_dataloaders of a LibTorch loader over fabric's DistributedSampler.
  auto own = [&] {
    return fabric.setup_dataloaders(torch::data::make_data_loader(
        dataset(), fabric::DistributedSampler(12, {.seed = 3}), torch::data::DataLoaderOptions(5).workers(1)));
  };
  auto reference = own();
  const auto e0 = batches(reference);
  const auto e1 = batches(reference);
  auto run = own();
  (void)batches(run);
  (void)batches(run, 1);
  auto resumed = own();
  resumed.load_state_dict(run.state_dict());
  CHECK(batches(resumed) == tail(e1, 1));
  // A sampler of one's own wrapped in ResumableSampler, here LibTorch's DistributedRandomSampler.
  auto wrapped = [&] {
    return fabric.setup_dataloaders(torch::data::make_data_loader(
        dataset(), fabric::ResumableSampler(torch::data::samplers::DistributedRandomSampler(12, 1, 0)),
        torch::data::DataLoaderOptions(5)));
  };
  auto wref = wrapped();
  const auto w0 = batches(wref);
  auto wrun = wrapped();
  (void)batches(wrun, 2);
  auto wresumed = wrapped();
  wresumed.load_state_dict(wrun.state_dict());
  CHECK(batches(wresumed) == tail(w0, 2));
  // LibTorch's loader with LibTorch's sampler hides it: a clear error, saying what to use.
  auto hidden = fabric.setup_dataloaders(make_loader(6, 2));
  CHECK_THROWS_WITH(hidden.state_dict(),
                    ContainsSubstring("DataLoader::state_dict: the loader's sampler (SequentialSampler) cannot be "
                                      "positioned") &&
                        ContainsSubstring("fabric.make_data_loader(...)") &&
                        ContainsSubstring("fabric::ResumableSampler(sampler)"));
  CHECK_THROWS_WITH(hidden.load_state_dict(run.state_dict()),
                    ContainsSubstring("DataLoader::load_state_dict: the loader's sampler (SequentialSampler)"));
}

TEST_CASE("load_state_dict refuses a state of the wrong shape and changes nothing", "[data][state][errors]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto make = [&] { return fabric.dataloader(indexed(9).map(torch::data::transforms::Stack<>()), {.batch_size = 2}); };
  auto run = make();
  (void)batches(run, 2);
  const auto good = run.state_dict();
  auto with = [&](const char* key, c10::IValue value) {
    auto s = good.copy();
    s.insert_or_assign(key, std::move(value));
    return s;
  };
  auto target = make();
  auto without = good.copy();
  (void)without.erase("sampler");
  CHECK_THROWS_WITH(target.load_state_dict(without), ContainsSubstring("expected the key \"sampler\""));
  CHECK_THROWS_WITH(target.load_state_dict(with("epoch", c10::IValue("one"))),
                    ContainsSubstring("expected \"epoch\" to be an integer, found String"));
  CHECK_THROWS_WITH(target.load_state_dict(with("batches", c10::IValue(static_cast<std::int64_t>(-1)))),
                    ContainsSubstring("expected epoch >= 0 and batches >= 0"));
  CHECK_THROWS_WITH(target.load_state_dict(with("sampler", c10::IValue(torch::zeros({2, 2})))),
                    ContainsSubstring("expected \"sampler\" to be a 1-D uint8 tensor"));
  CHECK_THROWS_WITH(target.load_state_dict(with("sampler", c10::IValue(torch::empty({0}, torch::kByte)))),
                    ContainsSubstring("found an empty \"sampler\""));
  CHECK_THROWS_WITH(target.load_state_dict(with("batch_size", c10::IValue(static_cast<std::int64_t>(3)))),
                    ContainsSubstring("expected the batch size of the saved loader, 3, found a loader with batch "
                                      "size 2"));
  auto between = with("mid_epoch", c10::IValue(false));
  CHECK_THROWS_WITH(target.load_state_dict(between), ContainsSubstring("expected batches = 0 between epochs"));
  // Nothing changed: the target starts at the beginning.
  CHECK(batches(target, 1) == std::vector<std::vector<std::int64_t>>{{0, 1}});
}

TEST_CASE("under DDP make_data_loader's sharded loader resumes", "[data][state][ddp]") {
  SoloDDP solo;
  auto& fabric = solo.fabric;
  fabric.seed_everything(6);
  auto make = [&] {
    return fabric.make_data_loader(indexed(15).map(torch::data::transforms::Stack<>()),
                                   torch::data::DataLoaderOptions(4));
  };
  auto reference = make();
  const auto e0 = batches(reference);
  const auto e1 = batches(reference);
  auto run = make();
  (void)batches(run, 3);
  auto resumed = make();
  resumed.load_state_dict(run.state_dict());
  CHECK(batches(resumed) == tail(e0, 3));
  CHECK(batches(resumed) == e1);
}

namespace {

/// A stateful LibTorch dataset (what LibTorch has for Python's IterableDataset): batches until it is done.
struct Countdown : torch::data::datasets::StatefulDataset<Countdown, torch::Tensor, std::size_t> {
  explicit Countdown(int n) : left(n) {}
  c10::optional<torch::Tensor> get_batch(std::size_t /*size*/) override {
    if (left == 0) return c10::nullopt;
    return torch::full({1}, --left);
  }
  c10::optional<std::size_t> size() const override { return c10::nullopt; }
  void reset() override {}
  void save(torch::serialize::OutputArchive& /*archive*/) const override {}
  void load(torch::serialize::InputArchive& /*archive*/) override {}
  int left;
};

/// A sampler of one's own: every index in reverse order. It does not shard.
struct Reversed : torch::data::samplers::Sampler<> {
  explicit Reversed(std::size_t size) : n(size) {}
  void reset(c10::optional<std::size_t> /*new_size*/ = c10::nullopt) override { next_index = n; }
  c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override {
    if (next_index == 0) return c10::nullopt;
    std::vector<std::size_t> batch;
    while (next_index > 0 && batch.size() < batch_size) batch.push_back(--next_index);
    return batch;
  }
  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("next", c10::IValue(static_cast<std::int64_t>(next_index)));
  }
  void load(torch::serialize::InputArchive& archive) override {
    c10::IValue v;
    archive.read("next", v);
    next_index = static_cast<std::size_t>(v.toInt());
  }
  std::size_t n;
  std::size_t next_index = 0;
};

}  // namespace

template <class F>
concept SetsUpNoLoader = requires(F& fabric) {
  fabric.setup_dataloaders();
};

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_unsupported_input
TEST_CASE("setup_dataloaders needs at least one loader", "[data][errors]") {
  // Lightning raises for no loader and for what is not one; in fabric neither compiles: the call without
  // loaders has no overload, and a dataset meets a static_assert
  // (tests/compile_fail/setup_dataloaders_not_a_loader.cpp).
  STATIC_REQUIRE_FALSE(SetsUpNoLoader<fabric::Fabric<fabric::CPU>>);
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_return_type
TEST_CASE("setup_dataloaders returns set-up loaders in the order given; dataset() is the loader's", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto one = fabric.setup_dataloaders(make_loader(2, 1));
  STATIC_REQUIRE(fabric::SetUpLoader<decltype(one)>);
  auto [first, second] = fabric.setup_dataloaders(make_loader(2, 1), make_loader(3, 3));
  STATIC_REQUIRE(fabric::SetUpLoader<decltype(first)> && fabric::SetUpLoader<decltype(second)>);
  CHECK(pass(first) == std::vector<std::int64_t>{0, 1});
  CHECK(pass(second) == std::vector<std::int64_t>{0, 1, 2});
  // Lightning's `dataloader.dataset is dataset0`: the loaders fabric builds give theirs (LibTorch's hide it).
  auto dataset0 = indexed(4);
  auto dataset1 = indexed(5);
  auto a = fabric.make_data_loader(dataset0, 2);
  auto b = fabric.make_data_loader(dataset1, 2);
  CHECK(a.dataset().x.is_same(dataset0.x));
  CHECK(b.dataset().x.is_same(dataset1.x));
  auto mapped = fabric.dataloader(dataset0.map(torch::data::transforms::Stack<>()), {.batch_size = 2});
  STATIC_REQUIRE(
      std::is_same_v<decltype(mapped)::dataset_type, decltype(dataset0.map(torch::data::transforms::Stack<>()))>);
  CHECK(mapped.dataset().size() == dataset0.size());
  CHECK_THROWS_WITH(one.dataset(), ContainsSubstring("a LibTorch loader given to setup_dataloaders hides its sampler "
                                                     "and dataset; build it with fabric.make_data_loader"));
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_raises_for_unknown_custom_args
TEST_CASE("without sharding the loader is kept as it is; under DDP one that cannot shard is refused", "[data][ddp]") {
  // Lightning re-creates a DataLoader subclass to inject its sampler and raises when it cannot; a LibTorch
  // loader's sampler is part of its type, so fabric keeps it on one device and refuses it under DDP.
  fabric::Fabric<fabric::CPU> single;
  auto raw = make_loader(5, 2);
  auto kept = single.setup_dataloaders(*raw);
  CHECK(&kept.loader() == raw.get());
  SoloDDP solo;
  CHECK_THROWS_WITH(solo.fabric.setup_dataloaders(*raw),
                    ContainsSubstring("expected a loader that shards across the 1 processes"));
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_move_to_device
TEST_CASE("the set-up loader's device is the fabric's, or none without move_to_device", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto [a, b] = fabric.setup_dataloaders({.move_to_device = false}, make_loader(2, 1), make_loader(2, 1));
  CHECK_FALSE(a.device().has_value());
  CHECK_FALSE(b.device().has_value());
  auto [c, d] = fabric.setup_dataloaders({.move_to_device = true}, make_loader(2, 1), make_loader(2, 1));
  CHECK(c.device() == fabric.device());
  CHECK(d.device() == fabric.device());
  CHECK_FALSE(
      fabric.dataloader(indexed(2).map(torch::data::transforms::Stack<>()), {}, {.move_to_device = false}).device());
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_distributed_sampler_not_needed
TEST_CASE("without a strategy that shards, use_distributed_sampler leaves loader and sampler alone", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto raw = make_loader(4, 2);
  auto kept = fabric.setup_dataloaders({.use_distributed_sampler = true}, *raw);
  CHECK(&kept.loader() == raw.get());
  fabric::ResumableSampler custom(Reversed(4));
  auto own = fabric.make_data_loader(indexed(4).map(torch::data::transforms::Stack<>()), custom,
                                     torch::data::DataLoaderOptions(2), {.use_distributed_sampler = true});
  CHECK(&own.sampler() == &custom.sampler());
  CHECK(pass(own) == std::vector<std::int64_t>{3, 2, 1, 0});
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_distributed_sampler_shuffle
TEST_CASE("the distributed sampler shuffles as the loader's sampler did, in PyTorch's order", "[data][sampler]") {
  // Rank 0 of 2 over 8 samples (Lightning's numbers, from PyTorch's DistributedSampler): in order without
  // shuffling; seeded with 1 (seed_everything(1)) PyTorch's permutation.
  using fabric::detail::distributed_sampler_for;
  namespace samplers = torch::data::samplers;
  CHECK(distributed_sampler_for<samplers::SequentialSampler>(8, 2, 0, 1).shard_indices(0) ==
        std::vector<std::size_t>{0, 2, 4, 6});
  CHECK(fabric::DistributedSampler(8, {.num_replicas = 2, .rank = 0, .shuffle = false}).shard_indices(0) ==
        std::vector<std::size_t>{0, 2, 4, 6});
  CHECK(distributed_sampler_for<samplers::RandomSampler>(8, 2, 0, 1).shard_indices(0) ==
        std::vector<std::size_t>{5, 2, 7, 1});
  // Through the loaders fabric builds (one process here; tests/dist's shard scenario runs two and three).
  SoloDDP solo;
  solo.fabric.seed_everything(1);
  auto shuffled = solo.fabric.make_data_loader(indexed(8).map(torch::data::transforms::Stack<>()), 8);
  CHECK(shuffled.sampler().options().shuffle);
  CHECK(shuffled.sampler().options().seed == 1);
  auto ordered =
      solo.fabric.make_data_loader<samplers::SequentialSampler>(indexed(8).map(torch::data::transforms::Stack<>()), 8);
  CHECK_FALSE(ordered.sampler().options().shuffle);
  CHECK(pass(ordered) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7});
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_distributed_sampler_parity
TEST_CASE("fabric's loader gives the sequence of a raw loader over the same DistributedSampler", "[data][ddp]") {
  SoloDDP solo;
  auto& fabric = solo.fabric;
  fabric.seed_everything(0);  // Lightning's test runs without PL_GLOBAL_SEED: seed 0
  for (const bool shuffle : {true, false}) {
    for (const std::size_t batch_size : {1u, 2u, 3u}) {
      CAPTURE(shuffle, batch_size);
      auto raw = torch::data::make_data_loader(
          indexed(10).map(torch::data::transforms::Stack<>()),
          fabric::DistributedSampler(10, {.num_replicas = 1, .rank = 0, .shuffle = shuffle, .seed = 0}),
          torch::data::DataLoaderOptions(batch_size));
      auto set_up = shuffle ? fabric.make_data_loader(indexed(10).map(torch::data::transforms::Stack<>()),
                                                      torch::data::DataLoaderOptions(batch_size))
                            : fabric.make_data_loader<torch::data::samplers::SequentialSampler>(
                                  indexed(10).map(torch::data::transforms::Stack<>()),
                                  torch::data::DataLoaderOptions(batch_size));
      for (int epoch = 0; epoch < 2; ++epoch) {
        // Two batches per epoch, as Lightning's fetch_epoch; each new pass is the next epoch.
        CHECK(batches(set_up, 2) == batches(*raw, 2));
      }
      // After the second pass the sampler is at epoch 2 (the one the next pass uses; PyTorch's says 1).
      CHECK(set_up.sampler().epoch() == 2);
    }
  }
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_replace_custom_sampler
// Lightning: tests_fabric/utilities/test_data.py::test_custom_batch_sampler
TEST_CASE("under DDP a sampler of one's own is refused, and kept with use_distributed_sampler off", "[data][ddp]") {
  SoloDDP solo;
  auto& fabric = solo.fabric;
  auto dataset = [] { return indexed(4).map(torch::data::transforms::Stack<>()); };
  CHECK_THROWS_WITH(
      fabric.make_data_loader(dataset(), Reversed(4), torch::data::DataLoaderOptions(2)),
      ContainsSubstring("gives every rank every sample") && ContainsSubstring("{.use_distributed_sampler = false}"));
  CHECK_THROWS_WITH(fabric.make_data_loader(dataset(), fabric::ResumableSampler(Reversed(4)), 2),
                    ContainsSubstring("sampler (") && ContainsSubstring("Reversed) gives every rank every sample"));
  fabric::ResumableSampler custom(Reversed(4));
  auto kept =
      fabric.make_data_loader(dataset(), custom, torch::data::DataLoaderOptions(2), {.use_distributed_sampler = false});
  CHECK(&kept.sampler() == &custom.sampler());
  CHECK(pass(kept) == std::vector<std::int64_t>{3, 2, 1, 0});
}

// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_replace_standard_sampler
TEST_CASE("under DDP LibTorch's default samplers become fabric's DistributedSampler", "[data][ddp]") {
  namespace samplers = torch::data::samplers;
  SoloDDP solo;
  auto random = solo.fabric.make_data_loader(indexed(3).map(torch::data::transforms::Stack<>()), 1);
  auto sequential =
      solo.fabric.make_data_loader<samplers::SequentialSampler>(indexed(3).map(torch::data::transforms::Stack<>()), 1);
  STATIC_REQUIRE(std::is_same_v<decltype(random)::sampler_type, fabric::DistributedSampler>);
  STATIC_REQUIRE(std::is_same_v<decltype(sequential)::sampler_type, fabric::DistributedSampler>);
  CHECK(random.sampler().options().shuffle);
  CHECK_FALSE(sequential.sampler().options().shuffle);
  // A strategy that does not shard keeps LibTorch's sampler.
  fabric::Fabric<fabric::CPU> single;
  auto kept = single.make_data_loader(indexed(3).map(torch::data::transforms::Stack<>()), 1);
  STATIC_REQUIRE(std::is_same_v<decltype(kept)::sampler_type, samplers::RandomSampler>);
}

// Lightning: tests_fabric/utilities/test_data.py::test_has_iterable_dataset
TEST_CASE("has_iterable_dataset_v tells a stateful dataset's loader from a map-style one", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto stateful = fabric.make_data_loader(Countdown(3), 1);
  auto map_style = fabric.make_data_loader(indexed(3).map(torch::data::transforms::Stack<>()), 1);
  STATIC_REQUIRE(fabric::has_iterable_dataset_v<decltype(stateful)>);
  STATIC_REQUIRE_FALSE(fabric::has_iterable_dataset_v<decltype(map_style)>);
  STATIC_REQUIRE(fabric::has_iterable_dataset_v<decltype(stateful)::loader_type>);
  std::vector<double> seen;
  for (auto& batch : stateful) seen.push_back(batch.item<double>());
  CHECK(seen == std::vector<double>{2, 1, 0});
}

// Lightning: tests_fabric/utilities/test_data.py::test_has_len
TEST_CASE("size() is the batches per epoch on this rank, for the loaders fabric builds", "[data]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto stacked = [](std::int64_t n) { return indexed(n).map(torch::data::transforms::Stack<>()); };
  CHECK(fabric.dataloader(stacked(10), {.batch_size = 3}).size() == 4);
  CHECK(fabric.dataloader(stacked(10), {.batch_size = 3, .drop_last = true}).size() == 3);
  CHECK(fabric.make_data_loader(stacked(10), 5).size() == 2);
  CHECK(fabric.make_data_loader<torch::data::samplers::SequentialSampler>(stacked(7), 2).size() == 4);
  // An empty dataset has size 0 (Lightning warns about it; fabric has no warnings to give).
  CHECK(fabric.dataloader(stacked(0), {.batch_size = 2}).size() == 0);
  // A stateful dataset has no length; a LibTorch loader hides its sampler; a sampler of one's own says none.
  CHECK_THROWS_WITH(fabric.make_data_loader(Countdown(2), 1).size(),
                    ContainsSubstring("yields batches until it is done, with no length"));
  CHECK_THROWS_WITH(fabric.setup_dataloaders(make_loader(4, 2)).size(), ContainsSubstring("hides its sampler"));
  CHECK_THROWS_WITH(
      fabric.make_data_loader(stacked(4), fabric::ResumableSampler(Reversed(4)), 2).size(),
      ContainsSubstring("does not say how many indices it yields per pass; give fabric::ResumableSampler(sampler, "
                        "num_samples)"));
  CHECK(fabric.make_data_loader(stacked(4), fabric::ResumableSampler(Reversed(4), 4), 3).size() == 2);
  // Under DDP: this rank's shard.
  SoloDDP solo;
  CHECK(solo.fabric.make_data_loader(stacked(9), 4).size() == 3);
  CHECK(solo.fabric.make_data_loader(stacked(9), 4).sampler().num_samples() == 9);
  // Ranges count by iterating: a restored pass yields fewer batches than size().
  STATIC_REQUIRE_FALSE(std::ranges::sized_range<decltype(fabric.make_data_loader(stacked(4), 2))>);
}

// Lightning: tests_fabric/utilities/test_data.py::test_set_sampler_epoch
TEST_CASE("each pass sets the epoch of a sampler that has set_epoch", "[data][sampler]") {
  // Lightning calls set_epoch(pass) on the sampler where it has one; fabric does so for the loaders it
  // builds: LibTorch's DistributedRandomSampler would repeat its first order otherwise.
  fabric::Fabric<fabric::CPU> fabric;
  auto loader = fabric.make_data_loader(indexed(12).map(torch::data::transforms::Stack<>()),
                                        torch::data::samplers::DistributedRandomSampler(12, 1, 0), 12);
  const auto e0 = batches(loader);
  const auto e1 = batches(loader);
  const auto order = [](std::size_t epoch) {
    torch::data::samplers::DistributedRandomSampler s(12, 1, 0);
    s.set_epoch(epoch);
    s.reset();
    const auto indices = *s.next(12);
    return std::vector<std::vector<std::int64_t>>{std::vector<std::int64_t>(indices.begin(), indices.end())};
  };
  CHECK(e0 == order(0));
  CHECK(e1 == order(1));
  CHECK(e0 != e1);
  // A sampler without set_epoch (RandomSampler) is left to itself; fabric's counts the passes itself.
  auto plain = fabric.make_data_loader(indexed(4).map(torch::data::transforms::Stack<>()), 4);
  CHECK(batches(plain).size() == 1);
  auto own = fabric.dataloader(indexed(4).map(torch::data::transforms::Stack<>()), {.batch_size = 4});
  (void)batches(own);
  CHECK(own.sampler().epoch() == 1);
}

// Lightning: tests_fabric/utilities/test_data.py::test_suggested_max_num_workers
TEST_CASE("suggested_max_num_workers shares the CPUs among the local processes, less one", "[data]") {
  // Lightning's table: (cpus, local world size) -> workers.
  const std::vector<std::tuple<std::size_t, std::size_t, std::size_t>> table{
      {0, 1, 1}, {1, 1, 1}, {2, 1, 1}, {1, 2, 1}, {2, 2, 1}, {3, 2, 1}, {4, 2, 1}, {4, 3, 1}, {4, 1, 3}};
  for (const auto& [cpus, local, expected] : table) {
    CAPTURE(cpus, local);
    CHECK(fabric::suggested_max_num_workers(local, cpus) == expected);
  }
  CHECK(fabric::suggested_max_num_workers(1) >= 1);
}

// Lightning: tests_fabric/utilities/test_data.py::test_suggested_max_num_workers_input_validation
TEST_CASE("suggested_max_num_workers needs at least one local process", "[data][errors]") {
  CHECK_THROWS_WITH(fabric::suggested_max_num_workers(0), ContainsSubstring("expected local_world_size >= 1, found 0"));
  CHECK_THROWS_WITH(fabric::suggested_max_num_workers(0, 4), ContainsSubstring("expected local_world_size >= 1"));
}

namespace {

/// indexed(n) with a random transform: noise drawn from fabric::sample_generator(i), and the batch's seed.
struct Noisy : torch::data::datasets::Dataset<Noisy> {
  explicit Noisy(std::int64_t n) : inner(indexed(n)) {}
  torch::data::Example<> get(std::size_t i) override {
    const auto info = fabric::batch_info();
    if (!info) throw std::runtime_error("no batch_info in a loader fabric built");
    auto noise = torch::randn({1}, fabric::sample_generator(i));
    auto batch_noise = torch::rand({1}, fabric::batch_generator());
    return {torch::cat({inner.get(i).data + noise, batch_noise,
                        torch::tensor({static_cast<float>(info->epoch), static_cast<float>(info->rank)})}),
            inner.get(i).target};
  }
  torch::optional<std::size_t> size() const override { return inner.size(); }
  fabric_test::XY inner;
};

}  // namespace

TEST_CASE("random transforms draw from generators seeded by the sample and batch, whatever the workers",
          "[data][seed]") {
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(13);
  auto run = [&](std::size_t workers) {
    auto loader = fabric.dataloader(Noisy(12).map(torch::data::transforms::Stack<>()),
                                    {.batch_size = 3, .shuffle = true, .num_workers = workers});
    std::vector<torch::Tensor> epochs;
    for (int epoch = 0; epoch < 2; ++epoch) {
      std::vector<torch::Tensor> rows;
      for (auto& batch : loader) rows.push_back(batch.data);
      epochs.push_back(torch::cat(rows));
    }
    return epochs;
  };
  const auto inline_run = run(0);
  const auto threaded = run(3);
  CHECK(torch::equal(inline_run[0], threaded[0]));  // the same numbers, whichever thread loaded a batch
  CHECK(torch::equal(inline_run[1], threaded[1]));
  CHECK(inline_run[0].select(1, 2).eq(0).all().item<bool>());  // batch_info's epoch
  CHECK(inline_run[1].select(1, 2).eq(1).all().item<bool>());
  // A sample's noise depends on the sample and the epoch only: in order, batches of 3 and of 4 give it the same.
  auto in_order = [&](std::size_t batch_size) {
    auto loader = fabric.dataloader(Noisy(12).map(torch::data::transforms::Stack<>()), {.batch_size = batch_size});
    std::vector<torch::Tensor> rows;
    for (auto& batch : loader) rows.push_back(batch.data);
    return torch::cat(rows);
  };
  const auto by3 = in_order(3);
  const auto by4 = in_order(4);
  CHECK(torch::equal(by3.select(1, 0), by4.select(1, 0)));
  CHECK_FALSE(torch::equal(by3.select(1, 1), by4.select(1, 1)));  // the batch's generator follows the batch
  CHECK_FALSE(torch::equal(by3.slice(0, 0, 3).select(1, 1), by3.slice(0, 3, 6).select(1, 1)));
  CHECK_FALSE(
      torch::equal(std::get<0>(inline_run[0].select(1, 0).sort()), std::get<0>(inline_run[1].select(1, 0).sort())));
  CHECK_FALSE(torch::equal(inline_run[0].select(1, 1), inline_run[1].select(1, 1)));
  // Another seed gives other numbers.
  fabric.seed_everything(14);
  CHECK_FALSE(torch::equal(run(0)[0], inline_run[0]));
  // Outside a loader fabric built there is no batch.
  CHECK_FALSE(fabric::batch_info().has_value());
  CHECK_THROWS_WITH(fabric::batch_generator(), ContainsSubstring("expected a call from a dataset's get_batch()"));
  CHECK_THROWS_WITH(fabric::sample_generator(0), ContainsSubstring("expected a call from a dataset's get()"));
}

// Lightning left out: tests_fabric/utilities/test_data.py::test_suggested_max_num_workers_not_triggering_torch_warning - Python warnings machinery (PyTorch's DataLoader warns about too many workers; LibTorch's does not check)
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_multiple_loaders_without_init - Python-only: patches DataLoader subclasses' __init__ to capture their arguments; a LibTorch loader's sampler is part of its type, so fabric builds the loader itself (make_data_loader) instead of re-creating it
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_cleanup_tolerates_concurrent_restore - Python-only: restoring patched __delattr__ of Python classes
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_dataloader - Python-only: re-instantiating DataLoader subclasses from captured constructor arguments
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_extra_kwargs - Python-only: captured default keyword arguments of DataLoader subclasses
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_attrs - Python-only: replaying __setattr__/__delattr__ on a re-created Python DataLoader
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_dunder_methods_restore_methods - Python-only: restoring patched dunder methods of Python classes
// Lightning left out: tests_fabric/utilities/test_data.py::test_replace_value_in_args - Python-only: rewriting captured *args/**kwargs of a DataLoader constructor
// Lightning left out: tests_fabric/utilities/test_data.py::test_update_dataloader_typerror_custom_exception - Python-only: re-creating a DataLoader subclass whose __init__ conflicts with DataLoader's arguments
// Lightning left out: tests_fabric/utilities/test_data.py::test_custom_torch_batch_sampler - Python-only: re-creating a BatchSampler subclass from captured arguments; LibTorch batches in the loader (no batch sampler object)
// Lightning left out: tests_fabric/utilities/test_data.py::test_custom_torch_batch_sampler_doppelganger - Python-only: duck-typed BatchSampler re-creation; LibTorch has no batch sampler object
// Lightning left out: tests_fabric/utilities/test_data.py::test_custom_batch_sampler_no_sampler - Python-only: a BatchSampler subclass without a sampler argument; LibTorch has no batch sampler object
// Lightning left out: tests_fabric/utilities/test_data.py::test_dataloader_kwargs_replacement_with_iterable_dataset - Python-only: the keyword arguments Lightning passes when re-creating a DataLoader
// Lightning left out: tests_fabric/utilities/test_data.py::test_dataloader_kwargs_replacement_with_array_default_comparison - Python-only: comparing NumPy attributes with constructor defaults when re-creating a DataLoader
// Lightning left out: tests_fabric/utilities/test_data.py::test_state - Python-only: AttributeDict (a dict with attribute access)
// Lightning left out: tests_fabric/test_fabric.py::test_setup_dataloaders_captures_dataloader_arguments - Python-only: launch() patches DataLoader constructors to capture their arguments; fabric.make_data_loader builds the loader from them itself

// ---- Lightning's test_wrappers.py: the loader wrapper -------------------------------------------

// Lightning: tests_fabric/test_wrappers.py::test_fabric_dataloader_iterator
TEST_CASE("iterating a set-up loader yields the loader's batches and ends with it", "[data][wrappers]") {
  fabric::Fabric<fabric::CPU> fabric;
  auto raw = make_loader(5, 2);
  auto loader = fabric.setup_dataloaders(make_loader(5, 2));
  std::vector<std::vector<std::int64_t>> want;
  std::vector<std::vector<std::int64_t>> got;
  for (auto& batch : *raw) want.push_back(ids(batch));
  for (auto& batch : loader) got.push_back(ids(batch));
  CHECK(want.size() == 3);
  CHECK(got == want);
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_dataloader_device_placement
TEST_CASE("a set-up loader puts every tensor of a batch on the fabric's device", "[data][wrappers]") {
  // NOTE: Lightning's batches of tensors and of dicts; a LibTorch loader's batches here are Examples (data and
  // target), and any nesting of standard containers moves as fabric::to_device moves it (engine_test.cpp).
  fabric::Fabric<fabric::CPU> fabric;
  auto loader = fabric.setup_dataloaders(make_loader(4, 2));
  std::vector<torch::Tensor> seen;
  for (auto& batch : loader) {
    CHECK(batch.data.device() == fabric.device());
    CHECK(batch.target.device() == fabric.device());
    seen.push_back(batch.target);
  }
  REQUIRE(seen.size() == 2);
  CHECK(torch::equal(seen[1], torch::tensor({2, 3}).to(seen[1].dtype())));
}

// Lightning: tests_fabric/test_wrappers.py::test_fabric_dataloader_distributed_sampler_set_epoch
TEST_CASE("each pass over a set-up loader starts its DistributedSampler's next epoch", "[data][wrappers][sampler]") {
  // NOTE: Lightning's wrapper calls set_epoch(n) at the n-th iter(); fabric's DistributedSampler counts
  // its passes itself (each reset is the next epoch), so every pass reshuffles as PyTorch's would.
  fabric::Fabric<fabric::CPU> fabric;
  const fabric::DistributedSampler::Options options{.num_replicas = 2, .rank = 0, .shuffle = true, .seed = 7};
  auto loader = fabric.setup_dataloaders(torch::data::make_data_loader(
      indexed(12).map(torch::data::transforms::Stack<>()), fabric::DistributedSampler(12, options),
      torch::data::DataLoaderOptions().batch_size(1)));
  fabric::DistributedSampler reference(12, options);
  std::set<std::vector<std::int64_t>> orders;
  for (int epoch = 0; epoch < 3; ++epoch) {
    reference.reset();
    std::vector<std::int64_t> want;
    while (auto batch = reference.next(1)) {
      for (auto i : *batch) want.push_back(static_cast<std::int64_t>(i));
    }
    const auto got = pass(loader);
    CHECK(got == want);
    orders.insert(got);
  }
  CHECK(orders.size() == 3);  // a new order each epoch
}
