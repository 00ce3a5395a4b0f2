// Activation checkpointing: fabric::activation_checkpoint and apply_activation_checkpointing give the same
// loss and gradients as the plain forward (exactly, fp32 on the CPU, with dropout), keep fewer bytes after the
// forward, restore autocast in the recomputation, run the units' pre_forward hooks (not post_forward) again
// there, pass non-tensor arguments and outputs that need no grad, and refuse misuse.

#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

using Catch::Matchers::ContainsSubstring;

namespace {

struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(int n = 16)
      : fc1(register_module("fc1", torch::nn::Linear(n, 4 * n))),
        fc2(register_module("fc2", torch::nn::Linear(4 * n, n))),
        drop(register_module("drop", torch::nn::Dropout(0.3))) {}
  at::Tensor forward(const at::Tensor& x) { return x + drop(fc2(torch::gelu(fc1(x)))); }
  torch::nn::Linear fc1, fc2;
  torch::nn::Dropout drop;
};
FABRIC_UNIT(Block);

struct NetImpl : torch::nn::Module {
  explicit NetImpl(int n = 16, int depth = 3) : h(register_module("h", torch::nn::ModuleList())) {
    for (int i = 0; i < depth; ++i) {
      blocks.emplace_back(n);
      h->push_back(blocks.back());
    }
    head = register_module("head", torch::nn::Linear(n, 1));
  }
  at::Tensor forward(at::Tensor x) {
    for (auto& b : blocks) x = b(x);
    return head(x);
  }
  torch::nn::ModuleList h;
  std::vector<Block> blocks;
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Net);

struct PlainImpl : torch::nn::Module {
  at::Tensor forward(const at::Tensor& x) { return x; }
};
TORCH_MODULE(Plain);

/// Two identical models (same seed), one with checkpointing.
std::pair<Net, Net> twins(int n = 16, int depth = 3) {
  torch::manual_seed(1);
  Net a(n, depth);
  torch::manual_seed(1);
  Net b(n, depth);
  return {a, b};
}

/// Runs two steps' forward and backward from the same seed; returns the losses.
std::vector<at::Tensor> run(Net& net, const at::Tensor& x) {
  torch::manual_seed(7);
  std::vector<at::Tensor> losses;
  for (int step = 0; step < 2; ++step) {
    at::Tensor loss = net(x).pow(2).mean();
    loss.backward();
    losses.push_back(loss.detach());
  }
  losses.push_back(torch::rand({4}));  // the generator's stream after the backward: recomputation leaves it as it was
  return losses;
}

std::size_t bytes_in_use() {
#if defined(__GLIBC__)
  const auto info = mallinfo2();
  return info.uordblks + info.hblkhd;
#else
  return 0;
#endif
}

/// Counts the hooks' calls, recomputations apart.
struct Counter : fabric::detail::UnitHook {
  int pre = 0, pre_recompute = 0, post = 0;
  void pre_forward(torch::nn::Module&) override { ++(fabric::detail::in_recompute() ? pre_recompute : pre); }
  void post_forward(torch::nn::Module&, std::vector<at::Tensor>&) override {
    CHECK_FALSE(fabric::detail::in_recompute());
    ++post;
  }
};

}  // namespace

TEST_CASE("apply_activation_checkpointing gives the plain forward's loss and gradients, exactly, with dropout",
          "[checkpoint]") {
  auto [plain, ckpt] = twins();
  CHECK(fabric::apply_activation_checkpointing(ckpt, fabric::module_types<BlockImpl>()) == 3);
  const at::Tensor x = torch::randn({8, 16});
  const auto expected = run(plain, x);
  const auto found = run(ckpt, x);
  for (std::size_t i = 0; i < expected.size(); ++i) CHECK(torch::equal(expected[i], found[i]));
  auto pa = plain->named_parameters();
  auto pb = ckpt->named_parameters();
  for (const auto& item : pa) {
    INFO(item.key());
    REQUIRE(pb[item.key()].grad().defined());
    CHECK(torch::equal(item.value().grad(), pb[item.key()].grad()));
  }
  CHECK(fabric::remove_activation_checkpointing(ckpt) == 3);
  CHECK(fabric::detail::active_units.load() == 0);
}

TEST_CASE("a checkpointed forward keeps only the units' inputs: fewer bytes held after the forward", "[checkpoint]") {
#if !defined(__GLIBC__)
  SKIP("bytes in use come from glibc's mallinfo2");
#endif
  auto [plain, ckpt] = twins(256, 4);
  fabric::apply_activation_checkpointing(ckpt, fabric::module_types<BlockImpl>());
  const at::Tensor x = torch::randn({256, 256});
  auto held = [&](Net& net) {
    const std::size_t before = bytes_in_use();
    at::Tensor loss = net(x).pow(2).mean();
    const std::size_t after = bytes_in_use();
    loss.backward();
    return after - before;
  };
  (void)held(plain);  // warm up the allocator and the thread pool
  (void)held(ckpt);
  const std::size_t plain_bytes = held(plain);
  const std::size_t ckpt_bytes = held(ckpt);
  // Plain: per block the [256, 1024] outputs of fc1 and gelu (1 MiB each), the dropout mask and more
  // (10 MiB for the 4 blocks here); checkpointed: per block its [256, 256] output (256 KiB; 1 MiB here).
  UNSCOPED_INFO("bytes held after the forward: plain " << plain_bytes << ", checkpointed " << ckpt_bytes);
  CHECK(plain_bytes > 8 * (1u << 20));
  CHECK(ckpt_bytes * 4 < plain_bytes);
}

TEST_CASE("activation_checkpoint of a function: non-tensor arguments, several outputs, one that needs no grad",
          "[checkpoint]") {
  const at::Tensor w = torch::randn({5, 5}, torch::requires_grad());
  const at::Tensor x0 = torch::randn({3, 5}, torch::requires_grad());
  auto fn = [](const at::Tensor& x, const at::Tensor& weight, double scale, const std::string& tag) {
    at::Tensor h = torch::dropout(torch::tanh(x.matmul(weight)) * scale, 0.5, /*train=*/true);
    return std::make_tuple(h, h.argmax(-1), tag + "!");
  };
  torch::manual_seed(3);
  auto [h1, idx1, tag1] = fn(x0, w, 2.0, "t");
  (h1.sum()).backward();
  const at::Tensor gw = w.grad().clone(), gx = x0.grad().clone();
  w.mutable_grad().zero_();
  x0.mutable_grad().zero_();

  torch::manual_seed(3);
  auto [h2, idx2, tag2] = fabric::activation_checkpoint(fn, x0, w, 2.0, std::string("t"));
  CHECK(tag2 == "t!");
  CHECK(torch::equal(h1, h2));
  CHECK(torch::equal(idx1, idx2));
  CHECK_FALSE(idx2.requires_grad());
  CHECK(h2.requires_grad());
  h2.sum().backward();
  CHECK(torch::equal(w.grad(), gw));
  CHECK(torch::equal(x0.grad(), gx));

  SECTION("a module in place of the function: its parameters are inputs") {
    torch::nn::Linear lin(5, 2);
    auto y = fabric::activation_checkpoint(lin, x0);
    y.sum().backward();
    REQUIRE(lin->weight.grad().defined());
    CHECK(torch::allclose(lin->weight.grad(), x0.detach().sum(0).expand({2, 5})));
  }
  SECTION("without grad mode it is a plain call") {
    torch::NoGradGuard no_grad;
    auto [h, idx, tag] = fabric::activation_checkpoint(fn, x0, w, 2.0, std::string("t"));
    CHECK_FALSE(h.requires_grad());
  }
  SECTION("tensors inside a vector are inputs too") {
    auto sum = [](const std::vector<at::Tensor>& ts) { return ts[0] * ts[1]; };
    auto out = fabric::activation_checkpoint(sum, std::vector<at::Tensor>{x0, x0});
    x0.mutable_grad().zero_();
    out.sum().backward();
    CHECK(torch::allclose(x0.grad(), 2 * x0.detach()));
  }
}

TEST_CASE("the recomputation runs the units' pre_forward hooks, not post_forward", "[checkpoint]") {
  auto [plain, ckpt] = twins();
  fabric::apply_activation_checkpointing(ckpt, fabric::module_types<BlockImpl>());
  auto counter = std::make_shared<Counter>();
  for (auto& b : ckpt->blocks) fabric::detail::add_unit_hook(*b, counter);
  const at::Tensor x = torch::randn({8, 16});
  {
    fabric::AutocastGuard autocast(c10::DeviceType::CPU, c10::ScalarType::BFloat16);
    at::Tensor loss = ckpt(x).to(torch::kFloat).pow(2).mean();
    CHECK(counter->pre == 3);
    CHECK(counter->post == 3);
    CHECK(counter->pre_recompute == 0);
    fabric::AutocastGuard off(c10::DeviceType::CPU, c10::ScalarType::BFloat16, /*enabled=*/false);
    loss.backward();  // outside autocast: the recomputation must still autocast to match the forward
  }
  CHECK(counter->pre_recompute == 3);
  CHECK(counter->post == 3);
  fabric::detail::remove_unit_hook_everywhere(*counter);
  fabric::remove_activation_checkpointing(ckpt);
}

TEST_CASE("checkpointed gradients under autocast equal the plain ones", "[checkpoint]") {
  auto [plain, ckpt] = twins();
  fabric::apply_activation_checkpointing(ckpt, fabric::module_types<BlockImpl>());
  const at::Tensor x = torch::randn({8, 16});
  for (Net* net : {&plain, &ckpt}) {
    torch::manual_seed(5);
    at::Tensor loss;
    {
      fabric::AutocastGuard on(c10::DeviceType::CPU, c10::ScalarType::BFloat16);
      loss = (*net)(x).to(torch::kFloat).pow(2).mean();
    }
    loss.backward();
  }
  auto pb = ckpt->named_parameters();
  for (const auto& item : plain->named_parameters()) {
    INFO(item.key());
    CHECK(torch::equal(item.value().grad(), pb[item.key()].grad()));
  }
  fabric::remove_activation_checkpointing(ckpt);
}

TEST_CASE("activation checkpointing refuses misuse", "[checkpoint]") {
  Net net;
  SECTION("an empty policy, one that matches nothing, and a matching module that is not a unit") {
    CHECK_THROWS_WITH(fabric::apply_activation_checkpointing(net, fabric::module_types<>()),
                      ContainsSubstring("at least one module type"));
    CHECK_THROWS_WITH(fabric::apply_activation_checkpointing(net, fabric::module_types<PlainImpl>()),
                      ContainsSubstring("no module of the model matches"));
    net->register_module("plain", Plain());
    CHECK_THROWS_WITH(fabric::apply_activation_checkpointing(net, fabric::module_types<PlainImpl>()),
                      ContainsSubstring("the module `plain`") && ContainsSubstring("FABRIC_UNIT(Name)"));
  }
  SECTION("a tensor that needs a gradient, read by the function but not passed to it") {
    const at::Tensor w = torch::randn({4, 4}, torch::requires_grad());
    const at::Tensor x = torch::randn({2, 4}, torch::requires_grad());
    auto y = fabric::activation_checkpoint([&](const at::Tensor& in) { return in.matmul(w); }, x);
    CHECK_THROWS_WITH(y.sum().backward(), ContainsSubstring("not among its arguments"));
  }
  SECTION("a second backward through the same checkpointed forward needs retain_graph, as without") {
    const at::Tensor x = torch::randn({2, 4}, torch::requires_grad());
    auto y = fabric::activation_checkpoint([](const at::Tensor& in) { return in.sin(); }, x);
    at::Tensor loss = y.sum();
    loss.backward({}, /*retain_graph=*/true);
    loss.backward();
    CHECK(torch::allclose(x.grad(), 2 * x.detach().cos()));
    CHECK_THROWS_WITH(loss.backward(), ContainsSubstring("second time"));
  }
}

TEST_CASE("activation checkpointing applies to a set-up module and trains through Fabric", "[checkpoint]") {
  auto [plain, ckpt] = twins();
  fabric::Fabric<fabric::CPU> fab;
  torch::optim::SGD sgd_plain(plain->parameters(), 0.1), sgd_ckpt(ckpt->parameters(), 0.1);
  auto [mp, op] = fab.setup(plain, sgd_plain);
  auto [mc, oc] = fab.setup(ckpt, sgd_ckpt);
  CHECK(fabric::apply_activation_checkpointing(mc, fabric::module_types<BlockImpl>()) == 3);
  const at::Tensor x = torch::randn({8, 16});
  for (int step = 0; step < 2; ++step) {
    torch::manual_seed(step);
    fab.backward(mp(x).pow(2).mean());
    torch::manual_seed(step);
    fab.backward(mc(x).pow(2).mean());
    op.step();
    oc.step();
    op.zero_grad();
    oc.zero_grad();
  }
  auto pc = ckpt->named_parameters();
  for (const auto& item : plain->named_parameters()) CHECK(torch::equal(item.value(), pc[item.key()]));
  CHECK(fabric::remove_activation_checkpointing(mc) == 3);
}

TEST_CASE("activation checkpointing on CUDA restores the device's generator for dropout", "[checkpoint][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  auto [plain, ckpt] = twins();
  plain->to(torch::kCUDA);
  ckpt->to(torch::kCUDA);
  fabric::apply_activation_checkpointing(ckpt, fabric::module_types<BlockImpl>());
  const at::Tensor x = torch::randn({8, 16}).to(torch::kCUDA);
  for (Net* net : {&plain, &ckpt}) {
    torch::manual_seed(9);
    (*net)(x).pow(2).mean().backward();
  }
  auto pc = ckpt->named_parameters();
  for (const auto& item : plain->named_parameters()) {
    INFO(item.key());
    CHECK(torch::allclose(item.value().grad(), pc[item.key()].grad(), 1e-5, 1e-6));
  }
  fabric::remove_activation_checkpointing(ckpt);
}
