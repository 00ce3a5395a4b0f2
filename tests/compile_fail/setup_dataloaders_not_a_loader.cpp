// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_unsupported_input
// Passing setup_dataloaders what is
// not a loader (here the dataset instead of the loader built from it) is rejected at compile time.
// EXPECT: fabric: setup_dataloaders takes LibTorch data loaders
#include <fabric/fabric.hpp>

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstddef>

struct Squares : torch::data::datasets::Dataset<Squares> {
  torch::data::Example<> get(std::size_t i) override {
    const auto x = torch::full({1}, static_cast<double>(i));
    return {x, x * x};
  }
  c10::optional<std::size_t> size() const override { return 4; }
};

int main() {
  fabric::Fabric<> fabric;
  auto loader = fabric.setup_dataloaders(Squares{});
  return 0;
}
