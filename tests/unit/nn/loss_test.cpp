// fabric::nn::cross_entropy against torch::nn::functional::cross_entropy in float32: values and gradients
// for every reduction, ignore_index, label smoothing and chunking, on each path (the gradient computed in
// forward with ATen ops, the recomputing backward, on CUDA the fused NVRTC kernel), bfloat16 logits within
// bfloat16's rounding, the gradient written into the logits (in_place), one backward only, the refusals, and
// the bfloat16 loss path through fabric (BF16Mixed without output conversion, and captured in a CUDA graph).
// (Lightning has no loss of its own: it leaves the loss to PyTorch.)
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <string>
#include <thread>
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
  // automatic (on the CPU: the gradient in forward with ATen ops), the same in place, recompute.
  const auto [kernel, in_place] =
      GENERATE(table<fabric::nn::LossKernel, bool>({{fabric::nn::LossKernel::automatic, false},
                                                    {fabric::nn::LossKernel::automatic, true},
                                                    {fabric::nn::LossKernel::recompute, false}}));
  CAPTURE(name, rows, static_cast<int>(kernel), in_place);
  const auto [logits, targets] = batch(37, 11, options.ignore_index());
  const at::Tensor upstream = torch::rand({37}) + 0.5;
  const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
  const auto [loss, grad] =
      chunked(logits, targets, options, upstream, {.rows = rows, .kernel = kernel, .in_place = in_place});
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
  const auto kernel = GENERATE(fabric::nn::LossKernel::aten, fabric::nn::LossKernel::recompute);
  const auto [loss_one, grad_one] = chunked(logits, targets, options, none, {.rows = 50, .kernel = kernel});
  for (const fabric::nn::ChunkOptions chunks :
       {fabric::nn::ChunkOptions{.rows = 1, .kernel = kernel}, fabric::nn::ChunkOptions{.rows = 7, .kernel = kernel},
        fabric::nn::ChunkOptions{.max_elements = 20, .kernel = kernel}}) {
    const auto [loss, grad] = chunked(logits, targets, options, none, chunks);
    CHECK(torch::equal(grad, grad_one));
    CHECK(torch::allclose(loss, loss_one, 1e-6, 0));  // the chunks' sums may round differently
  }
}

TEST_CASE("cross_entropy of bfloat16 logits: float32 accumulation, a bfloat16 gradient within its rounding",
          "[nn][loss]") {
  const auto [name, options] = GENERATE(from_range(all_options()));
  const auto kernel = GENERATE(fabric::nn::LossKernel::aten, fabric::nn::LossKernel::recompute);
  CAPTURE(name, static_cast<int>(kernel));
  const auto [logits32, targets] = batch(64, 300, options.ignore_index());
  const at::Tensor logits = logits32.to(torch::kBFloat16);
  const at::Tensor upstream = torch::rand({64}) + 0.5;
  // The reference sees the same bfloat16 values, upcast: the loss must agree to float32 rounding.
  const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
  const auto [loss, grad] = chunked(logits, targets, options, upstream, {.rows = 10, .kernel = kernel});
  CHECK(loss.scalar_type() == torch::kFloat);
  CHECK(grad.scalar_type() == torch::kBFloat16);
  CHECK(torch::allclose(loss, loss_ref, 1e-5, 1e-6));
  // bfloat16 keeps 8 significant bits: the gradient, computed in float32, is off by at most half a unit
  // in the last place, at most 2^-8 relative, plus the float32 differences of the two computations,
  // which label smoothing turns into a large relative error where softmax - smoothing / C cancels:
  // 1e-6 of the largest gradient. The gradient computed in forward is rounded to bfloat16 there and again
  // when the backward multiplies it by an incoming gradient other than 1 (reduction none here): 2^-7.
  const bool twice = kernel == fabric::nn::LossKernel::aten &&
                     torch::enumtype::reduction_get_enum(options.reduction()) == at::Reduction::None;
  const double floor = 1e-6 * grad_ref.abs().max().item<double>();
  CHECK(torch::allclose(grad.to(torch::kFloat), grad_ref, /*rtol=*/twice ? 1.0 / 128 : 1.0 / 256, /*atol=*/floor));
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

TEST_CASE("cross_entropy in_place: the logits' storage receives their gradient, no buffer of its own", "[nn][loss]") {
  const auto [logits32, targets] = batch(20, 33);
  const at::Tensor logits = logits32.to(torch::kBFloat16);
  const F::CrossEntropyFuncOptions options = F::CrossEntropyFuncOptions().label_smoothing(0.1);
  const auto [loss_ref, grad_ref] = chunked(logits, targets, options, {}, {.rows = 6});
  // Non-leaf logits (as a model's output): the gradient that flows on shares the logits' storage.
  const at::Tensor w = torch::ones({1}, torch::requires_grad());
  const at::Tensor x = logits.detach().clone();
  const at::Tensor out = x * w.to(torch::kBFloat16);
  at::Tensor seen;
  out.register_hook([&](const at::Tensor& g) { seen = g; });
  const void* storage = out.data_ptr();
  const at::Tensor loss = fabric::nn::cross_entropy(out, targets, options, {.rows = 6, .in_place = true});
  CHECK(torch::equal(loss, loss_ref));
  CHECK(torch::equal(out.detach(), grad_ref));  // overwritten in forward
  loss.backward();
  REQUIRE(seen.defined());
  CHECK(seen.data_ptr() == storage);
  CHECK(torch::equal(seen, grad_ref));
  // A node that saved the logits (tanh saves its output) refuses its backward instead of reading gradients.
  const at::Tensor y = logits.to(torch::kFloat).requires_grad_();
  const at::Tensor capped = y.tanh();
  const at::Tensor capped_loss = fabric::nn::cross_entropy(capped, targets, {}, {.in_place = true});
  CHECK_THROWS_WITH(capped_loss.backward(), ContainsSubstring("modified by an inplace operation"));
  CHECK_THROWS_WITH(
      fabric::nn::cross_entropy(capped, targets, {}, {.kernel = fabric::nn::LossKernel::recompute, .in_place = true}),
      ContainsSubstring("expected in_place with LossKernel fused, aten or automatic, found recompute"));
}

TEST_CASE("cross_entropy without a gradient to compute: the same loss, the logits untouched", "[nn][loss]") {
  const auto [logits, targets] = batch(30, 17);
  const at::Tensor x = logits.clone().requires_grad_();
  const at::Tensor with_grad = fabric::nn::cross_entropy(x, targets, {}, {.in_place = true});
  {
    const torch::NoGradGuard no_grad;
    const at::Tensor y = logits.clone().requires_grad_();
    const at::Tensor loss = fabric::nn::cross_entropy(y, targets, {}, {.in_place = true});
    CHECK(!loss.requires_grad());
    CHECK(torch::equal(y, logits));  // in_place writes nothing where no gradient is wanted
    CHECK(torch::equal(loss, with_grad.detach()));
  }
  const at::Tensor loss = fabric::nn::cross_entropy(logits, targets);
  CHECK(!loss.requires_grad());
  CHECK(torch::equal(loss, with_grad.detach()));
}

TEST_CASE("cross_entropy backs up once: a second backward and a double backward are refused", "[nn][loss][errors]") {
  const auto [logits, targets] = batch(12, 7);
  const at::Tensor x = logits.clone().requires_grad_();
  const at::Tensor loss = fabric::nn::cross_entropy(x, targets);
  loss.backward({}, /*retain_graph=*/true);
  const at::Tensor first = x.grad().clone();
  CHECK_THROWS_WITH(loss.backward(), ContainsSubstring("expected one backward through the loss, found a second one") &&
                                         ContainsSubstring("LossKernel::recompute"));
  CHECK_THROWS_AS(loss.backward(), fabric::Error);
  CHECK(torch::equal(x.grad(), first));  // the refused backward added nothing
  // recompute reads the saved logits again: a retained graph backs up twice.
  const at::Tensor y = logits.clone().requires_grad_();
  const at::Tensor again = fabric::nn::cross_entropy(y, targets, {}, {.kernel = fabric::nn::LossKernel::recompute});
  again.backward({}, /*retain_graph=*/true);
  again.backward();
  CHECK(torch::allclose(y.grad(), 2 * first, 1e-6, 1e-7));
  for (const auto kernel : {fabric::nn::LossKernel::aten, fabric::nn::LossKernel::recompute}) {
    const at::Tensor z = logits.clone().requires_grad_();
    const at::Tensor l = fabric::nn::cross_entropy(z, targets, {}, {.kernel = kernel});
    CHECK_THROWS_WITH(torch::autograd::grad({l}, {z}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                      ContainsSubstring("expected a backward without create_graph, found a double backward"));
  }
}

TEST_CASE("cross_entropy's paths on the CPU: the fused kernel is refused, automatic takes ATen", "[nn][loss][errors]") {
  const auto [logits, targets] = batch(8, 5);
  CHECK_THROWS_WITH(fabric::nn::cross_entropy(logits, targets, {}, {.kernel = fabric::nn::LossKernel::fused}),
                    ContainsSubstring("expected logits the fused CUDA kernel can read, found the logits are not on a "
                                      "CUDA device") &&
                        ContainsSubstring("LossKernel::aten"));
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
  const std::string why = fabric::detail::cross_entropy_kernel_unavailable(torch::zeros({1, 1}, cuda));
  INFO("fused kernel: " << (why.empty() ? "available" : why));
  CHECK(why.empty());
  for (const auto kernel :
       {fabric::nn::LossKernel::fused, fabric::nn::LossKernel::aten, fabric::nn::LossKernel::recompute}) {
    if (kernel == fabric::nn::LossKernel::fused && !why.empty()) continue;
    for (const auto dtype : {torch::kBFloat16, torch::kHalf, torch::kFloat}) {
      for (const auto& [name, options] : all_options()) {
        // 5003 classes: no vector loads (rows of odd length); 5008: vector loads and a tail-free row.
        for (const std::int64_t classes : {5003, 5008}) {
          CAPTURE(name, dtype, static_cast<int>(kernel), classes);
          const auto [logits32, targets] = batch(1000, classes, options.ignore_index(), cuda);
          const at::Tensor logits = logits32.to(dtype);
          const at::Tensor upstream = torch::rand({1000}, cuda) + 0.5;
          const auto [loss_ref, grad_ref] = reference(logits, targets, options, upstream);
          const auto [loss, grad] = chunked(logits, targets, options, upstream, {.rows = 96, .kernel = kernel});
          CHECK(grad.scalar_type() == dtype);
          CHECK(torch::allclose(loss, loss_ref, 1e-5, 1e-6));
          // float16 keeps 11 significant bits but flushes below 6e-8: an absolute floor. Rounded twice (in
          // forward, then times the incoming gradient) for reduction none unless recomputed.
          const bool twice = kernel != fabric::nn::LossKernel::recompute &&
                             torch::enumtype::reduction_get_enum(options.reduction()) == at::Reduction::None;
          const double floor = 1e-6 * grad_ref.abs().max().item<double>() + (dtype == torch::kHalf ? 1e-7 : 0.0);
          CHECK(torch::allclose(grad.to(torch::kFloat), grad_ref, twice ? 1.0 / 128 : 1.0 / 256, floor));
        }
      }
    }
  }
}

TEST_CASE("cross_entropy on CUDA: the fused kernel against the ATen path, in place, out-of-range targets",
          "[nn][loss][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  const std::string why = fabric::detail::cross_entropy_kernel_unavailable(torch::zeros({1, 1}, cuda));
  if (!why.empty()) FAIL("fused kernel unavailable: " << why);
  const auto [logits32, targets] = batch(2048, 50304, -100, cuda);
  const at::Tensor logits = logits32.to(torch::kBFloat16);
  const F::CrossEntropyFuncOptions options = F::CrossEntropyFuncOptions().label_smoothing(0.1);
  const auto [loss_aten, grad_aten] = chunked(logits, targets, options, {}, {.kernel = fabric::nn::LossKernel::aten});
  const auto [loss_fused, grad_fused] =
      chunked(logits, targets, options, {}, {.kernel = fabric::nn::LossKernel::fused});
  CHECK(torch::allclose(loss_fused, loss_aten, 1e-5, 0));
  // Both round float32 values to bfloat16; the float32 values differ by their exp and sum orders.
  CHECK(torch::allclose(grad_fused.to(torch::kFloat), grad_aten.to(torch::kFloat), 1.0 / 128, 1e-9));
  const at::Tensor x = logits.clone().requires_grad_();
  const at::Tensor h = x * 1;
  const at::Tensor loss = fabric::nn::cross_entropy(h, targets, options, {.in_place = true});
  CHECK(torch::equal(loss.detach(), loss_fused));
  CHECK(torch::equal(h.detach(), grad_fused));
  loss.backward();
  CHECK(torch::equal(x.grad(), grad_fused));
  // A target out of range: NaN (ATen's kernels would raise a device-side assert).
  at::Tensor bad = targets.clone();
  bad.index_put_({1}, 50304);
  const at::Tensor none = fabric::nn::cross_entropy(logits, bad, F::CrossEntropyFuncOptions().reduction(torch::kNone));
  CHECK(std::isnan(none[1].item<float>()));
  CHECK(!std::isnan(none[2].item<float>()));
}

TEST_CASE("cross_entropy on CUDA: the fused kernel launches from a thread whose first CUDA work it is",
          "[nn][loss][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  const torch::Device cuda(torch::kCUDA, 0);
  if (!fabric::detail::cross_entropy_kernel_unavailable(torch::zeros({1, 1}, cuda)).empty()) SKIP("no fused kernel");
  const auto logits = torch::randn({16, 300}, cuda).to(torch::kBFloat16).requires_grad_(true);
  const auto targets = torch::randint(300, {16}, torch::TensorOptions().device(cuda).dtype(torch::kLong));
  const fabric::nn::ChunkOptions fused{.kernel = fabric::nn::LossKernel::fused};
  const at::Tensor expected = fabric::nn::cross_entropy(logits, targets, {}, fused).detach();
  // NOTE: a new thread has no current CUDA context until a runtime call binds one; the driver API's launch
  // needs one (autograd's device thread is such a thread when the loss's backward comes first).
  at::Tensor loss;
  at::Tensor grad;
  std::string error;
  std::thread([&] {
    try {
      at::Tensor l = fabric::nn::cross_entropy(logits, targets, {}, fused);
      l.backward();
      loss = l.detach();
      grad = logits.grad();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }).join();
  REQUIRE(error.empty());
  CHECK(torch::equal(loss, expected));
  CHECK(grad.defined());
}

TEST_CASE("cross_entropy on CUDA: a bf16-mixed step with the fused loss captured in a CUDA graph",
          "[nn][loss][cuda][capture]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric(
      {}, fabric::SingleDevice{}, fabric::BF16Mixed({.convert_output = false}));
  // NOTE: four batches, three times over: random targets are learnt only where a batch comes again.
  std::vector<std::pair<at::Tensor, at::Tensor>> data;
  torch::manual_seed(3);
  for (int i = 0; i < 4; ++i) {
    data.emplace_back(torch::randn({64, 32}, fabric.device()),
                      torch::randint(1000, {64}, torch::TensorOptions().device(fabric.device()).dtype(torch::kLong)));
  }
  for (int i = 4; i < 12; ++i) data.push_back(data[static_cast<std::size_t>(i % 4)]);
  const auto train = [&](bool capture) {
    torch::manual_seed(0);
    torch::nn::Sequential net(fabric::nn::Linear(32, 64), torch::nn::ReLU(), fabric::nn::Linear(64, 1000));
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
    auto [model, optimizer] = fabric.setup(net, adamw);
    const auto step = [&](const at::Tensor& x, const at::Tensor& y) {
      at::Tensor loss = fabric::nn::cross_entropy(model(x), y);
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();
      return loss;
    };
    std::vector<float> losses;
    if (capture) {
      auto captured = fabric.capture(step);
      for (const auto& [x, y] : data) losses.push_back(captured(x, y).template item<float>());
      CHECK(captured.captured());
    } else {
      for (const auto& [x, y] : data) losses.push_back(step(x, y).item<float>());
    }
    return losses;
  };
  const auto eager = train(false);
  const auto graph = train(true);
  CHECK(graph == eager);
  CHECK(eager[8] < eager[4]);  // the first batch, seen for the third time against the second
  CHECK(eager[4] < eager[0]);
}
