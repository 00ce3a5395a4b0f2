// fabric::nn::Linear against torch::nn::Linear: the same initialisation, values, gradients and
// checkpoints in float32, and one GEMM with the bias inside for inputs of any rank.
// (Lightning has no Linear of its own: PyTorch's nn.Linear already calls at::linear.)
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <set>
#include <sstream>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

/// Returns the names of the autograd nodes that produced y.
std::set<std::string> graph_of(const at::Tensor& y) {
  std::set<std::string> names;
  std::vector<std::shared_ptr<torch::autograd::Node>> todo{y.grad_fn()};
  while (!todo.empty()) {
    auto node = todo.back();
    todo.pop_back();
    if (!node || !names.insert(node->name()).second) continue;
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function);
  }
  return names;
}

/// Builds a torch::nn::Linear and a fabric::nn::Linear from the same seed.
template <class... Args>
std::pair<torch::nn::Linear, fabric::nn::Linear> twins(Args... args) {
  torch::manual_seed(7);
  torch::nn::Linear reference(args...);
  torch::manual_seed(7);
  fabric::nn::Linear fast(args...);
  return {reference, fast};
}

}  // namespace

TEST_CASE("fabric::nn::Linear initialises, computes and differentiates as torch::nn::Linear in fp32", "[nn]") {
  for (const bool bias : {true, false}) {
    auto [reference, fast] = twins(torch::nn::LinearOptions(12, 5).bias(bias));
    CHECK(torch::equal(reference->weight, fast->weight));
    CHECK(reference->bias.defined() == bias);
    CHECK(fast->bias.defined() == bias);
    if (bias) CHECK(torch::equal(reference->bias, fast->bias));
    for (const std::vector<std::int64_t>& shape : {std::vector<std::int64_t>{6, 12}, {3, 4, 12}, {2, 3, 2, 12}, {12}}) {
      CAPTURE(bias, shape);
      torch::manual_seed(3);
      const at::Tensor x = torch::randn(shape);
      const at::Tensor x_ref = x.clone().requires_grad_(), x_fast = x.clone().requires_grad_();
      const at::Tensor y_ref = reference(x_ref), y_fast = fast(x_fast);
      REQUIRE(y_ref.sizes() == y_fast.sizes());
      // NOTE: one addmm against a matmul and an add: the same products, summed in the same order here.
      CHECK(torch::allclose(y_ref, y_fast, /*rtol=*/1e-6, /*atol=*/1e-6));
      const at::Tensor g = torch::randn_like(y_ref);
      reference->zero_grad();
      fast->zero_grad();
      y_ref.backward(g);
      y_fast.backward(g);
      CHECK(torch::allclose(x_ref.grad(), x_fast.grad(), 1e-6, 1e-6));
      CHECK(torch::allclose(reference->weight.grad(), fast->weight.grad(), 1e-5, 1e-6));
      if (bias) CHECK(torch::allclose(reference->bias.grad(), fast->bias.grad(), 1e-5, 1e-6));
    }
  }
}

TEST_CASE("fabric::nn::Linear keeps the bias in the GEMM for a 3-D input, torch::nn::Linear does not", "[nn]") {
  auto [reference, fast] = twins(16, 8);
  const at::Tensor x = torch::randn({2, 5, 16}).requires_grad_();
  const auto fast_graph = graph_of(fast(x));
  CAPTURE(fast_graph);
  CHECK(fast_graph.count("AddmmBackward0") == 1);
  CHECK(fast_graph.count("AddBackward0") == 0);
  // The trap itself: LibTorch's functional linear runs a matmul and then adds the bias.
  const auto reference_graph = graph_of(reference(x));
  CAPTURE(reference_graph);
  CHECK(reference_graph.count("AddBackward0") == 1);
}

TEST_CASE("fabric::nn::Linear and torch::nn::Linear read each other's checkpoints", "[nn]") {
  auto [reference, fast] = twins(6, 4);
  std::vector<std::string> reference_keys, fast_keys;
  for (const auto& p : reference->named_parameters()) reference_keys.push_back(p.key());
  for (const auto& p : fast->named_parameters()) fast_keys.push_back(p.key());
  CHECK(reference_keys == std::vector<std::string>{"weight", "bias"});
  CHECK(fast_keys == reference_keys);

  torch::manual_seed(11);
  torch::nn::Linear other_reference(6, 4);
  fabric::nn::Linear other_fast(6, 4);
  {
    std::stringstream file;
    torch::save(fast, file);  // fabric -> torch
    torch::load(other_reference, file);
  }
  CHECK(torch::equal(other_reference->weight, fast->weight));
  CHECK(torch::equal(other_reference->bias, fast->bias));
  {
    std::stringstream file;
    torch::save(reference, file);  // torch -> fabric
    torch::load(other_fast, file);
  }
  CHECK(torch::equal(other_fast->weight, reference->weight));
  CHECK(torch::equal(other_fast->bias, reference->bias));
}

TEST_CASE("fabric::nn::Linear is a torch::nn::LinearImpl that clones and prints as itself", "[nn]") {
  fabric::nn::Linear fc(torch::nn::LinearOptions(4, 2).bias(false));
  torch::nn::Sequential seq(fabric::nn::Linear(3, 4), torch::nn::ReLU(), fc);
  CHECK(seq->forward(torch::randn({5, 3})).sizes() == torch::IntArrayRef{5, 2});
  CHECK(seq[0]->as<torch::nn::Linear>() != nullptr);
  CHECK(seq[0]->as<fabric::nn::Linear>() != nullptr);

  fc->eval();
  const auto copy = std::dynamic_pointer_cast<fabric::nn::LinearImpl>(fc->clone());
  REQUIRE(copy != nullptr);
  CHECK(torch::equal(copy->weight, fc->weight));
  CHECK(copy->weight.data_ptr() != fc->weight.data_ptr());
  CHECK(!copy->bias.defined());
  CHECK(!copy->is_training());
  CHECK(copy->parameters().size() == 1);

  std::ostringstream printed;
  printed << *fc;
  CHECK(printed.str() == "fabric::nn::Linear(in_features=4, out_features=2, bias=false)");
}

TEST_CASE("fabric::nn::Linear under bf16-mixed: one bfloat16 GEMM, close to float32", "[nn][precision]") {
  torch::manual_seed(5);
  torch::nn::Sequential net(fabric::nn::Linear(16, 32), torch::nn::GELU(), fabric::nn::Linear(32, 8));
  const at::Tensor x = torch::randn({2, 7, 16});
  const at::Tensor expected = net->forward(x);
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  auto model = fabric.setup(net);
  const at::Tensor y = model(x);
  CHECK(y.scalar_type() == torch::kFloat);  // the default output conversion
  {
    auto autocast = fabric.autocast();
    CHECK(net->forward(x).scalar_type() == torch::kBFloat16);
  }
  CHECK(torch::allclose(y, expected, /*rtol=*/0.05, /*atol=*/0.05));
}
