// fabric::nn::Linear against torch::nn::Linear: the same initialisation, values, gradients and
// checkpoints in float32, and one GEMM with the bias inside for inputs of any rank.
// (Lightning has no Linear of its own: PyTorch's nn.Linear already calls at::linear.)
#include <fabric/fabric.hpp>

#include "unit/autograd_graph.hpp"

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

using fabric_test::graph_of;

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

namespace {

/// The largest distance of a float32 gradient from a float64 reference.
double distance(const at::Tensor& grad, const at::Tensor& reference) {
  return (grad.to(torch::kDouble) - reference).abs().max().item<double>();
}

/// Runs the mixed-precision backward (fabric::nn::Linear) and autocast's own (at::linear) on the same layer,
/// input and upstream gradient under autocast on `device`, and checks what the mixed one promises: the same
/// forward bit for bit, the same input gradient, float32 weight and bias gradients that are at least as close
/// to the float64 products of the rounded operands as autocast's, and no cast node for the weight.
void check_mixed_backward(const torch::Device& device, c10::ScalarType dtype, std::int64_t rows) {
  for (const bool bias : {true, false}) {
    for (const std::vector<std::int64_t>& shape : {std::vector<std::int64_t>{rows, 24}, {4, rows / 4, 24}, {24}}) {
      CAPTURE(bias, shape, device.str());
      torch::manual_seed(9);
      fabric::nn::Linear fast(torch::nn::LinearOptions(24, 40).bias(bias));
      fast->to(device);
      const at::Tensor x = torch::randn(shape, device).requires_grad_();
      const at::Tensor x_ref = x.detach().clone().requires_grad_();
      std::vector<std::int64_t> out_shape = shape;
      out_shape.back() = 40;
      // Values whose row sums and products round visibly in the autocast dtype.
      const at::Tensor upstream = (torch::randn(out_shape, device) + 3.0).to(dtype);
      at::Tensor y, y_ref;
      std::set<std::string> graph;
      {
        fabric::AutocastGuard autocast(device.type(), dtype);
        y = fast(x);
        graph = graph_of(y);
        y_ref = at::linear(x_ref, fast->weight, fast->bias);
      }
      CAPTURE(graph);
      CHECK(graph.count("torch::autograd::CppNode<fabric::nn::detail::MixedLinear>") == 1);
      CHECK(graph.count("AddmmBackward0") == 0);
      REQUIRE(y.scalar_type() == dtype);
      // NOTE: for a 1-D input at::linear runs a matrix-vector product and a separate bias add (two roundings).
      const bool folded = shape.size() > 1;
      if (folded) CHECK(torch::equal(y, y_ref));
      CHECK(torch::allclose(y.to(torch::kFloat), y_ref.to(torch::kFloat), 1.0 / 64, 1e-2));
      y.backward(upstream);
      const at::Tensor weight_grad = fast->weight.grad().clone();
      const at::Tensor bias_grad = bias ? fast->bias.grad().clone() : at::Tensor();
      fast->zero_grad();
      y_ref.backward(upstream);
      if (folded) CHECK(torch::equal(x.grad(), x_ref.grad()));
      CHECK(torch::allclose(x.grad(), x_ref.grad(), 1.0 / 64, 1e-2));
      REQUIRE(weight_grad.scalar_type() == torch::kFloat);
      // The exact gradients of the operands autocast rounded: float64 products of the rounded values.
      const at::Tensor g64 = upstream.to(torch::kDouble).reshape({-1, 40});
      const at::Tensor x64 = x.detach().to(dtype).to(torch::kDouble).reshape({-1, 24});
      const at::Tensor weight_exact = g64.t().mm(x64);
      const double mixed = distance(weight_grad, weight_exact), autocast = distance(fast->weight.grad(), weight_exact);
      CAPTURE(mixed, autocast);
      // Where the GEMM writes float32 the product is not rounded to the autocast dtype at all; elsewhere it
      // is rounded once, as autocast rounds it (the operands' order differs: a rounding apart at most).
      if (fabric::nn::detail::mm_with_out_dtype<at::Tensor> && device.is_cuda()) CHECK(mixed * 16 < autocast);
      CHECK(torch::allclose(weight_grad, fast->weight.grad(), 1.0 / 64, 1e-2));
      if (bias) {
        REQUIRE(bias_grad.scalar_type() == torch::kFloat);
        const at::Tensor bias_exact = g64.sum(0);
        const double bias_mixed = distance(bias_grad, bias_exact),
                     bias_autocast = distance(fast->bias.grad(), bias_exact);
        CAPTURE(bias_mixed, bias_autocast);
        // A float32 sum against a sum rounded to the autocast dtype: orders of magnitude apart once rows
        // add up (2^-8 of ~3 x rows for bfloat16).
        if (shape.size() > 1) CHECK(bias_mixed * 100 < bias_autocast);
        CHECK(bias_mixed <= 1e-4 * bias_exact.abs().max().item<double>());
      }
    }
  }
}

}  // namespace

TEST_CASE("fabric::nn::Linear under autocast: float32 weight and bias gradients, the forward of at::linear",
          "[nn][precision]") {
  check_mixed_backward(torch::kCPU, torch::kBFloat16, 512);
}

TEST_CASE("fabric::nn::Linear under autocast keeps at::linear where the mixed backward does not apply",
          "[nn][precision]") {
  torch::manual_seed(4);
  fabric::nn::Linear fast(8, 6);
  const at::Tensor x = torch::randn({3, 8});  // no gradient: the only casts with a backward are the parameters'
  fabric::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
  // The mixed backward unless switched off, and a clone keeps the choice.
  CHECK(fast->mixed_backward());
  auto graph = graph_of(fast(x));
  CAPTURE(graph);
  CHECK(graph.count("torch::autograd::CppNode<fabric::nn::detail::MixedLinear>") == 1);
  CHECK(graph.count("ToCopyBackward0") == 0);
  fast->mixed_backward(false);
  CHECK(!std::dynamic_pointer_cast<fabric::nn::LinearImpl>(fast->clone())->mixed_backward());
  graph = graph_of(fast(x));
  CHECK(graph.count("AddmmBackward0") == 1);
  CHECK(graph.count("ToCopyBackward0") == 1);  // autocast's casts of the weight and the bias
  fast->mixed_backward(true);
  // For bfloat16 weights (fabric::BF16Master's): at::linear.
  fabric::nn::Linear low(8, 6);
  low->to(torch::kBFloat16);
  graph = graph_of(low(x));
  CHECK(graph.count("AddmmBackward0") == 1);
  CHECK(graph.count("torch::autograd::CppNode<fabric::nn::detail::MixedLinear>") == 0);
  // A weight that does not require grad (frozen): at::linear.
  fast->weight.requires_grad_(false);
  CHECK(graph_of(fast(x)).count("AddmmBackward0") == 1);
}

TEST_CASE("fabric::nn::Linear's mixed backward refuses a double backward; mixed_backward(false) differentiates twice",
          "[nn][precision][errors]") {
  torch::manual_seed(6);
  fabric::nn::Linear fast(5, 3);
  const at::Tensor x = torch::randn({4, 5}).requires_grad_();
  const auto gradient_norm = [&] {
    fabric::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
    const at::Tensor loss = fast(x).to(torch::kFloat).pow(2).sum();
    const auto grads = torch::autograd::grad({loss}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    return grads[0].pow(2).sum();
  };
  CHECK_THROWS_AS(gradient_norm(), fabric::Error);
  CHECK_THROWS_WITH(gradient_norm(), ContainsSubstring("expected a backward without create_graph under autocast") &&
                                         ContainsSubstring("mixed_backward(false)"));
  fast->mixed_backward(false);
  const at::Tensor penalty = gradient_norm();
  penalty.backward();
  REQUIRE(fast->weight.grad().defined());
  CHECK(fast->weight.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("fabric::nn::Linear under CUDA autocast: float32 gradients from the GEMM", "[nn][precision][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  INFO("at::mm(a, b, out_dtype) in this LibTorch: " << fabric::nn::detail::mm_with_out_dtype<at::Tensor>);
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    CAPTURE(dtype);
    check_mixed_backward(torch::Device(torch::kCUDA, 0), dtype, 1024);
  }
}

TEST_CASE("fabric::nn::Linear's fused_kernels choice is kept by clone(); the column-sum kernels need CUDA",
          "[nn][errors]") {
  fabric::nn::Linear fast(4, 3);
  CHECK(fast->fused_kernels());
  fast->fused_kernels(false);
  const auto copy = std::dynamic_pointer_cast<fabric::nn::LinearImpl>(fast->clone());
  REQUIRE(copy != nullptr);
  CHECK(!copy->fused_kernels());
  CHECK_THAT(fabric::detail::column_sum_kernel_unavailable(torch::ones({2, 3})),
             ContainsSubstring("not on a CUDA device"));
  // Without CUDA the mixed backward sums with ATen whatever the choice: the same float32 gradient.
  const at::Tensor x = torch::randn({6, 4});
  fabric::AutocastGuard autocast(torch::kCPU, torch::kBFloat16);
  std::vector<at::Tensor> grads;
  for (const bool fused : {true, false}) {
    fast->zero_grad();
    fast->fused_kernels(fused);
    fast(x).sum().backward();
    grads.push_back(fast->bias.grad().clone());
  }
  CHECK(grads[0].scalar_type() == torch::kFloat);
  CHECK(torch::equal(grads[0], grads[1]));
}

TEST_CASE("fabric::detail::column_sum_float on CUDA: float32 sums of float32, bfloat16, float16 columns",
          "[nn][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  const std::string why = fabric::detail::column_sum_kernel_unavailable(torch::zeros({1, 8}, cuda));
  INFO("column-sum kernels: " << (why.empty() ? "available" : why));
  REQUIRE(why.empty());
  CHECK_THAT(fabric::detail::column_sum_kernel_unavailable(torch::zeros({8, 8}, cuda).t()),
             ContainsSubstring("contiguous matrix"));
  CHECK_THAT(fabric::detail::column_sum_kernel_unavailable(torch::zeros({8, 8}, cuda).to(torch::kDouble)),
             ContainsSubstring("no kernel for Double"));
  // GPT-2's shapes (vectorised), odd widths (a column at a time), one row, no rows, many rows a chunk.
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes{
      {8192, 768}, {8192, 3072}, {1000, 2304}, {37, 13}, {1, 5}, {0, 8}, {65, 1}, {100000, 24}};
  for (const auto& [rows, cols] : shapes) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      CAPTURE(rows, cols, dtype);
      torch::manual_seed(11);
      const at::Tensor g = (torch::randn({rows, cols}, cuda) + 2.0).to(dtype);
      const at::Tensor got = fabric::detail::column_sum_float(g);
      REQUIRE(got.scalar_type() == torch::kFloat);
      REQUIRE(got.sizes() == c10::IntArrayRef{cols});
      const at::Tensor exact = g.to(torch::kDouble).sum(0);
      // A float32 sum of `rows` values of about 2 in any order: within rows x 2^-24 x the sum's magnitude.
      const double bound = 4.0 * std::max<double>(static_cast<double>(rows), 1.0) * 6e-8 *
                               (exact.numel() > 0 ? exact.abs().max().item<double>() : 0.0) +
                           1e-6;
      CHECK((got.to(torch::kDouble) - exact).abs().max().item<double>() <= bound);
      // The same bits on every run.
      CHECK(torch::equal(got, fabric::detail::column_sum_float(g)));
    }
  }
  // A contiguous matrix that does not start on 16 bytes (a column at a time) sums as an aligned copy does.
  const at::Tensor storage = torch::randn({1 + 300 * 64}, cuda).to(torch::kBFloat16);
  const at::Tensor shifted = storage.narrow(0, 1, 300 * 64).view({300, 64});
  REQUIRE(shifted.is_contiguous());
  CHECK(torch::allclose(fabric::detail::column_sum_float(shifted), fabric::detail::column_sum_float(shifted.clone()),
                        1e-5, 1e-5));
}

TEST_CASE("fabric::nn::Linear on CUDA sums the bias gradient with the column-sum kernels unless told not to",
          "[nn][precision][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(12);
  fabric::nn::Linear fast(64, 768);
  fast->to(cuda);
  const at::Tensor x = torch::randn({4, 512, 64}, cuda);
  const at::Tensor upstream = torch::randn({4, 512, 768}, cuda).to(torch::kBFloat16);
  const auto bias_grad = [&](bool fused) {
    fast->zero_grad();
    fast->fused_kernels(fused);
    fabric::AutocastGuard autocast(torch::kCUDA, torch::kBFloat16);
    fast(x).backward(upstream);
    return fast->bias.grad().clone();
  };
  const at::Tensor kernel = bias_grad(true), again = bias_grad(true), aten = bias_grad(false);
  const at::Tensor g = upstream.reshape({-1, 768});
  CHECK(torch::equal(kernel, fabric::detail::column_sum_float(g)));
  CHECK(torch::equal(kernel, again));
  CHECK(torch::equal(aten, g.sum({0}, false, torch::kFloat)));
  CHECK(torch::allclose(kernel, aten, 1e-5, 1e-4));
}
