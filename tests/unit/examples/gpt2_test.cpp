// Tests of the GPT-2 of examples/gpt2: the parameter count of GPT-2 small and its tied head, the
// shape and causality of the forward pass, the initialisation, and that fabric trains a tiny one.

#include "gpt2/gpt2.hpp"

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_floating_point.hpp>

#include <cmath>
#include <cstdint>
#include <string>

namespace {

using Catch::Matchers::WithinAbs;
using Catch::Matchers::WithinRel;

/// Returns the parameter of the model whose name is `name`.
at::Tensor param(gpt2::GPT& model, const std::string& name) {
  const auto params = model->named_parameters();
  const at::Tensor* p = params.find(name);
  REQUIRE(p != nullptr);
  return *p;
}

TEST_CASE("gpt2: GPT-2 small has 124,475,904 parameters with the head tied to the token embedding", "[example]") {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  gpt2::GPT model(gpt2::Config{});
  // wte 50304x768 + wpe 1024x768 + 12 blocks of 7,087,872 + ln_f 2x768.
  CHECK(model->num_parameters() == 124'475'904);
  CHECK(model->parameters().size() == 2 + 12 * 12 + 2);

  // The head is the embedding's own Parameter: no second matrix, and a change to one is the other.
  for (const auto& item : model->named_parameters()) {
    if (item.key() != "wte.weight") CHECK(item.value().sizes() != model->wte->weight.sizes());
  }
  const at::Tensor h = torch::randn({1, 1, 768});
  model->wte->weight[7].fill_(1.0);
  const at::Tensor logits = torch::nn::functional::linear(model->ln_f(h), model->wte->weight);
  const at::Tensor expected = model->ln_f(h).matmul(model->wte->weight[7]);
  CHECK_THAT(logits[0][0][7].item<double>(), WithinAbs(expected.item<double>(), 1e-4));
}

TEST_CASE("gpt2: initialisation follows GPT-2 (std 0.02, residual projections 0.02/sqrt(2 n_layer))", "[example]") {
  torch::NoGradGuard no_grad;
  torch::manual_seed(1);
  gpt2::Config config = gpt2::Config::tiny();
  config.n_embd = 128;
  config.n_layer = 8;
  gpt2::GPT model(config);
  CHECK_THAT(param(model, "wte.weight").std().item<double>(), WithinRel(0.02, 0.05));
  CHECK_THAT(param(model, "h.0.mlp.c_fc.weight").std().item<double>(), WithinRel(0.02, 0.05));
  CHECK_THAT(param(model, "h.3.attn.c_proj.weight").std().item<double>(), WithinRel(0.02 / std::sqrt(16.0), 0.05));
  CHECK_THAT(param(model, "h.3.mlp.c_proj.weight").std().item<double>(), WithinRel(0.02 / std::sqrt(16.0), 0.05));
  CHECK(param(model, "h.0.attn.c_attn.bias").abs().max().item<double>() == 0.0);
  CHECK(param(model, "h.0.ln_1.weight").eq(1.0).all().item<bool>());
}

TEST_CASE("gpt2: the forward pass maps [B, T] tokens to [B, T, vocab] logits and is causal", "[example]") {
  torch::NoGradGuard no_grad;
  torch::manual_seed(2);
  const gpt2::Config config = gpt2::Config::tiny();
  gpt2::GPT model(config);
  model->eval();
  const at::Tensor tokens = torch::randint(config.vocab_size, {3, 20}, torch::kLong);
  const at::Tensor logits = model(tokens);
  CHECK(logits.sizes() == at::IntArrayRef({3, 20, config.vocab_size}));
  CHECK(logits.scalar_type() == torch::kFloat);
  CHECK(logits.isfinite().all().item<bool>());

  // Changing token 12 changes no logit before position 12, and does change the logits at 12.
  at::Tensor changed = tokens.clone();
  changed.select(1, 12).add_(1).remainder_(config.vocab_size);
  const at::Tensor other = model(changed);
  CHECK(torch::allclose(logits.narrow(1, 0, 12), other.narrow(1, 0, 12), 1e-5, 1e-6));
  CHECK_FALSE(torch::allclose(logits.narrow(1, 12, 1), other.narrow(1, 12, 1), 1e-5, 1e-6));

  // Sequences longer than the context are refused.
  CHECK_THROWS_AS(model(torch::zeros({1, config.block_size + 1}, torch::kLong)), std::invalid_argument);
}

TEST_CASE("gpt2: a bad config is refused", "[example]") {
  gpt2::Config config = gpt2::Config::tiny();
  config.n_head = 3;
  CHECK_THROWS_AS(gpt2::GPT(config), std::invalid_argument);
}

TEST_CASE("gpt2: fabric trains a tiny GPT (the loss falls on a repeated batch)", "[example]") {
  fabric::Fabric<> fabric;
  fabric.seed_everything(3);
  const gpt2::Config config = gpt2::Config::tiny();
  gpt2::GPT net(config);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  // NOTE: Fabric<> picks the GPU where there is one; the batch goes to the fabric's device.
  const at::Tensor tokens =
      fabric.to_device(torch::randint(config.vocab_size, {4, config.block_size + 1}, torch::kLong));
  const at::Tensor x = tokens.narrow(1, 0, config.block_size), y = tokens.narrow(1, 1, config.block_size);
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 8; ++step) {
    const at::Tensor loss = gpt2::loss(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    last = loss.item<double>();
    if (step == 0) first = last;
  }
  // The first loss is about ln(vocab) for a fresh model; eight steps on one batch cut it clearly.
  CHECK_THAT(first, WithinAbs(std::log(static_cast<double>(config.vocab_size)), 0.3));
  CHECK(last < 0.9 * first);
}

TEST_CASE("gpt2: fabric trains a tiny GPT on the GPU in bf16-mixed", "[example][cuda]") {
  if (!torch::cuda::is_available()) SKIP("no GPU visible");
  fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  fabric.seed_everything(4);
  const gpt2::Config config = gpt2::Config::tiny();
  gpt2::GPT net(config);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  const at::Tensor tokens = torch::randint(config.vocab_size, {4, config.block_size + 1},
                                           torch::TensorOptions(torch::kLong).device(fabric.device()));
  const at::Tensor x = tokens.narrow(1, 0, config.block_size), y = tokens.narrow(1, 1, config.block_size);
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 8; ++step) {
    const at::Tensor logits = model(x);
    CHECK(logits.scalar_type() == torch::kFloat);  // fabric casts the bf16 output back
    const at::Tensor loss = gpt2::loss(logits, y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    last = loss.item<double>();
    if (step == 0) first = last;
  }
  CHECK(last < 0.9 * first);

  // Causal on the GPU too (scaled_dot_product_attention's kernels where LibTorch has them).
  torch::NoGradGuard no_grad;
  at::Tensor changed = x.clone();
  changed.select(1, 20).add_(1).remainder_(config.vocab_size);
  const at::Tensor a = model(x), b = model(changed);
  CHECK(torch::allclose(a.narrow(1, 0, 20), b.narrow(1, 0, 20), 1e-2, 1e-2));
  CHECK_FALSE(torch::allclose(a.narrow(1, 20, 1), b.narrow(1, 20, 1), 1e-2, 1e-2));
}

}  // namespace
