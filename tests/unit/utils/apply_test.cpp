// Applying functions to nested data: fabric::to_device over tensors, modules, nested containers and
// objects that move themselves, and fabric::convert_tensors_to_scalars.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

/// Lightning's TensorObject: moves its tensor in to(device), returning itself or (forgetting to) nothing.
struct InPlace {
  torch::Tensor tensor;
  int moves = 0;
  void to(const c10::Device& device) {
    tensor = tensor.to(device);
    ++moves;
  }
};
struct Returning {
  torch::Tensor tensor;
  int moves = 0;
  Returning to(const c10::Device& device) const { return {tensor.to(device), moves + 1}; }
};

}  // namespace

// Lightning: tests_fabric/utilities/test_apply_func.py::test_wrongly_implemented_transferable_data_type
TEST_CASE("to_device moves objects that have to(device), whether or not to returns them", "[apply]") {
  const c10::Device cpu(torch::kCPU);
  // A to() that returns nothing (Lightning's should_return=False): the object itself comes back, moved.
  const auto in_place = fabric::to_device(InPlace{torch::tensor(0.5)}, cpu);
  CHECK(in_place.moves == 1);
  CHECK(in_place.tensor.item<double>() == 0.5);
  // A to() that returns the object: its result is kept.
  const auto returned = fabric::to_device(Returning{torch::tensor(0.1)}, cpu);
  CHECK(returned.moves == 1);
  // Inside containers too, next to tensors and plain values.
  auto nested =
      fabric::to_device(std::tuple{std::vector<InPlace>(2, InPlace{torch::ones(1)}), 3, torch::zeros(2)}, cpu);
  CHECK(std::get<0>(nested)[1].moves == 1);
  CHECK(std::get<1>(nested) == 3);
}

// Lightning: tests_fabric/utilities/test_apply_func.py::test_convert_tensors_to_scalars
TEST_CASE("convert_tensors_to_scalars turns one-element tensors into numbers and keeps the rest", "[apply]") {
  using namespace std::string_literals;
  CHECK(fabric::convert_tensors_to_scalars("string"s) == "string");
  CHECK(fabric::convert_tensors_to_scalars(1) == 1);
  CHECK(fabric::convert_tensors_to_scalars(true) == true);
  CHECK(fabric::convert_tensors_to_scalars(std::map<std::string, double>{{"scalar", 1.0}}) ==
        std::map<std::string, double>{{"scalar", 1.0}});
  // A tensor becomes a double (C++ has one type for the result: a Python number there), in a new container.
  const auto result =
      fabric::convert_tensors_to_scalars(std::map<std::string, torch::Tensor>{{"tensor", torch::tensor(2.0)}});
  STATIC_REQUIRE(std::is_same_v<std::remove_cvref_t<decltype(result)>, std::map<std::string, double>>);
  CHECK(result.at("tensor") == 2.0);
  // One element of any shape; the input is left as it was.
  const std::map<std::string, torch::Tensor> data{{"tensor", torch::tensor({2.0})}};
  CHECK(fabric::convert_tensors_to_scalars(data).at("tensor") == 2.0);
  CHECK(data.at("tensor").dim() == 1);
  // Other nestings, and the values that are not tensors.
  const auto mixed = fabric::convert_tensors_to_scalars(
      std::tuple{std::vector{torch::tensor(1), torch::tensor(2.5)}, std::optional{torch::tensor(3)}, "x"s});
  CHECK(std::get<0>(mixed) == std::vector<double>{1.0, 2.5});
  CHECK(std::get<1>(mixed) == std::optional<double>(3.0));
  CHECK(std::get<2>(mixed) == "x");
  CHECK_THROWS_WITH(
      fabric::convert_tensors_to_scalars(std::map<std::string, torch::Tensor>{{"tensor", torch::tensor({1, 2, 3})}}),
      ContainsSubstring("does not contain a single element") && ContainsSubstring("found 3"));
}

// Lightning: tests_fabric/test_fabric.py::test_to_device
TEST_CASE("Fabric::to_device moves modules, tensors and collections to the fabric's device", "[apply]") {
  fabric::Fabric<fabric::CPU> fabric;
  const c10::Device expected = fabric.device();
  torch::nn::Linear module(2, 3);
  auto& moved = fabric.to_device(module);
  CHECK(&moved == &module);  // in place, as Lightning returns the module
  for (const auto& p : module->parameters()) CHECK(p.device() == expected);
  CHECK(fabric.to_device(torch::rand({2, 2})).device() == expected);
  // A collection with a tensor and a number (Lightning's {"data": tensor, "int": 1}).
  auto collection = fabric.to_device(std::pair{std::map<std::string, torch::Tensor>{{"data", torch::rand({2, 2})}}, 1});
  CHECK(collection.first.at("data").device() == expected);
  CHECK(collection.second == 1);
  if (torch::cuda::is_available()) {
    fabric::Fabric<fabric::CUDA> gpu;
    CHECK(gpu.to_device(torch::rand({2})).device() == c10::Device(torch::kCUDA, 0));
  }
}
