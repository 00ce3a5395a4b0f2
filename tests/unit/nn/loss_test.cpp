// fabric::nn::cross_entropy against torch::nn::functional::cross_entropy in float32: values and gradients
// for every reduction, ignore_index, label smoothing and chunking, bfloat16 logits within bfloat16's
// rounding, the refusals, and the bfloat16 loss path through fabric (BF16Mixed without output conversion).
// (Lightning has no loss of its own: it leaves the loss to PyTorch.)
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

using Catch::Matchers::ContainsSubstring;
namespace F = torch::nn::functional;

namespace {

/// Random logits [n, v] (float32, not rounded) and targets [n] with some rows set to ignore_index.
std::pair<at::Tensor, at::Tensor> batch(std::int64_t n, std::int64_t v, std::int64_t ignore_index = -100,
                                        const torch::Device& device = torch::kCPU) {
  torch::manual_seed(42);
  at::Tensor logits = (torch::randn({n, v}) * 3).to(device);
  at::Tensor targets = torch::randint(v, {n}, torch::kLong);
  targets.index_put_({torch::arange(0, n, 5)}, ignore_index);  // every fifth row ignored
  return {logits, targets.to(device)};
}

/// Loss and logits gradient of F::cross_entropy in float32 (the reference), with `upstream` as the gradient
/// of a `none` loss.
std::pair<at::Tensor, at::Tensor> reference(const at::Tensor& logits, const at::Tensor& targets,
                                            const F::CrossEntropyFuncOptions& options, const at::Tensor& upstream) {
  const at::Tensor x = logits.detach().to(torch::kFloat).requires_grad_();
  const at::Tensor loss = F::cross_entropy(x, targets, options);
  loss.backward(loss.dim() == 0 ? at::Tensor() : upstream);
  return {loss.detach(), x.grad()};
}

/// Loss and logits gradient of fabric::nn::cross_entropy.
std::pair<at::Tensor, at::Tensor> chunked(const at::Tensor& logits, const at::Tensor& targets,
                                          const F::CrossEntropyFuncOptions& options, const at::Tensor& upstream,
                                          fabric::nn::ChunkOptions chunks = {}) {
  const at::Tensor x = logits.detach().clone().requires_grad_();
  const at::Tensor loss = fabric::nn::cross_entropy(x, targets, options, chunks);
  loss.backward(loss.dim() == 0 ? at::Tensor() : upstream);
  return {loss.detach(), x.grad()};
}

std::vector<std::tuple<std::string, F::CrossEntropyFuncOptions>> all_options() {
  std::vector<std::tuple<std::string, F::CrossEntropyFuncOptions>> all;
  for (const double smoothing : {0.0, 0.1}) {
    const auto s = std::to_string(smoothing);
    all.emplace_back("mean, smoothing " + s, F::CrossEntropyFuncOptions().label_smoothing(smoothing));
    all.emplace_back("sum, smoothing " + s,
                     F::CrossEntropyFuncOptions().reduction(torch::kSum).label_smoothing(smoothing));
    all.emplace_back("none, smoothing " + s,
                     F::CrossEntropyFuncOptions().reduction(torch::kNone).label_smoothing(smoothing));
    all.emplace_back("mean, ignore_index 3, smoothing " + s,
                     F::CrossEntropyFuncOptions().ignore_index(3).label_smoothing(smoothing));
  }
  return all;
}

}  // namespace

TEST_CASE("cross_entropy matches F::cross_entropy in float32 for every reduction and chunking", "[nn][loss]") {
  const auto [name, options] = GENERATE(from_range(all_options()));
  const std::int64_t rows = GENERATE(1, 4, 37, 0);  // 0: the default (all 37 rows in one chunk)
  CAPTURE(name, rows);
  const auto [logits, targets] = batch(37, 11, options.ignore_index());
  const at::Tensor upstream = torch::rand({37}) + 0.5;
  const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
  const auto [loss, grad] = chunked(logits, targets, options, upstream, {.rows = rows});
  CHECK(loss.scalar_type() == torch::kFloat);
  CHECK(grad.scalar_type() == torch::kFloat);
  REQUIRE(loss.sizes() == loss_ref.sizes());
  CHECK(torch::allclose(loss, loss_ref, /*rtol=*/1e-5, /*atol=*/1e-6));
  CHECK(torch::allclose(grad, grad_ref, /*rtol=*/1e-5, /*atol=*/1e-7));
}

TEST_CASE("cross_entropy gives the same losses and gradients whatever the chunk size", "[nn][loss]") {
  const auto [logits, targets] = batch(50, 9);
  const F::CrossEntropyFuncOptions options = F::CrossEntropyFuncOptions().label_smoothing(0.2);
  const at::Tensor none;
  const auto [loss_one, grad_one] = chunked(logits, targets, options, none, {.rows = 50});
  for (const fabric::nn::ChunkOptions chunks :
       {fabric::nn::ChunkOptions{.rows = 1}, fabric::nn::ChunkOptions{.rows = 7},
        fabric::nn::ChunkOptions{.max_elements = 20}}) {
    const auto [loss, grad] = chunked(logits, targets, options, none, chunks);
    CHECK(torch::equal(grad, grad_one));
    CHECK(torch::allclose(loss, loss_one, 1e-6, 0));  // the chunks' sums may round differently
  }
}

TEST_CASE("cross_entropy of bfloat16 logits: float32 accumulation, a bfloat16 gradient within its rounding",
          "[nn][loss]") {
  const auto [name, options] = GENERATE(from_range(all_options()));
  CAPTURE(name);
  const auto [logits32, targets] = batch(64, 300, options.ignore_index());
  const at::Tensor logits = logits32.to(torch::kBFloat16);
  const at::Tensor upstream = torch::rand({64}) + 0.5;
  // The reference sees the same bfloat16 values, upcast: the loss must agree to float32 rounding.
  const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
  const auto [loss, grad] = chunked(logits, targets, options, upstream, {.rows = 10});
  CHECK(loss.scalar_type() == torch::kFloat);
  CHECK(grad.scalar_type() == torch::kBFloat16);
  CHECK(torch::allclose(loss, loss_ref, 1e-5, 1e-6));
  // bfloat16 keeps 8 significant bits: the gradient, computed in float32, is off by at most half a unit
  // in the last place, 2^-9 relative (2^-8 allowed), plus the float32 differences of the two computations,
  // which label smoothing turns into a large relative error where softmax - smoothing / C cancels:
  // 1e-6 of the largest gradient.
  const double floor = 1e-6 * grad_ref.abs().max().item<double>();
  CHECK(torch::allclose(grad.to(torch::kFloat), grad_ref, /*rtol=*/1.0 / 256, /*atol=*/floor));
}

TEST_CASE("cross_entropy of only ignored rows is NaN for mean and zero for sum, as F::cross_entropy", "[nn][loss]") {
  const at::Tensor logits = torch::randn({3, 4}, torch::requires_grad());
  const at::Tensor targets = torch::full({3}, -100, torch::kLong);
  CHECK(std::isnan(fabric::nn::cross_entropy(logits, targets).item<double>()));
  CHECK(std::isnan(F::cross_entropy(logits, targets).item<double>()));
  const at::Tensor sum =
      fabric::nn::cross_entropy(logits, targets, F::CrossEntropyFuncOptions().reduction(torch::kSum));
  CHECK(sum.item<double>() == 0.0);
  sum.backward();
  CHECK(torch::equal(logits.grad(), torch::zeros({3, 4})));
}

TEST_CASE("cross_entropy refuses what it does not compute", "[nn][loss][errors]") {
  const at::Tensor logits = torch::randn({4, 5});
  const at::Tensor targets = torch::tensor({0, 1, 2, 3}, torch::kLong);
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits.view({2, 2, 5}), targets),
                    ContainsSubstring("expected floating logits [N, C], found 3-D Float") &&
                        ContainsSubstring("logits.view({-1, logits.size(-1)})"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, torch::rand({4, 5})),
                    ContainsSubstring("expected class indices (int64 targets), found Float targets"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, targets.narrow(0, 0, 3)),
                    ContainsSubstring("expected targets [N] for logits [4, 5], found 1-D targets of 3 elements"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, targets, F::CrossEntropyFuncOptions().weight(torch::ones({5}))),
                    ContainsSubstring("class weights are not supported"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, targets, F::CrossEntropyFuncOptions().label_smoothing(1.5)),
                    ContainsSubstring("expected label_smoothing in [0, 1], found 1.5"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, torch::tensor({0, 1, 5, 3}, torch::kLong)),
                    ContainsSubstring("expected targets in [0, 5) or ignore_index -100, found 5 at position 2"));
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, targets, {}, {.rows = -1}),
                    ContainsSubstring("expected ChunkOptions rows >= 0"));
  CHECK_THROWS_AS(fabric::nn::cross_entropy(logits, at::Tensor()), fabric::Error);
  // int32 targets are accepted (F::cross_entropy wants int64).
  CHECK(torch::allclose(fabric::nn::cross_entropy(logits, targets.to(torch::kInt)), F::cross_entropy(logits, targets)));
}

TEST_CASE("bf16-mixed with convert_output = false: bfloat16 logits into cross_entropy, float32 gradients",
          "[nn][loss][precision]") {
  torch::manual_seed(1);
  torch::nn::Sequential net(fabric::nn::Linear(8, 16), torch::nn::ReLU(), fabric::nn::Linear(16, 10));
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::BF16Mixed> fabric(
      {}, fabric::SingleDevice{}, fabric::BF16Mixed({.convert_output = false}));
  CHECK(!fabric.precision().converts_output());
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  const at::Tensor x = torch::randn({32, 8});
  const at::Tensor y = torch::randint(10, {32}, torch::kLong);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    const at::Tensor logits = model(x);
    REQUIRE(logits.scalar_type() == torch::kBFloat16);
    const at::Tensor loss = fabric::nn::cross_entropy(logits, y);
    REQUIRE(loss.scalar_type() == torch::kFloat);
    fabric.backward(loss);
    CHECK(net[0]->as<fabric::nn::Linear>()->weight.grad().scalar_type() == torch::kFloat);
    optimizer.step();
    optimizer.zero_grad();
    (step == 0 ? first : last) = loss.item<double>();
  }
  CHECK(last < 0.7 * first);
}

TEST_CASE("cross_entropy on CUDA: bfloat16 and float16 logits against F::cross_entropy in float32",
          "[nn][loss][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  for (const auto dtype : {torch::kBFloat16, torch::kHalf, torch::kFloat}) {
    for (const auto& [name, options] : all_options()) {
      CAPTURE(name, dtype);
      const auto [logits32, targets] = batch(1000, 5003, options.ignore_index(), cuda);
      const at::Tensor logits = logits32.to(dtype);
      const at::Tensor upstream = torch::rand({1000}, cuda) + 0.5;
      const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
      const auto [loss, grad] = chunked(logits, targets, options, upstream, {.rows = 96});
      CHECK(grad.scalar_type() == dtype);
      CHECK(torch::allclose(loss, loss_ref, 1e-5, 1e-6));
      // float16 keeps 11 significant bits but flushes below 6e-8: an absolute floor.
      const double floor = 1e-6 * grad_ref.abs().max().item<double>() + (dtype == torch::kHalf ? 1e-7 : 0.0);
      CHECK(torch::allclose(grad.to(torch::kFloat), grad_ref, 1.0 / 256, floor));
    }
  }
}
