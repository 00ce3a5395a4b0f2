// Lightning: tests_fabric/test_fabric.py::test_setup_dataloaders_twice_fails
// Passing a set-up loader to setup_dataloaders again is rejected at compile time (Lightning raises).
// EXPECT: fabric: this data loader is already set up
#include <fabric/fabric.hpp>

#include <torch/data/dataloader.h>
#include <torch/data/datasets/tensor.h>
#include <torch/data/samplers/sequential.h>
#include <torch/types.h>

int main() {
  fabric::Fabric<> fabric;
  auto loader = fabric.setup_dataloaders(torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
      torch::data::datasets::TensorDataset(torch::ones({2, 1})), 1));
  auto twice = fabric.setup_dataloaders(loader);
  return 0;
}
