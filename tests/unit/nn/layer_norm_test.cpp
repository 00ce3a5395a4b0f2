// fabric::nn::LayerNorm against torch::nn::LayerNorm: the same initialisation, checkpoints and (on the CPU,
// where it is torch's forward) values; on CUDA fabric's fused kernels against at::layer_norm in every dtype,
// under autocast, deterministic, and the refusals.
// (Lightning has no LayerNorm of its own: it is PyTorch's nn.LayerNorm.)
#include <fabric/fabric.hpp>

#include "unit/autograd_graph.hpp"

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

using fabric_test::graph_of;

const std::string fused_node = "torch::autograd::CppNode<fabric::nn::detail::FusedLayerNorm>";

/// One forward and backward: the output, and the gradients of the input, the weight and the bias.
struct Run {
  at::Tensor y, dx, dw, db;
  std::set<std::string> nodes;
};

template <class Layer>
Run run(Layer& layer, const at::Tensor& input, const at::Tensor& upstream) {
  Run out;
  const at::Tensor x = input.detach().clone().requires_grad_();
  layer->zero_grad();
  out.y = layer(x);
  out.nodes = graph_of(out.y);
  out.y.backward(upstream.to(out.y.scalar_type()));
  out.dx = x.grad();
  if (layer->weight.defined()) out.dw = layer->weight.grad().clone();
  if (layer->bias.defined()) out.db = layer->bias.grad().clone();
  return out;
}

bool close(const at::Tensor& a, const at::Tensor& b, double rtol, double atol) {
  return torch::allclose(a.to(torch::kFloat), b.to(torch::kFloat), rtol, atol);
}

}  // namespace

TEST_CASE("fabric::nn::LayerNorm initialises, computes and differentiates as torch::nn::LayerNorm on the CPU", "[nn]") {
  for (const bool affine : {true, false}) {
    CAPTURE(affine);
    const auto options = torch::nn::LayerNormOptions({5, 6}).elementwise_affine(affine).eps(1e-3);
    torch::nn::LayerNorm reference(options);
    fabric::nn::LayerNorm fast(options);
    REQUIRE(reference->parameters().size() == fast->parameters().size());
    if (affine) {
      torch::NoGradGuard no_grad;
      fast->weight.uniform_();
      fast->bias.uniform_();
      reference->weight.copy_(fast->weight);
      reference->bias.copy_(fast->bias);
    }
    torch::manual_seed(2);
    const at::Tensor x = torch::randn({3, 4, 5, 6}), g = torch::randn({3, 4, 5, 6});
    const Run a = run(reference, x, g), b = run(fast, x, g);
    CHECK(torch::equal(a.y, b.y));
    CHECK(torch::equal(a.dx, b.dx));
    if (affine) {
      CHECK(torch::equal(a.dw, b.dw));
      CHECK(torch::equal(a.db, b.db));
    }
    CHECK(b.nodes.count(fused_node) == 0);
  }
  CHECK(fabric::detail::layer_norm_kernel_unavailable(torch::zeros({2, 4}), torch::kFloat, 4, {}, {}) ==
        "the input is not on a CUDA device");
}

TEST_CASE("fabric::nn::LayerNorm is a torch::nn::LayerNormImpl that loads torch's checkpoints, clones and prints",
          "[nn]") {
  fabric::nn::LayerNorm fast(torch::nn::LayerNormOptions({4}));
  torch::nn::LayerNorm reference(torch::nn::LayerNormOptions({4}));
  {
    torch::NoGradGuard no_grad;
    reference->weight.uniform_();
    reference->bias.uniform_();
  }
  std::stringstream file;
  torch::save(reference, file);
  torch::load(fast, file);
  CHECK(torch::equal(fast->weight, reference->weight));
  CHECK(torch::equal(fast->bias, reference->bias));
  torch::nn::Sequential seq(fast);
  CHECK(seq[0]->as<torch::nn::LayerNorm>() != nullptr);
  CHECK(seq[0]->as<fabric::nn::LayerNorm>() != nullptr);

  CHECK(fast->fused_kernels());
  CHECK(!fast->autocast_output());
  fast->fused_kernels(false).autocast_output(true);
  const auto copy = std::dynamic_pointer_cast<fabric::nn::LayerNormImpl>(fast->clone());
  REQUIRE(copy != nullptr);
  CHECK(!copy->fused_kernels());
  CHECK(copy->autocast_output());
  CHECK(torch::equal(copy->weight, fast->weight));
  CHECK(copy->weight.data_ptr() != fast->weight.data_ptr());
  std::ostringstream printed;
  printed << *fast;
  CHECK(printed.str() == "fabric::nn::LayerNorm([4], eps=1e-05, elementwise_affine=true)");
}

TEST_CASE("fabric::nn::LayerNorm on CUDA: the fused kernels against at::layer_norm in float32, bfloat16, float16",
          "[nn][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  const std::string why =
      fabric::detail::layer_norm_kernel_unavailable(torch::zeros({1, 8}, cuda), torch::kFloat, 8, {}, {});
  INFO("fused kernels: " << (why.empty() ? "available" : why));
  REQUIRE(why.empty());
  struct Case {
    std::vector<std::int64_t> input, normalized;
  };
  for (const Case& c : {Case{{64, 768}, {768}}, Case{{4, 33, 100}, {100}}, Case{{3, 5, 7}, {5, 7}}, Case{{2, 1}, {1}},
                        Case{{0, 768}, {768}}, Case{{7, 6144}, {6144}}}) {
    for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      for (const bool affine : {true, false}) {
        CAPTURE(c.input, dtype, affine);
        const auto options = torch::nn::LayerNormOptions(c.normalized).elementwise_affine(affine);
        torch::nn::LayerNorm reference(options);
        fabric::nn::LayerNorm fast(options);
        reference->to(cuda);
        fast->to(cuda);
        if (affine) {
          torch::NoGradGuard no_grad;
          fast->weight.uniform_(0.5, 1.5);
          fast->bias.uniform_(-0.5, 0.5);
          reference->weight.copy_(fast->weight);
          reference->bias.copy_(fast->bias);
        }
        torch::manual_seed(8);
        const at::Tensor x = (torch::randn(c.input, cuda) * 3 + 1).to(dtype);
        // The upstream gradient in the output's dtype for both, so that only the sums' order differs.
        const at::Tensor g = torch::randn(c.input, cuda).to(dtype).to(torch::kFloat);
        // NOTE: ATen's LayerNorm of 16-bit inputs wants weights of the input's dtype in older LibTorch: the
        // reference runs in float32 on the same values, then rounds.
        reference->to(torch::kFloat);
        const Run want = run(reference, x.to(torch::kFloat), g);
        const Run got = run(fast, x, g);
        CHECK(got.nodes.count(fused_node) == 1);
        REQUIRE(got.y.scalar_type() == dtype);
        REQUIRE(got.dx.scalar_type() == dtype);
        const double tol = dtype == torch::kFloat ? 1e-5 : 1.0 / 128;
        CHECK(close(got.y, want.y, tol, tol));
        CHECK(
            close(got.dx, want.dx, dtype == torch::kFloat ? 1e-4 : 1.0 / 64, dtype == torch::kFloat ? 1e-4 : 1.0 / 32));
        if (affine) {
          REQUIRE(got.dw.scalar_type() == torch::kFloat);
          // Sums over the rows of g * xhat and of g: the float32 reference's, within the rounding of the input.
          const double scale =
              1.0 + std::sqrt(static_cast<double>(x.numel() / std::max<std::int64_t>(got.dw.numel(), 1)));
          CHECK(close(got.dw, want.dw, tol * 4, tol * scale));
          CHECK(close(got.db, want.db, 1e-5, 1e-4 * scale));
        }
      }
    }
  }
}

TEST_CASE(
    "fabric::nn::LayerNorm on CUDA under autocast: float32 output, or the autocast dtype when asked; "
    "deterministic sums",
    "[nn][cuda][precision]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(3);
  fabric::nn::LayerNorm fast(torch::nn::LayerNormOptions({768}));
  fast->to(cuda);
  {
    torch::NoGradGuard no_grad;
    fast->weight.uniform_(0.5, 1.5);
    fast->bias.uniform_(-0.5, 0.5);
  }
  const at::Tensor x = torch::randn({8, 128, 768}, cuda), g = torch::randn({8, 128, 768}, cuda);
  torch::nn::LayerNorm reference(torch::nn::LayerNormOptions({768}));
  reference->to(cuda);
  {
    torch::NoGradGuard no_grad;
    reference->weight.copy_(fast->weight);
    reference->bias.copy_(fast->bias);
  }
  const Run want = run(reference, x, g);
  fabric::AutocastGuard autocast(torch::kCUDA, torch::kBFloat16);
  const Run plain = run(fast, x, g);
  CHECK(plain.y.scalar_type() == torch::kFloat);
  CHECK(close(plain.y, want.y, 1e-5, 1e-5));
  fast->autocast_output(true);
  const Run low = run(fast, x, g);
  const Run again = run(fast, x, g);
  CHECK(low.nodes.count(fused_node) == 1);
  REQUIRE(low.y.scalar_type() == torch::kBFloat16);
  // The float32 output rounded once.
  CHECK(close(low.y, want.y.to(torch::kBFloat16), 1.0 / 256, 1e-2));
  CHECK(low.dx.scalar_type() == torch::kFloat);
  CHECK(close(low.dx, want.dx, 1.0 / 64, 1.0 / 32));
  CHECK(torch::equal(low.dw, again.dw));
  CHECK(torch::equal(low.db, again.db));
  CHECK(torch::equal(low.dx, again.dx));
}

TEST_CASE("fabric::nn::LayerNorm on CUDA refuses a double backward; at::layer_norm where its kernels do not apply",
          "[nn][cuda][errors]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  fabric::nn::LayerNorm fast(torch::nn::LayerNormOptions({16}));
  fast->to(cuda);
  const at::Tensor x = torch::randn({4, 16}, cuda).requires_grad_();
  const auto penalty = [&] {
    const at::Tensor loss = fast(x).pow(3).sum();
    const auto grads = torch::autograd::grad({loss}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    return grads[0].pow(2).sum();
  };
  CHECK_THROWS_AS(penalty(), fabric::Error);
  CHECK_THROWS_WITH(penalty(), ContainsSubstring("expected a backward without create_graph") &&
                                   ContainsSubstring("fused_kernels(false)"));
  fast->fused_kernels(false);
  CHECK(graph_of(fast(x)).count(fused_node) == 0);
  penalty().backward();
  CHECK(x.grad().defined());
  fast->fused_kernels(true);
  // Rows wider than the kernels take, double inputs, a bfloat16 weight: at::layer_norm.
  fabric::nn::LayerNorm wide(torch::nn::LayerNormOptions({8192}));
  wide->to(cuda);
  CHECK(graph_of(wide(torch::randn({2, 8192}, cuda).requires_grad_())).count(fused_node) == 0);
  fabric::nn::LayerNorm wider(torch::nn::LayerNormOptions({16}));
  wider->to(cuda, torch::kDouble);
  CHECK(graph_of(wider(x.to(torch::kDouble))).count(fused_node) == 0);
  fabric::nn::LayerNorm low(torch::nn::LayerNormOptions({16}));
  low->to(cuda, torch::kBFloat16);
  CHECK(graph_of(low(x.to(torch::kBFloat16))).count(fused_node) == 0);
}

TEST_CASE("fabric::nn::LayerNorm on CUDA: rows that do not start on four elements take the column-at-a-time path",
          "[nn][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(13);
  fabric::nn::LayerNorm fast(torch::nn::LayerNormOptions({768}));
  fast->to(cuda);
  {
    torch::NoGradGuard no_grad;
    fast->weight.uniform_(0.5, 1.5);
    fast->bias.uniform_(-0.5, 0.5);
  }
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CAPTURE(dtype);
    // A contiguous [64, 768] view one element into its storage: aligned to one element only.
    const at::Tensor storage = torch::randn({1 + 64 * 768}, cuda).to(dtype);
    const at::Tensor shifted = storage.narrow(0, 1, 64 * 768).view({64, 768});
    REQUIRE(shifted.is_contiguous());
    const at::Tensor g = torch::randn({64, 768}, cuda).to(dtype);
    // run() clones its input (which aligns it): this keeps the view.
    const auto once = [&](const at::Tensor& input) {
      Run out;
      const at::Tensor x = input.detach().requires_grad_();
      fast->zero_grad();
      out.y = fast(x);
      out.nodes = graph_of(out.y);
      out.y.backward(g.to(out.y.scalar_type()));
      out.dx = x.grad();
      out.dw = fast->weight.grad().clone();
      out.db = fast->bias.grad().clone();
      return out;
    };
    const Run odd = once(shifted), even = once(shifted.clone());
    REQUIRE(reinterpret_cast<std::uintptr_t>(shifted.data_ptr()) % 8 != 0);
    CHECK(odd.nodes.count(fused_node) == 1);
    // The same arithmetic per element; only the order of the row sums differs.
    CHECK(torch::equal(odd.y, even.y));
    const double tol = dtype == torch::kFloat ? 1e-5 : 1.0 / 128;
    CHECK(close(odd.dx, even.dx, tol, tol));
    CHECK(close(odd.dw, even.dw, 1e-5, 1e-4));
    CHECK(close(odd.db, even.db, 1e-5, 1e-4));
  }
}
