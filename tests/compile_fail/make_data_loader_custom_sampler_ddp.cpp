// Under DDP make_data_loader<Sampler> replaces LibTorch's default samplers only; another one must shard itself.
// EXPECT: fabric: make_data_loader<Sampler> under a distributed strategy shards RandomSampler and SequentialSampler
#include <fabric/distributed.hpp>

#include <torch/data.h>

#include <cstddef>
#include <vector>

struct EveryOther : torch::data::samplers::Sampler<> {
  explicit EveryOther(std::size_t size) : size_(size) {}
  void reset(c10::optional<std::size_t> /*new_size*/ = c10::nullopt) override { next_ = 0; }
  c10::optional<std::vector<std::size_t>> next(std::size_t /*batch_size*/) override {
    if (next_ >= size_) return c10::nullopt;
    std::vector<std::size_t> batch{next_};
    next_ += 2;
    return batch;
  }
  void save(torch::serialize::OutputArchive& /*archive*/) const override {}
  void load(torch::serialize::InputArchive& /*archive*/) override {}
  std::size_t size_;
  std::size_t next_ = 0;
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric;
  fabric.launch();
  auto dataset = torch::data::datasets::TensorDataset(torch::arange(8));
  auto loader = fabric.make_data_loader<EveryOther>(std::move(dataset), 2);
  return 0;
}
