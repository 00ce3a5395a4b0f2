// fabric::Unit / FABRIC_UNIT: the hook registry (order, replacement of outputs, removal, dead modules and
// reused addresses, threads), is_unit, ModuleTypes, the policy walk's refusals, and the call forms a model
// uses (holder call, ModuleList, several arguments and outputs).

#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

struct BlockImpl : torch::nn::Module {
  BlockImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  explicit BlockImpl(int n) : fc(register_module("fc", torch::nn::Linear(n, n))) {}
  at::Tensor forward(const at::Tensor& x) { return x + fc(x); }
  torch::nn::Linear fc;
};
FABRIC_UNIT(Block);

struct PlainImpl : torch::nn::Module {
  at::Tensor forward(const at::Tensor& x) { return x * 2; }
};
TORCH_MODULE(Plain);

struct DerivedBlockImpl : BlockImpl {};
FABRIC_UNIT(DerivedBlock);

/// Several arguments (one not a tensor), two outputs (one that needs no grad).
struct PairImpl : torch::nn::Module {
  PairImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& y, double scale) {
    return {fc(x) * scale + y, x.argmax(-1)};
  }
  torch::nn::Linear fc;
};
FABRIC_UNIT(Pair);

struct ModelImpl : torch::nn::Module {
  ModelImpl() : h(register_module("h", torch::nn::ModuleList())) {
    for (int i = 0; i < 2; ++i) h->push_back(Block());
  }
  at::Tensor forward(at::Tensor x) {
    for (std::size_t i = 0; i < h->size(); ++i) x = Block(h->ptr<BlockImpl>(i))(x);
    return x;
  }
  torch::nn::ModuleList h;
};
TORCH_MODULE(Model);

/// Records the calls it sees in a shared log.
struct Recorder : fabric::detail::UnitHook {
  Recorder(std::string name, std::vector<std::string>& log) : name(std::move(name)), log(&log) {}
  void pre_forward(torch::nn::Module&) override {
    log->push_back("pre " + name + (fabric::detail::in_recompute() ? " (recompute)" : ""));
  }
  void post_forward(torch::nn::Module&, std::vector<at::Tensor>& outputs) override {
    log->push_back("post " + name + " " + std::to_string(outputs.size()));
  }
  std::string name;
  std::vector<std::string>* log;
};

/// Replaces each output by itself times two.
struct Doubler : fabric::detail::UnitHook {
  void pre_forward(torch::nn::Module&) override {}
  void post_forward(torch::nn::Module&, std::vector<at::Tensor>& outputs) override {
    for (auto& t : outputs) t = t * 2;
  }
};

}  // namespace

TEST_CASE("a FABRIC_UNIT holder is a unit and calls Impl::forward exactly when no hook is installed", "[unit]") {
  Block block;
  Plain plain;
  CHECK(fabric::detail::is_unit(*block));
  CHECK_FALSE(fabric::detail::is_unit(*plain));
  CHECK(fabric::detail::active_units.load() == 0);
  static_assert(sizeof(Block) == sizeof(torch::nn::ModuleHolder<BlockImpl>), "the holder adds no state");
  const at::Tensor x = torch::randn({2, 4});
  CHECK(torch::equal(block(x), block->forward(x)));
  Block with_n(3);
  CHECK(with_n->fc->weight.size(0) == 3);
  CHECK(fabric::detail::is_unit(*with_n));
  Block empty = nullptr;
  CHECK(empty.is_empty());
  CHECK_THROWS(empty(x));
}

TEST_CASE("unit hooks run pre_forward in installation order and post_forward in reverse", "[unit]") {
  Block block;
  std::vector<std::string> log;
  auto a = std::make_shared<Recorder>("a", log);
  auto b = std::make_shared<Recorder>("b", log);
  fabric::detail::add_unit_hook(*block, a);
  fabric::detail::add_unit_hook(*block, b);
  CHECK(fabric::detail::active_units.load() == 1);
  (void)block(torch::randn({2, 4}));
  CHECK(log == std::vector<std::string>{"pre a", "pre b", "post b 1", "post a 1"});

  SECTION("a second holder of the same module runs the same hooks") {
    log.clear();
    Block other(block.ptr());
    (void)other(torch::randn({2, 4}));
    CHECK(log.size() == 4);
  }
  SECTION("outputs that need no grad are not passed to post_forward") {
    log.clear();
    torch::NoGradGuard no_grad;
    (void)block(torch::randn({2, 4}));
    CHECK(log == std::vector<std::string>{"pre a", "pre b", "post b 0", "post a 0"});
  }
  SECTION("remove_unit_hook removes one hook by identity; removing the last one makes calls free again") {
    fabric::detail::remove_unit_hook(*block, *a);
    log.clear();
    (void)block(torch::randn({2, 4}));
    CHECK(log == std::vector<std::string>{"pre b", "post b 1"});
    fabric::detail::remove_unit_hook(*block, *a);  // not installed: nothing happens
    fabric::detail::remove_unit_hook_everywhere(*b);
    CHECK(fabric::detail::active_units.load() == 0);
    log.clear();
    (void)block(torch::randn({2, 4}));
    CHECK(log.empty());
  }
  fabric::detail::remove_unit_hook(*block, *a);
  fabric::detail::remove_unit_hook(*block, *b);
  CHECK(fabric::detail::active_units.load() == 0);
}

TEST_CASE("a post_forward hook may replace the outputs; several arguments and outputs pass through", "[unit]") {
  Pair pair;
  const at::Tensor x = torch::randn({3, 4});
  const at::Tensor y = torch::randn({3, 4});
  auto [plain_out, plain_idx] = pair(x, y, 0.5);
  fabric::detail::add_unit_hook(*pair, std::make_shared<Doubler>());
  auto [out, idx] = pair(x, y, 0.5);
  CHECK(torch::allclose(out, plain_out * 2));
  CHECK(torch::equal(idx, plain_idx));  // int64, needs no grad: not given to the hook, not replaced
  std::vector<std::string> log;
  auto rec = std::make_shared<Recorder>("r", log);
  fabric::detail::add_unit_hook(*pair, rec);
  (void)pair(x, y, 0.5);
  CHECK(log.back() == "post r 1");
  fabric::detail::remove_unit_hook_everywhere(*rec);
  Pair().get();  // another instance is unaffected
}

TEST_CASE("units in a ModuleList called through their holders run their hooks", "[unit]") {
  Model model;
  std::vector<std::string> log;
  auto rec = std::make_shared<Recorder>("r", log);
  auto found = fabric::detail::policy_units(*model, fabric::module_types<BlockImpl>(), "test");
  REQUIRE(found.size() == 2);
  CHECK(found[0].path == "h.0");
  CHECK(found[1].path == "h.1");
  for (auto& u : found) fabric::detail::add_unit_hook(*u.module, rec);
  const at::Tensor x = torch::randn({2, 4}, torch::requires_grad());
  model(x).sum().backward();
  CHECK(log == std::vector<std::string>{"pre r", "post r 1", "pre r", "post r 1"});
  fabric::detail::remove_unit_hook_everywhere(*rec);
  CHECK(fabric::detail::active_units.load() == 0);
}

TEST_CASE("a dead unit leaves no entry, and a module later at its address is not taken for it", "[unit]") {
  const std::size_t before = fabric::detail::unit_registry().size();
  {
    Block block;
    fabric::detail::add_unit_hook(*block, std::make_shared<Doubler>());
    CHECK(fabric::detail::unit_registry().size() == before + 1);
  }
  CHECK(fabric::detail::unit_registry().size() == before);
  CHECK(fabric::detail::active_units.load() == 0);

  // An adopted module (made by the user, not by the holder) is forgotten lazily: its address may come
  // back for a new module, which must not inherit its hooks. (Not made by make_shared: there the
  // registry's weak_ptr would keep the memory, and so the address, from being reused.)
  auto p = std::shared_ptr<BlockImpl>(new BlockImpl());
  const void* address = p.get();
  {
    Block adopted(p);
    fabric::detail::add_unit_hook(*adopted, std::make_shared<Doubler>());
  }
  p.reset();
  bool reused = false;
  std::vector<std::shared_ptr<BlockImpl>> keep;
  for (int i = 0; i < 64 && !reused; ++i) {
    keep.push_back(std::shared_ptr<BlockImpl>(new BlockImpl()));
    reused = keep.back().get() == address;
  }
  if (reused) {
    CHECK_FALSE(fabric::detail::is_unit(*keep.back()));
    const at::Tensor x = torch::randn({2, 4});
    CHECK(torch::equal(Block(keep.back())(x), keep.back()->forward(x)));  // adopted afresh: no hooks
  }
  Block trigger;  // installing a hook prunes dead entries
  auto hook = std::make_shared<Doubler>();
  fabric::detail::add_unit_hook(*trigger, hook);
  fabric::detail::remove_unit_hook(*trigger, *hook);
  CHECK(fabric::detail::active_units.load() == 0);
}

TEST_CASE("hooks may be installed and removed while other threads call units", "[unit]") {
  std::vector<Block> blocks(4);
  std::atomic<bool> stop{false};
  std::vector<std::thread> callers;
  for (int t = 0; t < 3; ++t) {
    callers.emplace_back([&, t] {
      torch::NoGradGuard no_grad;
      const at::Tensor x = torch::randn({1, 4});
      while (!stop.load()) (void)blocks[t % 4](x);
    });
  }
  for (int i = 0; i < 200; ++i) {
    auto hook = std::make_shared<Doubler>();
    fabric::detail::add_unit_hook(*blocks[i % 4], hook);
    fabric::detail::remove_unit_hook(*blocks[i % 4], *hook);
  }
  stop = true;
  for (auto& c : callers) c.join();
  CHECK(fabric::detail::active_units.load() == 0);
}

TEST_CASE("ModuleTypes matches the listed types and types derived from them", "[unit]") {
  const auto types = fabric::module_types<BlockImpl>();
  CHECK(types.matches(*Block()));
  CHECK(types.matches(*DerivedBlock()));
  CHECK_FALSE(types.matches(*Plain()));
  CHECK_FALSE(fabric::module_types<>().matches(*Block()));
  CHECK(fabric::module_types<>().empty());
  CHECK(fabric::module_types<BlockImpl, PlainImpl>().size() == 2);
}

TEST_CASE("a policy refuses a matching module that is not a unit, and a unit in a Sequential", "[unit]") {
  Model model;
  model->register_module("extra", Plain());
  CHECK_THROWS_WITH(fabric::detail::policy_units(*model, fabric::module_types<PlainImpl>(), "apply_x"),
                    ContainsSubstring("apply_x: the module `extra`") && ContainsSubstring("FABRIC_UNIT(Name)"));
  CHECK_THROWS_WITH(fabric::detail::add_unit_hook(*model->named_modules()["extra"], std::make_shared<Doubler>()),
                    ContainsSubstring("not one"));
  torch::nn::Sequential seq{Block(), Plain()};
  CHECK_THROWS_WITH(fabric::detail::policy_units(*seq, fabric::module_types<BlockImpl>(), "apply_x"),
                    ContainsSubstring("`0`") && ContainsSubstring("torch::nn::Sequential"));
  // Without a policy a Sequential of units runs as before.
  CHECK(seq->forward(torch::randn({2, 4})).sizes() == std::vector<int64_t>{2, 4});
}
