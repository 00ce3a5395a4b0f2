// Checkpoints: fabric.save / fabric.load / fabric.load_raw.
//
// Round trips of modules (parameters and buffers), optimizers (training continues identically) and
// plain values; std::ref write-back; leftovers; strict and non-strict loading with every problem
// reported by name and nothing changed on failure; atomic writes under a real SIGKILL; truncated,
// empty and foreign files; torch::save archives through load_raw.

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// NOTE: LibTorch 1.13 keys optimizer state by the printed TensorImpl address, 2.x by the pointer.
template <class StateMap>
auto state_key(const StateMap& /*state*/, const torch::Tensor& param) {
  if constexpr (std::is_same_v<typename StateMap::key_type, std::string>) {
    return c10::str(param.unsafeGetTensorImpl());
  } else {
    return static_cast<typename StateMap::key_type>(param.unsafeGetTensorImpl());
  }
}

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;

// A fresh directory per test, removed after.
struct TempDir : fabric_test::TempDir {
  TempDir() : fabric_test::TempDir("fabric-ckpt") {}
};

// A module with a submodule, a Sequential and a BatchNorm (running stats, num_batches_tracked).
struct NetImpl : torch::nn::Module {
  explicit NetImpl(std::int64_t hidden = 8)
      : fc(register_module("fc", torch::nn::Linear(4, hidden))),
        bn(register_module("bn", torch::nn::BatchNorm1d(hidden))),
        head(register_module("head", torch::nn::Sequential(torch::nn::Linear(hidden, 3)))),
        scale(register_buffer("scale", torch::ones({3}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(torch::relu(bn(fc(x)))) * scale; }

  torch::nn::Linear fc;
  torch::nn::BatchNorm1d bn;
  torch::nn::Sequential head;
  torch::Tensor scale;
};
TORCH_MODULE(Net);

using Tensors = std::map<std::string, torch::Tensor>;

// Copies of a module's parameters and buffers by dotted name.
Tensors snapshot(const torch::nn::Module& module) {
  Tensors out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value().detach().clone();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value().detach().clone();
  return out;
}

bool same(const Tensors& a, const Tensors& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, t] : a) {
    const auto it = b.find(name);
    if (it == b.end() || t.sizes() != it->second.sizes() || t.dtype() != it->second.dtype() ||
        !torch::equal(t, it->second)) {
      return false;
    }
  }
  return true;
}

std::vector<torch::Tensor> batches(int n, std::uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < n; ++i) out.push_back(torch::randn({16, 4}));
  return out;
}

template <class M>
void train(M& net, torch::optim::Optimizer& optimizer, const std::vector<torch::Tensor>& xs) {
  net->train();
  for (const auto& x : xs) {
    optimizer.zero_grad();
    auto loss = net->forward(x).pow(2).mean();
    loss.backward();
    optimizer.step();
  }
}

double lr_of(torch::optim::Optimizer& optimizer) { return optimizer.param_groups().at(0).options().get_lr(); }

// The serialized state of an optimizer, to compare two optimizers (or one before and after).
std::string optimizer_bytes(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

// Whether two AdamW optimizers hold exactly the same state, parameter by parameter (in group order).
bool same_state(const torch::optim::AdamW& a, const torch::optim::AdamW& b) {
  auto params_of = [](const torch::optim::Optimizer& o) {
    std::vector<torch::Tensor> out;
    for (const auto& g : o.param_groups()) {
      for (const auto& p : g.params()) out.push_back(p);
    }
    return out;
  };
  const auto pa = params_of(a);
  const auto pb = params_of(b);
  if (pa.size() != pb.size() || a.state().size() != b.state().size()) return false;
  for (std::size_t i = 0; i < pa.size(); ++i) {
    const auto sa = a.state().find(state_key(a.state(), pa[i]));
    const auto sb = b.state().find(state_key(b.state(), pb[i]));
    if ((sa == a.state().end()) != (sb == b.state().end())) return false;
    if (sa == a.state().end()) continue;
    const auto& x = static_cast<const torch::optim::AdamWParamState&>(*sa->second);
    const auto& y = static_cast<const torch::optim::AdamWParamState&>(*sb->second);
    if (x.step() != y.step() || !torch::equal(x.exp_avg(), y.exp_avg()) ||
        !torch::equal(x.exp_avg_sq(), y.exp_avg_sq())) {
      return false;
    }
  }
  return true;
}

// The message of the fabric::Error that f throws (fails the test when it throws nothing or another type).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fabric::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected a fabric::Error, caught another exception: " << e.what());
  } catch (...) {
    FAIL("expected a fabric::Error, caught a non-std exception");
  }
  FAIL("expected a fabric::Error, nothing was thrown");
  return {};
}

std::vector<char> bytes_of(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const char* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data, static_cast<std::streamsize>(size));
}

std::vector<fs::path> tmp_leftovers(const fs::path& dir, const std::string& leaf) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().starts_with(leaf + ".tmp-")) out.push_back(e.path());
  }
  return out;
}

}  // namespace

// ---- round trips ------------------------------------------------------------------------------

TEST_CASE("save/load round trip: modules, optimizer state and plain values", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "ckpt" / "last.ckpt";  // the parent directory does not exist yet

  torch::manual_seed(1);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  train(net, adamw, batches(3, 11));
  REQUIRE(net->bn->num_batches_tracked.item<std::int64_t>() == 3);

  const auto values = torch::arange(12, torch::kFloat32).reshape({3, 4});
  fabric.save(path, {{"model", net},
                     {"optimizer", adamw},
                     {"epoch", 7},
                     {"global_step", std::int64_t{1} << 40},
                     {"lr", 0.125},
                     {"ratio", 0.5F},
                     {"best", true},
                     {"done", false},
                     {"name", "run-a"},
                     {"notes", std::string("commas, \"quotes\" and\nnewlines")},
                     {"tensor", values},
                     {"strided", values.t()},
                     {"ints", torch::tensor({1, 2, 3}, torch::kInt64)}});
  REQUIRE(fs::is_regular_file(path));
  CHECK(tmp_leftovers(path.parent_path(), "last.ckpt").empty());

  const Tensors expected = snapshot(*net);

  // A differently initialised copy, trained differently, with another learning rate.
  torch::manual_seed(2);
  Net net2;
  torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(0.5));
  train(net2, adamw2, batches(1, 99));
  REQUIRE_FALSE(same(snapshot(*net2), expected));
  REQUIRE_FALSE(same_state(adamw2, adamw));

  fabric::State state{{"model", net2},
                      {"optimizer", adamw2},
                      {"epoch", 0},
                      {"global_step", 0},
                      {"lr", 0.0},
                      {"ratio", 0.0F},
                      {"best", false},
                      {"done", true},
                      {"name", ""},
                      {"notes", ""},
                      {"tensor", torch::zeros({1})},
                      {"strided", torch::zeros({1})},
                      {"ints", torch::zeros({1})}};
  const fabric::State rest = fabric.load(path, state);
  CHECK(rest.empty());

  CHECK(same(snapshot(*net2), expected));
  CHECK(net2->bn->num_batches_tracked.item<std::int64_t>() == 3);
  CHECK(same_state(adamw2, adamw));
  CHECK(lr_of(adamw2) == 1e-2);  // hyper-parameters come back too, like load_state_dict
  CHECK(static_cast<torch::optim::AdamWOptions&>(adamw2.param_groups()[0].options()).weight_decay() == 0.1);

  CHECK(state.at("epoch").get<int>() == 7);
  CHECK(state.at("global_step").get<std::int64_t>() == (std::int64_t{1} << 40));
  CHECK(state.at("lr").get<double>() == 0.125);
  CHECK(state.at("ratio").get<float>() == 0.5F);
  CHECK(state.at("best").get<bool>());
  CHECK_FALSE(state.at("done").get<bool>());
  CHECK(state.at("name").get<std::string>() == "run-a");
  CHECK(state.at("notes").get<std::string>() == "commas, \"quotes\" and\nnewlines");
  CHECK(torch::equal(state.at("tensor").get<torch::Tensor>(), values));
  CHECK(torch::equal(state.at("strided").get<torch::Tensor>(), values.t()));
  CHECK(state.at("ints").get<torch::Tensor>().dtype() == torch::kInt64);
  CHECK(torch::equal(state.at("ints").get<torch::Tensor>(), torch::tensor({1, 2, 3}, torch::kInt64)));
  CHECK_THROWS_AS(state.at("name").get<int>(), fabric::Error);

  // Training goes on identically from the original and from the restored copy.
  const auto more = batches(2, 5);
  train(net, adamw, more);
  train(net2, adamw2, more);
  CHECK(same(snapshot(*net2), snapshot(*net)));
  CHECK(same_state(adamw2, adamw));
}

TEST_CASE("save/load round trip through setup() wrappers", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "wrapped.ckpt";

  torch::manual_seed(3);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  for (const auto& x : batches(2, 21)) {
    optimizer.zero_grad();
    fabric.backward(model(x).pow(2).mean());
    optimizer.step();
  }
  fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"iteration", 2}});

  torch::manual_seed(4);
  Net net2;
  torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(3e-3));
  auto [model2, optimizer2] = fabric.setup(net2, adamw2);
  fabric::State state{{"model", model2}, {"optimizer", optimizer2}, {"iteration", 0}};
  CHECK(fabric.load(path, state).empty());
  CHECK(same(snapshot(*net2), snapshot(*net)));
  CHECK(same_state(adamw2, adamw));
  CHECK(lr_of(adamw2) == 1e-2);
  CHECK(state.at("iteration").get<int>() == 2);

  // The plain objects work as state entries too (a module object, not a holder).
  NetImpl& object = *net2;
  fabric::State by_object{{"model", object}};
  CHECK_NOTHROW(fabric.load(path, by_object, false));
}

TEST_CASE("load takes the state in place, restoring modules and optimizers where they are", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "in_place.ckpt";
  torch::manual_seed(5);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  auto [model, optimizer] = fabric.setup(net, adamw);
  fabric.backward(model(batches(1, 22)[0]).sum());
  optimizer.step();
  fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"step", 1}});

  torch::manual_seed(6);
  Net other;
  torch::optim::AdamW other_adamw(other->parameters(), torch::optim::AdamWOptions(3e-3));
  auto [model2, optimizer2] = fabric.setup(other, other_adamw);
  const fabric::State rest = fabric.load(path, {{"model", model2}, {"optimizer", optimizer2}});
  CHECK(same(snapshot(*other), snapshot(*net)));
  CHECK(same_state(other_adamw, adamw));
  REQUIRE(rest.count("step") == 1);  // what the state did not ask for comes back
  CHECK(rest.at("step").get<int>() == 1);
  CHECK_THROWS_WITH(fabric.load(path, {{"model", model2}, {"missing", 0}}), ContainsSubstring("missing"));
}

TEST_CASE("std::ref entries receive the loaded values", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "refs.ckpt";

  int epoch = 5;
  double best = 0.25;
  bool flag = true;
  std::string tag = "hello";
  torch::Tensor tensor = torch::tensor({1.5, 2.5});
  float ratio = 2.5F;
  std::int64_t big = std::int64_t{3} << 50;
  fabric.save(path, {{"epoch", std::ref(epoch)},
                     {"best", std::ref(best)},
                     {"flag", std::ref(flag)},
                     {"tag", std::ref(tag)},
                     {"tensor", std::ref(tensor)},
                     {"ratio", std::ref(ratio)},
                     {"big", std::ref(big)},
                     {"whole", 3}});

  epoch = 0;
  best = 0;
  flag = false;
  tag.clear();
  tensor = torch::zeros({1});
  ratio = 0;
  big = 0;
  double whole = 0;  // an integer in the file fits a floating-point variable
  fabric::State state{{"epoch", std::ref(epoch)}, {"best", std::ref(best)},     {"flag", std::ref(flag)},
                      {"tag", std::ref(tag)},     {"tensor", std::ref(tensor)}, {"ratio", std::ref(ratio)},
                      {"big", std::ref(big)},     {"whole", std::ref(whole)}};
  CHECK(fabric.load(path, state).empty());
  CHECK(epoch == 5);
  CHECK(best == 0.25);
  CHECK(flag);
  CHECK(tag == "hello");
  CHECK(torch::equal(tensor, torch::tensor({1.5, 2.5})));
  CHECK(ratio == 2.5F);
  CHECK(big == (std::int64_t{3} << 50));
  CHECK(whole == 3.0);
  CHECK(state.at("epoch").get<int>() == 5);  // the entry holds the value as well
}

TEST_CASE("load returns what the state did not ask for; load(path) returns everything", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "all.ckpt";

  torch::manual_seed(5);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  train(net, adamw, batches(1, 7));
  fabric.save(path, {{"model", net}, {"optimizer", adamw}, {"epoch", 3}, {"note", "x"}, {"t", torch::ones({2})}});

  Net net2;
  fabric::State state{{"model", net2}};
  const fabric::State rest = fabric.load(path, state);
  CHECK(same(snapshot(*net2), snapshot(*net)));
  REQUIRE(rest.size() == 4);
  CHECK(rest.at("epoch").get<int>() == 3);
  CHECK(rest.at("note").get<std::string>() == "x");
  CHECK(torch::equal(rest.at("t").get<torch::Tensor>(), torch::ones({2})));
  CHECK(rest.contains("optimizer"));
  CHECK_FALSE(rest.contains("model"));
  CHECK_FALSE(rest.contains("__fabric__"));

  const fabric::State all = fabric.load(path);
  REQUIRE(all.size() == 5);
  CHECK_FALSE(all.contains("__fabric__"));
  CHECK(all.at("epoch").get<std::int64_t>() == 3);
  REQUIRE(all.at("model").value().isGenericDict());
  const auto model_dict = all.at("model").value().toGenericDict();
  CHECK(model_dict.size() == snapshot(*net).size());
  CHECK(torch::equal(model_dict.at("fc.weight").toTensor(), net->fc->weight));
  CHECK(torch::equal(model_dict.at("bn.running_mean").toTensor(), net->bn->running_mean));
  CHECK(torch::equal(model_dict.at("head.0.bias").toTensor(), net->head[0]->as<torch::nn::Linear>()->bias));
}

// ---- strict and non-strict loading --------------------------------------------------------------

TEST_CASE("non-strict load skips missing keys and missing module tensors", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "small.ckpt";

  torch::manual_seed(6);
  torch::nn::Sequential small(torch::nn::Linear(4, 8));
  fabric.save(path, {{"model", small}, {"epoch", 1}});

  torch::nn::Sequential big(torch::nn::Linear(4, 8), torch::nn::Linear(8, 2));
  const Tensors big_before = snapshot(*big);
  fabric::State state{{"model", big}, {"epoch", 0}, {"missing", 42}};

  const std::string msg = error_of([&] { fabric.load(path, state); });
  CHECK_THAT(msg, ContainsSubstring("\"missing\": missing from the checkpoint"));
  CHECK_THAT(msg, ContainsSubstring("\"model.1.weight\": missing from the checkpoint"));
  CHECK_THAT(msg, ContainsSubstring("\"model.1.bias\": missing from the checkpoint"));
  CHECK_THAT(msg, ContainsSubstring("strict"));
  CHECK(same(snapshot(*big), big_before));
  CHECK(state.at("epoch").get<int>() == 0);

  CHECK(fabric.load(path, state, /*strict=*/false).empty());
  const Tensors after = snapshot(*big);
  CHECK(torch::equal(after.at("0.weight"), small[0]->as<torch::nn::Linear>()->weight));
  CHECK(torch::equal(after.at("0.bias"), small[0]->as<torch::nn::Linear>()->bias));
  CHECK(torch::equal(after.at("1.weight"), big_before.at("1.weight")));
  CHECK(torch::equal(after.at("1.bias"), big_before.at("1.bias")));
  CHECK(state.at("epoch").get<int>() == 1);
  CHECK(state.at("missing").get<int>() == 42);
}

TEST_CASE("strict load reports unexpected module tensors; non-strict ignores them", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "big.ckpt";

  torch::manual_seed(7);
  torch::nn::Sequential big(torch::nn::Linear(4, 8), torch::nn::Linear(8, 2));
  fabric.save(path, {{"model", big}});

  torch::nn::Sequential small(torch::nn::Linear(4, 8));
  const Tensors before = snapshot(*small);
  fabric::State state{{"model", small}};
  const std::string msg = error_of([&] { fabric.load(path, state); });
  CHECK_THAT(msg, ContainsSubstring("\"model.1.weight\": in the checkpoint but not in the module"));
  CHECK_THAT(msg, ContainsSubstring("\"model.1.bias\": in the checkpoint but not in the module"));
  CHECK_THAT(msg, ContainsSubstring("2 problems"));
  CHECK(same(snapshot(*small), before));

  fabric.load(path, state, false);
  CHECK(torch::equal(small[0]->as<torch::nn::Linear>()->weight, big[0]->as<torch::nn::Linear>()->weight));
}

TEST_CASE("load reports every problem by name in one message and changes nothing", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "problems.ckpt";

  torch::manual_seed(8);
  Net net(8);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  train(net, adamw, batches(2, 3));
  fabric.save(path, {{"model", net}, {"optimizer", adamw}, {"name", "run"}, {"epoch", 3}, {"lr", 0.5}});

  SECTION("wrong shapes (both shown), wrong value types and missing keys, all at once") {
    Net wide(16);
    const Tensors before = snapshot(*wide);
    int epoch = -1;
    fabric::State state{{"model", wide}, {"name", 0}, {"epoch", std::ref(epoch)}, {"lr", "fast"}, {"absent", 1.0}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("fabric: "));
    CHECK_THAT(msg, ContainsSubstring(path.string()));
    CHECK_THAT(msg, ContainsSubstring("\"model.fc.weight\": expected shape [16, 4], found shape [8, 4]"));
    CHECK_THAT(msg, ContainsSubstring("\"model.bn.running_mean\": expected shape [16], found shape [8]"));
    CHECK_THAT(msg, ContainsSubstring("\"model.head.0.weight\": expected shape [3, 16], found shape [3, 8]"));
    CHECK_THAT(msg, ContainsSubstring("\"name\": expected an integer, found a string"));
    CHECK_THAT(msg, ContainsSubstring("\"lr\": expected a string, found a floating-point number"));
    CHECK_THAT(msg, ContainsSubstring("\"absent\": missing from the checkpoint"));
    CHECK_THAT(msg, ContainsSubstring("nothing was changed"));
    CHECK(same(snapshot(*wide), before));
    CHECK(epoch == -1);  // the valid entry was not written back either
    CHECK(state.at("name").get<int>() == 0);

    // Shapes and types are errors even without strict.
    const std::string lenient = error_of([&] { fabric.load(path, state, false); });
    CHECK_THAT(lenient, ContainsSubstring("\"model.fc.weight\": expected shape [16, 4], found shape [8, 4]"));
    CHECK_THAT(lenient, ContainsSubstring("\"name\": expected an integer, found a string"));
    CHECK_THAT(lenient, !ContainsSubstring("\"absent\""));
    CHECK(same(snapshot(*wide), before));
    CHECK(epoch == -1);
  }

  SECTION("a failed load leaves modules, optimizers and referenced variables untouched") {
    torch::manual_seed(9);
    Net net2(8);
    torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(0.3));
    train(net2, adamw2, batches(1, 4));
    const Tensors before = snapshot(*net2);
    const auto opt_before = optimizer_bytes(adamw2);
    int epoch = -1;
    fabric::State state{{"model", net2}, {"optimizer", adamw2}, {"epoch", std::ref(epoch)}, {"name", 1.5}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"name\": expected a floating-point number, found a string"));
    CHECK_THAT(msg, ContainsSubstring("1 problem"));
    CHECK(same(snapshot(*net2), before));
    CHECK((optimizer_bytes(adamw2) == opt_before));  // not decomposed: binary
    CHECK(lr_of(adamw2) == 0.3);
    CHECK(epoch == -1);
  }

  SECTION("an optimizer of another type is an error by name, and the module is not restored") {
    torch::manual_seed(10);
    Net net2(8);
    torch::optim::SGD sgd(net2->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    train(net2, sgd, batches(1, 4));
    const Tensors before = snapshot(*net2);
    const auto opt_before = optimizer_bytes(sgd);
    fabric::State state{{"model", net2}, {"optimizer", sgd}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"optimizer\""));
    CHECK_THAT(msg, ContainsSubstring("SGD"));
    CHECK_THAT(msg, ContainsSubstring("AdamW"));
    CHECK(same(snapshot(*net2), before));
    CHECK((optimizer_bytes(sgd) == opt_before));  // not decomposed: binary
  }

  SECTION("an optimizer over parameters of other shapes is an error by name") {
    Net wide(16);
    torch::optim::AdamW adamw2(wide->parameters(), torch::optim::AdamWOptions(1e-3));
    fabric::State state{{"optimizer", adamw2}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"optimizer\""));
    CHECK_THAT(msg, ContainsSubstring("expected shape [16, 4], found shape [8, 4]"));
    CHECK(adamw2.state().empty());
    CHECK(lr_of(adamw2) == 1e-3);
  }

  SECTION("an optimizer over fewer parameters is an error") {
    torch::nn::Linear lin(4, 8);
    torch::optim::AdamW adamw2(lin->parameters(), torch::optim::AdamWOptions(1e-3));
    fabric::State state{{"optimizer", adamw2}};
    CHECK_THAT(error_of([&] { fabric.load(path, state); }), ContainsSubstring("\"optimizer\""));
    CHECK(adamw2.state().empty());
  }

  SECTION("an entry of the wrong kind is an error by name") {
    Net net2(8);
    fabric::State state{{"model", 0}, {"epoch", net2}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"model\": expected a value, found a module"));
    CHECK_THAT(msg, ContainsSubstring("\"epoch\": expected a module, found a value"));
  }
}

TEST_CASE("an optimizer that had no state yet is restored as saved (its old state is dropped)", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "fresh.ckpt";

  torch::manual_seed(11);
  Net net;
  torch::optim::AdamW fresh(net->parameters(), torch::optim::AdamWOptions(1e-2));
  fabric.save(path, {{"model", net}, {"optimizer", fresh}});  // before any step: no state

  torch::optim::AdamW trained(net->parameters(), torch::optim::AdamWOptions(1e-2));
  train(net, trained, batches(1, 2));
  REQUIRE_FALSE(trained.state().empty());
  fabric::State state{{"optimizer", trained}};
  fabric.load(path, state, false);
  CHECK(trained.state().empty());
}

// ---- the file on disk ---------------------------------------------------------------------------

TEST_CASE("save creates parent directories and replaces an existing checkpoint", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "a" / "b" / "c" / "ckpt.pt";

  fabric.save(path, {{"epoch", 1}, {"tag", "first"}});
  REQUIRE(fs::is_regular_file(path));
  fabric.save(path, {{"epoch", 2}, {"tag", "second"}, {"extra", true}});
  const auto loaded = fabric.load(path);
  CHECK(loaded.at("epoch").get<int>() == 2);
  CHECK(loaded.at("tag").get<std::string>() == "second");
  CHECK(loaded.at("extra").get<bool>());
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(path.parent_path())) files.push_back(e.path().filename().string());
  CHECK(files == std::vector<std::string>{"ckpt.pt"});

  // A relative path without a directory part works as well.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path());
  CHECK_NOTHROW(fabric.save("relative.ckpt", {{"x", 1}}));
  fs::current_path(cwd);
  CHECK(fs::is_regular_file(dir / "relative.ckpt"));
}

TEST_CASE("save rejects what it cannot store, before touching the file", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "bad.ckpt";
  fabric.save(path, {{"epoch", 1}});

  CHECK_THAT(error_of([&] { fabric.save(path, {{"__fabric__", 1}}); }), ContainsSubstring("reserved"));
  CHECK_THAT(error_of([&] { fabric.save(path, {{"t", torch::Tensor()}}); }), ContainsSubstring("\"t\""));
  CHECK_THAT(error_of([&] {
               fabric.save(path, {{"v", fabric::StateEntry(c10::IValue())}});
             }),
             ContainsSubstring("\"v\""));
  CHECK_THAT(error_of([&] { fabric.save(dir.path(), {{"x", 1}}); }), ContainsSubstring(dir.path().string()));
  CHECK(fabric.load(path).at("epoch").get<int>() == 1);
  CHECK(tmp_leftovers(dir.path(), "bad.ckpt").empty());
}

TEST_CASE("save is atomic: a writer killed mid-write leaves the previous checkpoint intact", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "atomic.ckpt";
  const torch::Tensor old_blob = torch::arange(10, torch::kFloat32);
  fabric.save(path, {{"tag", "old"}, {"blob", old_blob}});

  // Built before fork: the child only pickles and writes (no torch thread pool in the child).
  const std::int64_t n = 40'000'000;  // 160 MB
  const torch::Tensor big = torch::full({n}, 0.5F);

  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(pipe_fds[0]);
    try {
      for (int i = 0; i < 100; ++i) {
        fabric.save(path, {{"tag", "new"}, {"blob", big}});
        const char done = 1;
        (void)::write(pipe_fds[1], &done, 1);
      }
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(0);
  }
  ::close(pipe_fds[1]);

  // Wait (at most 60 s) for the child's temporary file, then kill the child while it writes.
  bool saw_tmp = false;
  bool exited_early = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (!tmp_leftovers(dir.path(), "atomic.ckpt").empty()) {
      saw_tmp = true;
      break;
    }
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      exited_early = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  int status = 0;
  if (!exited_early) {
    ::kill(pid, SIGKILL);
    REQUIRE(::waitpid(pid, &status, 0) == pid);
  }
  ::fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK);
  int completed = 0;
  char buf[256];
  for (ssize_t r; (r = ::read(pipe_fds[0], buf, sizeof buf)) > 0;) completed += static_cast<int>(r);
  ::close(pipe_fds[0]);
  INFO("saves the child completed before the kill: " << completed);
  REQUIRE_FALSE(exited_early);
  REQUIRE(saw_tmp);
  CHECK(WIFSIGNALED(status));

  // The checkpoint at path is complete: the old one (or, had a save finished, the child's whole one).
  const auto loaded = fabric.load(path);
  const std::string tag = loaded.at("tag").get<std::string>();
  CHECK((tag == "old" || tag == "new"));
  if (completed > 0) CHECK(tag == "new");  // a save that returned is visible
  if (completed == 0 && tag == "new") WARN("the kill landed between the rename and the child's report");
  const torch::Tensor blob = loaded.at("blob").get<torch::Tensor>();
  if (tag == "old") {
    CHECK(torch::equal(blob, old_blob));
    // The kill landed mid-write: the load removed the dead writer's half-written temporary file.
    CHECK(tmp_leftovers(dir.path(), "atomic.ckpt").empty());
  } else {
    CHECK(blob.numel() == n);
    CHECK(blob.sum().item<double>() == 0.5 * static_cast<double>(n));
  }
  for (const auto& leftover : tmp_leftovers(dir.path(), "atomic.ckpt")) fs::remove(leftover);

  // The next save works normally.
  fabric.save(path, {{"tag", "after"}});
  CHECK(fabric.load(path).at("tag").get<std::string>() == "after");
}

// ---- bad files ----------------------------------------------------------------------------------

TEST_CASE("load reports missing, empty, truncated and foreign files as fabric::Error", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;

  torch::manual_seed(12);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  train(net, adamw, batches(1, 1));
  const fs::path good = dir / "good.fabric";  // the native format, whose damage this checks
  fabric.save(good, {{"model", net}, {"optimizer", adamw}, {"epoch", 4}});
  const std::vector<char> bytes = bytes_of(good);
  REQUIRE(bytes.size() > 1000);

  Net target;
  const Tensors before = snapshot(*target);
  fabric::State state{{"model", target}, {"epoch", 0}};

  SECTION("a missing file names the path") {
    const fs::path missing = dir / "nope" / "missing.ckpt";
    CHECK_THROWS_AS(fabric.load(missing), fabric::Error);
    const std::string msg = error_of([&] { fabric.load(missing, state); });
    CHECK_THAT(msg, ContainsSubstring(missing.string()));
    CHECK_THAT(msg, ContainsSubstring("found nothing"));
  }

  SECTION("a directory is not a checkpoint") {
    CHECK_THAT(error_of([&] { fabric.load(dir.path()); }), ContainsSubstring("not a regular file"));
  }

  SECTION("an empty file") {
    const fs::path empty = dir / "empty.ckpt";
    write_bytes(empty, "", 0);
    const std::string msg = error_of([&] { fabric.load(empty, state); });
    CHECK_THAT(msg, ContainsSubstring("empty file"));
    CHECK_THAT(msg, ContainsSubstring(empty.string()));
  }

  SECTION("truncated files, cut anywhere") {
    const std::size_t size = bytes.size();
    for (const std::size_t cut : {std::size_t{1}, std::size_t{2}, std::size_t{4}, std::size_t{30}, std::size_t{64},
                                  size / 4, size / 2, size - 100, size - 22, size - 21, size - 2, size - 1}) {
      INFO("cut at " << cut << " of " << size << " bytes");
      const fs::path cut_path = dir / "cut.ckpt";
      write_bytes(cut_path, bytes.data(), cut);
      const std::string msg = error_of([&] { fabric.load(cut_path, state); });
      CHECK_THAT(msg, ContainsSubstring("truncated"));
      CHECK_THAT(msg, ContainsSubstring(cut_path.string()));
      CHECK_THROWS_AS(fabric.load(cut_path), fabric::Error);
    }
  }

  SECTION("random bytes") {
    std::mt19937 rng(1234);
    std::vector<char> noise(4096);
    for (auto& c : noise) c = static_cast<char>(rng() & 0xff);
    const fs::path noise_path = dir / "noise.ckpt";
    write_bytes(noise_path, noise.data(), noise.size());
    CHECK_THAT(error_of([&] { fabric.load(noise_path, state); }), ContainsSubstring("corrupt"));
    // A zip signature followed by noise.
    noise[0] = 'P';
    noise[1] = 'K';
    noise[2] = 3;
    noise[3] = 4;
    write_bytes(noise_path, noise.data(), noise.size());
    CHECK_THROWS_AS(fabric.load(noise_path, state), fabric::Error);
  }

  SECTION("a text file") {
    const fs::path text = dir / "notes.txt";
    std::ofstream(text) << "epoch,loss\n1,0.5\n";
    CHECK_THAT(error_of([&] { fabric.load(text); }), ContainsSubstring("expected a file written by fabric's save"));
  }

  SECTION("a torch::save archive points to load_raw") {
    const fs::path raw = dir / "raw.pt";
    torch::save(net, raw.string());
    const std::string msg = error_of([&] { fabric.load(raw, state); });
    CHECK_THAT(msg, ContainsSubstring("load_raw"));
    CHECK_THAT(msg, ContainsSubstring(raw.string()));
    const fs::path raw_opt = dir / "raw-opt.pt";
    torch::save(adamw, raw_opt.string());
    CHECK_THAT(error_of([&] { fabric.load(raw_opt); }), ContainsSubstring("load_raw"));
  }

  SECTION("pickles that are not fabric checkpoints") {
    const fs::path pickled = dir / "pickled.pt";
    auto write_pickle = [&](const c10::IValue& value) {
      const std::vector<char> data = torch::pickle_save(value);
      write_bytes(pickled, data.data(), data.size());
    };

    write_pickle(c10::IValue(std::int64_t{5}));
    std::string msg = error_of([&] { fabric.load(pickled, state); });
    CHECK_THAT(msg, ContainsSubstring("an integer"));
    // NOTE: a pickle of a bare value cannot be told from one of Python's torch.save: the message says what a
    // checkpoint must be either way.
    CHECK_THAT(msg, ContainsSubstring("checkpoint dictionary") || ContainsSubstring("fabric checkpoint"));

    write_pickle(c10::IValue(torch::ones({3})));
    CHECK_THAT(error_of([&] { fabric.load(pickled); }), ContainsSubstring("a tensor"));

    write_pickle(c10::IValue(c10::List<std::int64_t>({1, 2, 3})));
    CHECK_THROWS_AS(fabric.load(pickled), fabric::Error);

    // A dictionary without fabric's marker loads (as Lightning loads torch.save's dictionaries).
    c10::Dict<std::string, std::int64_t> plain;
    plain.insert("epoch", 3);
    write_pickle(c10::IValue(plain));
    CHECK(fabric.load(pickled).at("epoch").get<int>() == 3);

    c10::Dict<std::int64_t, std::int64_t> int_keys;
    int_keys.insert(1, 2);
    write_pickle(c10::IValue(int_keys));
    CHECK_THROWS_AS(fabric.load(pickled), fabric::Error);

    auto with_marker = [&](const c10::IValue& marker) {
      c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
      root.insert("__fabric__", marker);
      root.insert("epoch", std::int64_t{1});
      write_pickle(c10::IValue(root));
    };
    with_marker(c10::IValue(std::int64_t{1}));
    CHECK_THAT(error_of([&] { fabric.load(pickled); }), ContainsSubstring("malformed"));

    c10::impl::GenericDict future(c10::StringType::get(), c10::AnyType::get());
    future.insert("format", std::int64_t{99});
    with_marker(c10::IValue(future));
    CHECK_THAT(error_of([&] { fabric.load(pickled); }), ContainsSubstring("format"));

    c10::impl::GenericDict odd_kinds(c10::StringType::get(), c10::AnyType::get());
    c10::impl::GenericDict kinds(c10::StringType::get(), c10::AnyType::get());
    kinds.insert("epoch", std::int64_t{3});
    odd_kinds.insert("format", std::int64_t{1});
    odd_kinds.insert("kinds", kinds);
    with_marker(c10::IValue(odd_kinds));
    CHECK_THAT(error_of([&] { fabric.load(pickled); }), ContainsSubstring("malformed"));
  }

  SECTION("a module entry that does not hold tensors") {
    fabric.save(dir / "fake.ckpt", {{"model", 5}});
    // Saved as a value; asked as a module: a kind error, not a crash.
    CHECK_THAT(error_of([&] { fabric.load(dir / "fake.ckpt", state, false); }),
               ContainsSubstring("\"model\": expected a module, found a value"));
  }

  CHECK(same(snapshot(*target), before));
  CHECK(state.at("epoch").get<int>() == 0);
}

// ---- load_raw: files of torch::save -------------------------------------------------------------

TEST_CASE("load_raw loads torch::save(module) and torch::save(optimizer) files", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path module_file = dir / "model.pt";
  const fs::path optimizer_file = dir / "optimizer.pt";

  torch::manual_seed(13);
  Net net;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
  train(net, adamw, batches(3, 8));
  torch::save(net, module_file.string());
  torch::save(adamw, optimizer_file.string());

  SECTION("into plain objects; training continues identically") {
    torch::manual_seed(14);
    Net net2;
    torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(0.3));
    train(net2, adamw2, batches(1, 9));
    REQUIRE_FALSE(same(snapshot(*net2), snapshot(*net)));
    fabric.load_raw(module_file, net2);
    fabric.load_raw(optimizer_file, adamw2);
    CHECK(same(snapshot(*net2), snapshot(*net)));
    CHECK(same_state(adamw2, adamw));
    CHECK(lr_of(adamw2) == 1e-2);
    const auto more = batches(2, 10);
    train(net, adamw, more);
    train(net2, adamw2, more);
    CHECK(same(snapshot(*net2), snapshot(*net)));
  }

  SECTION("into setup() wrappers and shared pointers") {
    torch::manual_seed(15);
    Net net2;
    torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(0.3));
    auto [model, optimizer] = fabric.setup(net2, adamw2);
    fabric.load_raw(module_file, model);
    fabric.load_raw(optimizer_file, optimizer);
    CHECK(same(snapshot(*net2), snapshot(*net)));
    CHECK(same_state(adamw2, adamw));

    auto ptr = std::make_shared<NetImpl>();
    fabric.load_raw(module_file, ptr);
    CHECK(same(snapshot(*ptr), snapshot(*net)));
  }

  SECTION("strict: missing and wrong-shaped tensors by dotted name, nothing changed") {
    Net wide(16);
    const Tensors before = snapshot(*wide);
    const std::string msg = error_of([&] { fabric.load_raw(module_file, wide); });
    CHECK_THAT(msg, ContainsSubstring(module_file.string()));
    CHECK_THAT(msg, ContainsSubstring("\"fc.weight\": expected shape [16, 4], found shape [8, 4]"));
    CHECK_THAT(msg, ContainsSubstring("\"bn.running_var\": expected shape [16], found shape [8]"));
    CHECK_THAT(msg, ContainsSubstring("\"head.0.weight\": expected shape [3, 16], found shape [3, 8]"));
    CHECK_THAT(msg, ContainsSubstring("nothing was changed"));
    CHECK(same(snapshot(*wide), before));
    // Shapes are checked without strict as well.
    CHECK_THROWS_AS(fabric.load_raw(module_file, wide, false), fabric::Error);
    CHECK(same(snapshot(*wide), before));
  }

  SECTION("a module archive given for an optimizer, and the other way round") {
    torch::optim::AdamW adamw2(net->parameters(), torch::optim::AdamWOptions(0.3));
    CHECK_THROWS_AS(fabric.load_raw(module_file, adamw2), fabric::Error);
    CHECK(adamw2.state().empty());
    Net net2;
    const Tensors before = snapshot(*net2);
    CHECK_THROWS_AS(fabric.load_raw(optimizer_file, net2), fabric::Error);
    CHECK(same(snapshot(*net2), before));
  }

  SECTION("an optimizer archive of other shapes or another optimizer type changes nothing") {
    Net wide(16);
    torch::optim::AdamW adamw2(wide->parameters(), torch::optim::AdamWOptions(0.3));
    train(wide, adamw2, batches(1, 2));
    const auto opt_before = optimizer_bytes(adamw2);
    const std::string msg = error_of([&] { fabric.load_raw(optimizer_file, adamw2); });
    CHECK_THAT(msg, ContainsSubstring("shape [16, 4]"));
    CHECK_THAT(msg, ContainsSubstring("[8, 4]"));
    CHECK((optimizer_bytes(adamw2) == opt_before));  // not decomposed: binary

    Net net2;
    torch::optim::SGD sgd(net2->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    train(net2, sgd, batches(1, 2));
    const auto sgd_before = optimizer_bytes(sgd);
    CHECK_THROWS_AS(fabric.load_raw(optimizer_file, sgd), fabric::Error);
    CHECK((optimizer_bytes(sgd) == sgd_before));  // not decomposed: binary
  }

  SECTION("a fabric checkpoint, a missing file and a truncated file are errors") {
    const fs::path ckpt = dir / "fabric.ckpt";
    fabric.save(ckpt, {{"model", net}});
    Net net2;
    const Tensors before = snapshot(*net2);
    const std::string msg = error_of([&] { fabric.load_raw(ckpt, net2); });
    CHECK_THAT(msg, ContainsSubstring("torch::save"));
    CHECK_THAT(msg, ContainsSubstring("use load"));
    CHECK_THROWS_AS(fabric.load_raw(ckpt, adamw), fabric::Error);

    const fs::path missing = dir / "missing.pt";
    CHECK_THAT(error_of([&] { fabric.load_raw(missing, net2); }), ContainsSubstring(missing.string()));

    const auto bytes = bytes_of(module_file);
    const fs::path cut = dir / "cut.pt";
    write_bytes(cut, bytes.data(), bytes.size() / 2);
    CHECK_THROWS_AS(fabric.load_raw(cut, net2), fabric::Error);
    write_bytes(cut, bytes.data(), 1);
    CHECK_THROWS_AS(fabric.load_raw(cut, net2), fabric::Error);
    CHECK(same(snapshot(*net2), before));
  }
}

TEST_CASE("load_raw strict checks by dotted name: missing and unexpected tensors", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  torch::manual_seed(16);
  torch::nn::Sequential small(torch::nn::Linear(4, 8));
  torch::nn::Sequential big(torch::nn::Linear(4, 8), torch::nn::Linear(8, 2));
  const fs::path small_file = dir / "small.pt";
  const fs::path big_file = dir / "big.pt";
  torch::save(small, small_file.string());
  torch::save(big, big_file.string());

  SECTION("missing tensors") {
    torch::nn::Sequential target(torch::nn::Linear(4, 8), torch::nn::Linear(8, 2));
    const Tensors before = snapshot(*target);
    const std::string msg = error_of([&] { fabric.load_raw(small_file, target); });
    CHECK_THAT(msg, ContainsSubstring("\"1.weight\": missing from the file"));
    CHECK_THAT(msg, ContainsSubstring("\"1.bias\": missing from the file"));
    CHECK(same(snapshot(*target), before));

    fabric.load_raw(small_file, target, false);
    const Tensors after = snapshot(*target);
    CHECK(torch::equal(after.at("0.weight"), small[0]->as<torch::nn::Linear>()->weight));
    CHECK(torch::equal(after.at("1.weight"), before.at("1.weight")));
  }

  SECTION("a missing tensor inside a module") {
    torch::nn::Sequential no_bias(torch::nn::Linear(torch::nn::LinearOptions(4, 8).bias(false)));
    torch::save(no_bias, (dir / "no-bias.pt").string());
    torch::nn::Sequential target(torch::nn::Linear(4, 8));
    CHECK_THAT(error_of([&] { fabric.load_raw(dir / "no-bias.pt", target); }),
               ContainsSubstring("\"0.bias\": missing from the file"));
    const Tensors before = snapshot(*target);
    fabric.load_raw(dir / "no-bias.pt", target, false);
    CHECK(torch::equal(target[0]->as<torch::nn::Linear>()->weight, no_bias[0]->as<torch::nn::Linear>()->weight));
    CHECK(torch::equal(target[0]->as<torch::nn::Linear>()->bias, before.at("0.bias")));
  }

  SECTION("unexpected tensors") {
    torch::nn::Sequential target(torch::nn::Linear(4, 8));
    const Tensors before = snapshot(*target);
    const std::string msg = error_of([&] { fabric.load_raw(big_file, target); });
    CHECK_THAT(msg, ContainsSubstring("\"1.weight\": in the file but not in the module"));
    CHECK_THAT(msg, ContainsSubstring("\"1.bias\": in the file but not in the module"));
    CHECK(same(snapshot(*target), before));
    fabric.load_raw(big_file, target, false);
    CHECK(torch::equal(target[0]->as<torch::nn::Linear>()->weight, big[0]->as<torch::nn::Linear>()->weight));
  }

  SECTION("children that torch::save skips (Functional) are not missing") {
    torch::nn::Sequential with_fn(torch::nn::Linear(4, 8), torch::nn::Functional(torch::relu), torch::nn::Linear(8, 2));
    torch::save(with_fn, (dir / "fn.pt").string());
    torch::nn::Sequential target(torch::nn::Linear(4, 8), torch::nn::Functional(torch::relu), torch::nn::Linear(8, 2));
    fabric.load_raw(dir / "fn.pt", target);
    CHECK(same(snapshot(*target), snapshot(*with_fn)));
  }
}

TEST_CASE("optimizers with several parameter groups and held by pointers", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "groups.ckpt";

  auto make_groups = [](Net& net, double body_lr, double head_lr) {
    std::vector<torch::optim::OptimizerParamGroup> groups;
    std::vector<torch::Tensor> body;
    for (const auto& p : net->fc->parameters()) body.push_back(p);
    for (const auto& p : net->bn->parameters()) body.push_back(p);
    groups.emplace_back(body, std::make_unique<torch::optim::AdamWOptions>(body_lr));
    groups.emplace_back(net->head->parameters(), std::make_unique<torch::optim::AdamWOptions>(head_lr));
    return std::make_shared<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(1.0));
  };

  torch::manual_seed(17);
  Net net;
  auto adamw = make_groups(net, 1e-2, 1e-3);
  train(net, *adamw, batches(2, 6));
  fabric.save(path, {{"model", net}, {"optimizer", adamw}});

  SECTION("every group's state and options come back") {
    torch::manual_seed(18);
    Net net2;
    auto adamw2 = make_groups(net2, 0.5, 0.25);
    fabric::State state{{"model", net2}, {"optimizer", adamw2}};
    fabric.load(path, state);
    CHECK(adamw2->param_groups()[0].options().get_lr() == 1e-2);
    CHECK(adamw2->param_groups()[1].options().get_lr() == 1e-3);
    CHECK(same_state(*adamw2, *adamw));
    const auto more = batches(2, 19);
    train(net, *adamw, more);
    train(net2, *adamw2, more);
    CHECK(same(snapshot(*net2), snapshot(*net)));
  }

  SECTION("a different grouping is an error and changes nothing") {
    Net net2;
    auto single = std::make_unique<torch::optim::AdamW>(net2->parameters(), torch::optim::AdamWOptions(0.5));
    fabric::State state{{"model", net2}, {"optimizer", single}};
    const Tensors before = snapshot(*net2);
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"optimizer\": expected 1 parameter group, found 2"));
    CHECK(same(snapshot(*net2), before));
    CHECK(single->param_groups()[0].options().get_lr() == 0.5);
  }

  SECTION("an empty optimizer pointer is rejected when the entry is made") {
    std::shared_ptr<torch::optim::AdamW> none;
    CHECK_THROWS_WITH((fabric::State{{"optimizer", none}}), ContainsSubstring("empty std::shared_ptr"));
  }
}

TEST_CASE("LBFGS: options round trip; LibTorch cannot serialize its state after a step", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  torch::manual_seed(20);
  torch::nn::Linear net(4, 2);
  torch::optim::LBFGS lbfgs(net->parameters(), torch::optim::LBFGSOptions(0.1).max_iter(3).history_size(7));
  fabric.save(dir / "lbfgs.fabric", {{"model", net}, {"optimizer", lbfgs}});
  torch::save(lbfgs, (dir / "lbfgs.pt").string());

  torch::nn::Linear net2(4, 2);
  torch::optim::LBFGS lbfgs2(net2->parameters(), torch::optim::LBFGSOptions(0.5));
  fabric::State state{{"model", net2}, {"optimizer", lbfgs2}};
  fabric.load(dir / "lbfgs.fabric", state);
  CHECK(lbfgs2.param_groups()[0].options().get_lr() == 0.1);
  CHECK(static_cast<torch::optim::LBFGSOptions&>(lbfgs2.param_groups()[0].options()).history_size() == 7);
  torch::optim::LBFGS lbfgs3(net2->parameters(), torch::optim::LBFGSOptions(0.5));
  fabric.load_raw(dir / "lbfgs.pt", lbfgs3);
  CHECK(lbfgs3.param_groups()[0].options().get_lr() == 0.1);

  // After a step LBFGS holds undefined tensors that LibTorch 1.13's own serializer cannot write:
  // fabric reports that as a fabric::Error naming the entry (and leaves the old file alone).
  const auto x = torch::randn({8, 4});
  lbfgs.step([&] {
    lbfgs.zero_grad();
    auto loss = net(x).pow(2).mean();
    loss.backward();
    return loss;
  });
  const std::string msg = error_of([&] { fabric.save(dir / "lbfgs.fabric", {{"optimizer", lbfgs}}); });
  CHECK_THAT(msg, ContainsSubstring("\"optimizer\""));
  CHECK_THAT(msg, ContainsSubstring("LBFGS"));
  CHECK(fabric.load(dir / "lbfgs.fabric").contains("model"));
}

TEST_CASE("edge values round trip exactly", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "edge.ckpt";

  const std::int64_t lowest = std::numeric_limits<std::int64_t>::min();
  const std::int64_t highest = std::numeric_limits<std::int64_t>::max();
  const int constant = 17;
  const std::string label = "h\xC3\xA9llo \xE2\x9C\x93";  // UTF-8
  const torch::Tensor base = torch::arange(100, torch::kFloat64);
  const torch::Tensor view = base.slice(0, 40, 60, 2);  // storage offset and stride
  const torch::Tensor trainable = torch::ones({2, 2}).requires_grad_();
  fabric.save(path, {{"lowest", lowest},
                     {"highest", highest},
                     {"nan", std::nan("")},
                     {"neg_inf", -std::numeric_limits<double>::infinity()},
                     {"tiny", 5e-324},
                     {"empty", ""},
                     {"label", label},
                     {"constant", std::cref(constant)},
                     {"scalar", torch::tensor(3.25)},
                     {"no_elements", torch::empty({0, 3})},
                     {"mask", torch::tensor({true, false, true})},
                     {"bytes", torch::tensor({-128, 0, 127}, torch::kInt8)},
                     {"view", view},
                     {"trainable", trainable}});

  const auto v = fabric.load(path);
  CHECK(v.at("lowest").get<std::int64_t>() == lowest);
  CHECK(v.at("highest").get<std::int64_t>() == highest);
  CHECK(std::isnan(v.at("nan").get<double>()));
  CHECK(v.at("neg_inf").get<double>() == -std::numeric_limits<double>::infinity());
  CHECK(v.at("tiny").get<double>() == 5e-324);
  CHECK(v.at("empty").get<std::string>().empty());
  CHECK(v.at("label").get<std::string>() == label);
  CHECK(v.at("constant").get<int>() == 17);
  const auto scalar = v.at("scalar").get<torch::Tensor>();
  CHECK(scalar.dim() == 0);
  CHECK(scalar.item<double>() == 3.25);
  CHECK(v.at("no_elements").get<torch::Tensor>().sizes() == torch::IntArrayRef({0, 3}));
  CHECK(torch::equal(v.at("mask").get<torch::Tensor>(), torch::tensor({true, false, true})));
  CHECK(torch::equal(v.at("bytes").get<torch::Tensor>(), torch::tensor({-128, 0, 127}, torch::kInt8)));
  CHECK(torch::equal(v.at("view").get<torch::Tensor>(), view));
  CHECK(v.at("view").get<torch::Tensor>().dtype() == torch::kFloat64);
  CHECK(v.at("trainable").get<torch::Tensor>().requires_grad());

  // A std::cref entry is loaded into the entry, never written back.
  int target = 0;
  const int& ref = target;
  fabric::State state{{"constant", std::cref(ref)}};
  fabric.load(path, state, false);
  CHECK(state.at("constant").get<int>() == 17);
  CHECK(target == 0);
}

namespace {

// Bytes of an OutputArchive.
std::vector<char> archive_bytes(torch::serialize::OutputArchive& archive) {
  std::vector<char> bytes;
  archive.save_to([&](const void* data, std::size_t n) {
    bytes.insert(bytes.end(), static_cast<const char*>(data), static_cast<const char*>(data) + n);
    return n;
  });
  return bytes;
}

// An AdamW archive in LibTorch's layout that passes every pre-check but cannot be loaded: its
// per-parameter states lack "step", which AdamW's deserializer asserts on.
std::vector<char> unloadable_adamw_archive(const torch::optim::AdamW& optimizer) {
  torch::serialize::OutputArchive archive;
  archive.write("pytorch_version", c10::IValue("1.5.0"));
  torch::serialize::OutputArchive state(archive.compilation_unit());
  torch::serialize::OutputArchive groups(archive.compilation_unit());
  groups.write("param_groups/size", torch::tensor(static_cast<std::int64_t>(optimizer.param_groups().size())));
  for (std::size_t g = 0; g < optimizer.param_groups().size(); ++g) {
    const auto& params = optimizer.param_groups()[g].params();
    torch::serialize::OutputArchive group(archive.compilation_unit());
    group.write("params/size", torch::tensor(static_cast<std::int64_t>(params.size())));
    for (std::size_t j = 0; j < params.size(); ++j) {
      const std::string key = "fake-" + std::to_string(g) + "-" + std::to_string(j);
      group.write("params/" + std::to_string(j), c10::IValue(key));
      torch::serialize::OutputArchive param_state(archive.compilation_unit());
      param_state.write("exp_avg", c10::IValue(torch::zeros_like(params[j])));
      state.write(key, param_state);
    }
    torch::serialize::OutputArchive options(archive.compilation_unit());
    torch::optim::AdamWOptions(0.123).serialize(options);
    group.write("options", options);
    groups.write("param_groups/" + std::to_string(g), group);
  }
  archive.write("state", state);
  archive.write("param_groups", groups);
  return archive_bytes(archive);
}

}  // namespace

TEST_CASE("an optimizer state that fails while loading is rolled back", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  torch::manual_seed(21);
  Net net_a;
  Net net_b;
  torch::optim::AdamW good(net_a->parameters(), torch::optim::AdamWOptions(1e-2));
  torch::optim::AdamW bad(net_b->parameters(), torch::optim::AdamWOptions(1e-2));
  train(net_a, good, batches(2, 1));
  train(net_b, bad, batches(2, 2));

  SECTION("load_raw") {
    const auto bytes = unloadable_adamw_archive(bad);
    const fs::path file = dir / "unloadable.pt";
    write_bytes(file, bytes.data(), bytes.size());
    torch::optim::AdamW target(net_b->parameters(), torch::optim::AdamWOptions(0.7));
    train(net_b, target, batches(1, 3));
    const auto before = optimizer_bytes(target);
    const std::string msg = error_of([&] { fabric.load_raw(file, target); });
    CHECK_THAT(msg, ContainsSubstring("could not load the optimizer state"));  // failed while loading, not in a check
    CHECK_THAT(msg, ContainsSubstring("nothing was changed"));
    CHECK((optimizer_bytes(target) == before));  // not decomposed: binary
    CHECK(lr_of(target) == 0.7);
  }

  SECTION("fabric checkpoints: an optimizer restored before the failing one is put back too") {
    const fs::path path = dir / "two.ckpt";
    fabric.save(path, {{"a", good}, {"b", bad}, {"model", net_a}});
    // Swap in the unloadable archive for "b" (same shapes, type and options).
    const auto all = fabric.load(path);
    c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
    root.insert("a", all.at("a").value());
    root.insert("model", all.at("model").value());
    c10::impl::GenericDict b(c10::StringType::get(), c10::AnyType::get());
    for (const auto& item : all.at("b").value().toGenericDict()) b.insert(item.key(), item.value());
    const auto bytes = unloadable_adamw_archive(bad);
    b.insert_or_assign("archive", torch::from_blob(const_cast<char*>(bytes.data()),
                                                   {static_cast<std::int64_t>(bytes.size())}, torch::kUInt8)
                                      .clone());
    root.insert("b", b);
    c10::Dict<std::string, std::string> kinds;
    kinds.insert("a", "optimizer");
    kinds.insert("b", "optimizer");
    kinds.insert("model", "module");
    c10::impl::GenericDict marker(c10::StringType::get(), c10::AnyType::get());
    marker.insert("format", std::int64_t{1});
    marker.insert("kinds", kinds);
    root.insert("__fabric__", marker);
    const auto data = torch::pickle_save(root);
    write_bytes(path, data.data(), data.size());

    torch::manual_seed(22);
    Net net2;
    torch::optim::AdamW a2(net_a->parameters(), torch::optim::AdamWOptions(0.3));
    torch::optim::AdamW b2(net_b->parameters(), torch::optim::AdamWOptions(0.4));
    train(net_a, a2, batches(1, 4));
    const auto a_before = optimizer_bytes(a2);
    const auto b_before = optimizer_bytes(b2);
    const Tensors model_before = snapshot(*net2);
    fabric::State state{{"a", a2}, {"b", b2}, {"model", net2}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"b\": the optimizer state does not fit"));  // failed while loading
    CHECK_THAT(msg, ContainsSubstring("nothing was changed"));
    CHECK((optimizer_bytes(a2) == a_before));  // not decomposed: binary
    CHECK(lr_of(a2) == 0.3);
    CHECK((optimizer_bytes(b2) == b_before));  // not decomposed: binary
    CHECK(lr_of(b2) == 0.4);
    CHECK(same(snapshot(*net2), model_before));
  }

  SECTION("a corrupt optimizer archive inside a checkpoint is reported by name") {
    const fs::path path = dir / "corrupt.ckpt";
    fabric.save(path, {{"optimizer", good}, {"model", net_a}});
    auto all = fabric.load(path);
    c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
    c10::impl::GenericDict opt(c10::StringType::get(), c10::AnyType::get());
    for (const auto& item : all.at("optimizer").value().toGenericDict()) opt.insert(item.key(), item.value());
    opt.insert_or_assign("archive", torch::randint(0, 255, {500}, torch::kUInt8));
    root.insert("optimizer", opt);
    root.insert("model", all.at("model").value());
    c10::Dict<std::string, std::string> kinds;
    kinds.insert("optimizer", "optimizer");
    kinds.insert("model", "module");
    c10::impl::GenericDict marker(c10::StringType::get(), c10::AnyType::get());
    marker.insert("format", std::int64_t{1});
    marker.insert("kinds", kinds);
    root.insert("__fabric__", marker);
    const auto data = torch::pickle_save(root);
    write_bytes(path, data.data(), data.size());

    Net net2;
    torch::optim::AdamW opt2(net2->parameters(), torch::optim::AdamWOptions(0.3));
    const Tensors before = snapshot(*net2);
    fabric::State state{{"optimizer", opt2}, {"model", net2}};
    const std::string msg = error_of([&] { fabric.load(path, state); });
    CHECK_THAT(msg, ContainsSubstring("\"optimizer\": the optimizer state in the checkpoint is corrupt"));
    CHECK(same(snapshot(*net2), before));
    CHECK(opt2.state().empty());
  }
}

// ---- Lightning's save and load tests, filters and Stateful entries ----------------------------

namespace {

/// Keeps the checkpoints it is given in memory (what Lightning's tests see through a mocked CheckpointIO).
struct Captured {
  std::shared_ptr<std::map<std::string, fabric::Checkpoint>> store =
      std::make_shared<std::map<std::string, fabric::Checkpoint>>();
  void save_checkpoint(const fabric::Checkpoint& checkpoint, const std::filesystem::path& path) {
    store->insert_or_assign(path.string(), checkpoint.copy());
  }
  fabric::Checkpoint load_checkpoint(const std::filesystem::path& path) { return store->at(path.string()).copy(); }
  void remove_checkpoint(const std::filesystem::path& path) { store->erase(path.string()); }
};

/// Lightning's BoringModel: one Linear(32, 2) named "layer".
struct BoringImpl : torch::nn::Module {
  BoringImpl() : layer(register_module("layer", torch::nn::Linear(32, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return layer(x); }
  torch::nn::Linear layer;
};
TORCH_MODULE(Boring);

/// The keys of a checkpoint dictionary, fabric's marker left out.
std::set<std::string> keys_of(const c10::impl::GenericDict& dict) {
  std::set<std::string> out;
  for (const auto& item : dict) {
    if (item.key().toStringRef() != "__fabric__") out.insert(item.key().toStringRef());
  }
  return out;
}

c10::impl::GenericDict dict_of(std::initializer_list<std::pair<const char*, std::int64_t>> items) {
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  for (const auto& [k, v] : items) out.insert(k, v);
  return out;
}

/// A user object with PyTorch's two members; its load can be made to fail.
struct Counter {
  std::int64_t count = 0;
  std::int64_t total = 0;
  bool fail_load = false;
  fabric::StateDict state_dict() const {
    fabric::StateDict state = fabric::make_state_dict();
    state.insert("count", count);
    state.insert("total", total);
    return state;
  }
  void load_state_dict(const fabric::StateDict& state) {
    if (fail_load) throw std::runtime_error("injected load failure");
    count = state.contains("count") ? state.at("count").toInt() : count;
    total = state.contains("total") ? state.at("total").toInt() : total;
  }
};

/// A user type made Stateful by a StateAdapter instead of members.
struct Plain {
  double value = 0;
};

}  // namespace

template <>
struct fabric::StateAdapter<Plain> {
  static fabric::StateDict state_dict(const Plain& p) {
    fabric::StateDict d = fabric::make_state_dict();
    d.insert("value", p.value);
    return d;
  }
  static void load_state_dict(Plain& p, const fabric::StateDict& d) { p.value = d.at("value").toDouble(); }
};

static_assert(fabric::Stateful<Counter>);
static_assert(fabric::Stateful<Plain>);
static_assert(fabric::Stateful<torch::optim::StepLR>);
static_assert(fabric::Stateful<fabric::GradScaler>);
static_assert(fabric::Stateful<fabric::RngState>);
static_assert(!fabric::Stateful<torch::nn::Linear>);
static_assert(!fabric::Stateful<torch::optim::AdamW>);
static_assert(!fabric::Stateful<int>);

// Lightning: tests_fabric/test_fabric.py::test_save_wrapped_objects
TEST_CASE("save writes set-up and raw modules and optimizers alike", "[checkpoint][lightning]") {
  for (const bool setup : {true, false}) {
    Captured io;
    fabric::Fabric<fabric::CPU> fabric({}, fabric::SingleDevice({.checkpoint_io = io}), fabric::FP32{});
    Boring model;
    torch::optim::Adam optimizer(model->parameters());
    const auto anything = dict_of({{"cocofruit", 1}});
    if (setup) {
      auto [m, o] = fabric.setup(model, optimizer);
      fabric.save("ckpt", {{"model", m}, {"optimizer", o}, {"anything", fabric::StateEntry(c10::IValue(anything))}});
    } else {
      fabric.save(
          "ckpt",
          {{"model", model}, {"optimizer", optimizer}, {"anything", fabric::StateEntry(c10::IValue(anything))}});
    }
    const auto saved = io.store->at("ckpt");
    CHECK(keys_of(saved) == std::set<std::string>{"anything", "model", "optimizer"});
    const auto tensors = saved.at("model").toGenericDict();
    CHECK(torch::equal(tensors.at("layer.weight").toTensor(), model->layer->weight));
    CHECK(saved.at("anything").toGenericDict().at("cocofruit").toInt() == 1);
    CHECK(saved.at("optimizer").toGenericDict().at("type").toStringRef() == "torch::optim::Adam");
  }
}

// Lightning: tests_fabric/test_fabric.py::test_save_filter
TEST_CASE("save with filters keeps what each entry's filter chooses", "[checkpoint][filter][lightning]") {
  Captured io;
  fabric::Fabric<fabric::CPU> fabric({}, fabric::SingleDevice({.checkpoint_io = io}), fabric::FP32{});
  Boring model;
  torch::optim::Adam optimizer(model->parameters());
  const auto anything = dict_of({{"cocofruit", 1}});
  fabric::State state{
      {"model", model}, {"optimizer", optimizer}, {"anything", fabric::StateEntry(c10::IValue(anything))}, {"foo", 1}};
  const auto none = [](std::string_view, const c10::IValue&) { return false; };

  // Everything filtered out: a filter leaves out the entries of which it keeps nothing; values that
  // are not dictionaries are saved as they are. Fabric refuses a filter for an optimizer (below), so
  // the optimizer stays, where Lightning's filter left only "foo".
  fabric.save("foo.pth", state, {{"model", none}, {"anything", none}, {"foo", none}});
  CHECK(keys_of(io.store->at("foo.pth")) == std::set<std::string>{"foo", "optimizer"});
  CHECK(io.store->at("foo.pth").at("foo").toInt() == 1);
  // Lightning's TypeErrors for a filter that is not a dict or not callable are compile errors here:
  // fabric::Filters maps keys to fabric::Filter, which only a predicate over (name, value) converts to.
  static_assert(!std::is_convertible_v<const char*, fabric::Filter>);
  static_assert(!std::is_convertible_v<int, fabric::Filter>);
  CHECK_THAT(error_of([&] {
               fabric.save("foo.pth", state, {{"asd", none}});
             }),
             ContainsSubstring("the filter keys {\"asd\"} are not present in the state keys"));
  CHECK_THAT(error_of([&] {
               fabric.save("foo.pth", state, {{"optimizer", none}});
             }),
             ContainsSubstring("\"optimizer\" is for an optimizer"));

  // A subset: tensor filters by name, value filters by type.
  io.store->clear();
  fabric.save("foo.pth", state,
              {{"model", [](std::string_view name, const at::Tensor&) { return name.find("weight") != name.npos; }},
               {"anything", [](std::string_view, const c10::IValue& v) { return v.isInt(); }}});
  const auto saved = io.store->at("foo.pth");
  CHECK(keys_of(saved) == std::set<std::string>{"anything", "foo", "model", "optimizer"});
  CHECK(keys_of(saved.at("model").toGenericDict()) == std::set<std::string>{"layer.weight"});
  CHECK(saved.at("anything").toGenericDict().at("cocofruit").toInt() == 1);
  CHECK(saved.at("foo").toInt() == 1);

  // A tensor filter over an item that is not a tensor is an error naming it.
  CHECK_THAT(error_of([&] {
               fabric.save("foo.pth", state, {{"anything", [](std::string_view, const at::Tensor&) { return true; }}});
             }),
             ContainsSubstring("the filter takes tensors, but the item \"cocofruit\" is an integer"));
}

TEST_CASE("a filtered checkpoint loads back with strict = false; strict names what is missing",
          "[checkpoint][filter]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  Boring model;
  Counter counter{.count = 3, .total = 9};
  const auto path = dir.path() / "filtered.ckpt";
  fabric.save(path, {{"model", model}, {"counter", counter}, {"epoch", 2}},
              {{"model", [](std::string_view name, const at::Tensor&) { return name == "layer.weight"; }},
               {"counter", [](std::string_view name, const c10::IValue&) { return name == "count"; }},
               {"epoch", [](std::string_view, const c10::IValue&) { return false; }}});  // not a dict: kept

  Boring other;
  Counter restored;
  const auto weight = other->layer->weight.detach().clone();
  const auto bias = other->layer->bias.detach().clone();
  const std::string msg = error_of([&] { fabric.load(path, {{"model", other}, {"counter", restored}}); });
  CHECK_THAT(msg, ContainsSubstring("\"model.layer.bias\": missing from the checkpoint"));
  CHECK_THAT(msg, ContainsSubstring("\"counter.total\": missing from the checkpoint"));
  CHECK(torch::equal(other->layer->weight, weight));  // nothing changed

  const auto rest = fabric.load(path, {{"model", other}, {"counter", restored}}, /*strict=*/false);
  CHECK(torch::equal(other->layer->weight, model->layer->weight));
  CHECK(torch::equal(other->layer->bias, bias));  // not in the file: kept
  CHECK(restored.count == 3);
  CHECK(restored.total == 0);
  CHECK(rest.at("epoch").get<int>() == 2);
}

// Lightning: tests_fabric/test_fabric.py::test_load_wrapped_objects
TEST_CASE("load restores set-up and raw objects in place, values into the state, and returns the rest",
          "[checkpoint][lightning]") {
  TempDir dir;
  for (const bool setup : {true, false}) {
    fabric::Fabric<fabric::CPU> fabric;
    Boring saved_model;
    torch::optim::Adam saved_optimizer(saved_model->parameters(), torch::optim::AdamOptions(0.5));
    const auto path = dir.path() / (setup ? "setup.ckpt" : "raw.ckpt");
    fabric.save(path, {{"model", saved_model},
                       {"optimizer", saved_optimizer},
                       {"int", 5},
                       {"dict", fabric::StateEntry(c10::IValue(dict_of({{"x", 1}})))},
                       {"extra", "data"}});

    Boring model;
    torch::optim::Adam optimizer(model->parameters());
    fabric::State state{{"int", 0}, {"dict", fabric::StateEntry(c10::IValue(dict_of({{"x", 0}})))}};
    fabric::State rest;
    if (setup) {
      auto [m, o] = fabric.setup(model, optimizer);
      state.emplace("model", m);
      state.emplace("optimizer", o);
      rest = fabric.load(path, state);
    } else {
      state.emplace("model", model);
      state.emplace("optimizer", optimizer);
      rest = fabric.load(path, state);
    }
    CHECK(torch::equal(model->layer->weight, saved_model->layer->weight));
    CHECK(lr_of(optimizer) == 0.5);
    CHECK(state.at("int").get<int>() == 5);
    CHECK(state.at("dict").value().toGenericDict().at("x").toInt() == 1);
    CHECK(rest.size() == 1);
    CHECK(rest.at("extra").get<std::string>() == "data");
  }
}

// Lightning: tests_fabric/test_fabric.py::test_load_raw
TEST_CASE("load_raw takes set-up and raw modules and optimizers", "[checkpoint][lightning]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  torch::nn::Linear source(2, 2);
  torch::optim::Adam source_optimizer(source->parameters(), torch::optim::AdamOptions(0.25));
  torch::save(source, (dir.path() / "path0").string());
  torch::save(source_optimizer, (dir.path() / "path2").string());

  torch::nn::Linear model(2, 2);
  torch::optim::Adam optimizer(model->parameters());
  auto [wrapped_model, wrapped_optimizer] = fabric.setup(model, optimizer);
  fabric.load_raw(dir.path() / "path0", model);
  CHECK(torch::equal(model->weight, source->weight));
  {
    torch::NoGradGuard no_grad;
    source->weight.zero_();
  }
  torch::save(source, (dir.path() / "path1").string());
  fabric.load_raw(dir.path() / "path1", wrapped_model, /*strict=*/false);
  CHECK(torch::equal(model->weight, source->weight));
  fabric.load_raw(dir.path() / "path2", wrapped_optimizer);
  CHECK(lr_of(optimizer) == 0.25);
}

// Lightning: tests_fabric/test_fabric.py::test_fabric_load_accepts_weights_only_false
TEST_CASE("load reads a dictionary written without fabric (torch.save's shape) as plain values",
          "[checkpoint][lightning]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  const auto path = dir.path() / "ckpt.pt";
  c10::impl::GenericDict plain(c10::StringType::get(), c10::AnyType::get());
  plain.insert("foo", std::int64_t{123});
  c10::impl::GenericDict tensors(c10::StringType::get(), c10::AnyType::get());
  torch::nn::Linear source(2, 2);
  tensors.insert("weight", source->weight.detach());
  tensors.insert("bias", source->bias.detach());
  plain.insert("model", tensors);
  const auto bytes = torch::pickle_save(c10::IValue(plain));
  write_bytes(path, bytes.data(), bytes.size());

  const auto remainder = fabric.load(path);
  CHECK(remainder.at("foo").get<int>() == 123);
  // Without fabric's marker an entry is taken for what the state asks, and checked as such.
  torch::nn::Linear model(2, 2);
  const auto rest = fabric.load(path, {{"model", model}});
  CHECK(torch::equal(model->weight, source->weight));
  CHECK(rest.at("foo").get<int>() == 123);
  torch::optim::SGD sgd(model->parameters(), 0.1);
  CHECK_THAT(error_of([&] { fabric.load(path, {{"foo", sgd}}); }), ContainsSubstring("expected an optimizer's state"));
}

// Lightning left out: tests_fabric/test_fabric.py::test_fabric_load_forwards_weights_only_to_strategy - weights_only picks Python's restricted unpickler; fabric reads its checkpoints with torch::pickle_load, which builds only IValues (tensors, numbers, strings, containers), and Python's torch.save files with its restricted unpickler (io/torch_pickle.hpp), never arbitrary objects, so there is no unsafe mode to forward
// Lightning left out: tests_fabric/test_fabric.py::test_fabric_load_raw_forwards_weights_only_to_strategy - weights_only picks Python's restricted unpickler; load_raw reads LibTorch archives (torch::load), which hold no Python objects, and Python's state_dict files through the restricted unpickler, so there is no unsafe mode to forward

TEST_CASE("Stateful entries: a user object, a StateAdapter, a shared_ptr, and a const object saved only",
          "[checkpoint][stateful]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  Counter counter{.count = 4, .total = 40};
  Plain plain{.value = 2.5};
  auto shared = std::make_shared<Counter>(Counter{.count = 7, .total = 70});
  const Counter frozen{.count = 1, .total = 1};
  const auto path = dir.path() / "stateful.ckpt";
  fabric.save(path, {{"counter", counter}, {"plain", plain}, {"shared", shared}, {"frozen", frozen}});

  Counter c2;
  Plain p2;
  auto s2 = std::make_shared<Counter>();
  const auto rest = fabric.load(path, {{"counter", c2}, {"plain", p2}, {"shared", s2}});
  CHECK((c2.count == 4 && c2.total == 40));
  CHECK(p2.value == 2.5);
  CHECK((s2->count == 7 && s2->total == 70));
  // The file holds the object's state_dict(); load(path) gives it as a dictionary.
  CHECK(rest.at("frozen").value().toGenericDict().at("count").toInt() == 1);
  CHECK_THAT(error_of([&] { fabric.load(path, {{"frozen", frozen}}); }), ContainsSubstring("the object is const"));
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"frozen", 3}});
             }),
             ContainsSubstring("\"frozen\": expected a value, found a stateful"));
  Boring model;
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"counter", model}});
             }),
             ContainsSubstring("\"counter\": expected a module, found a stateful"));
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"missing", c2}});
             }),
             ContainsSubstring("\"missing\": missing from the checkpoint"));
}

TEST_CASE("a Stateful entry that fails to load undoes the load: nothing changes, the error names it",
          "[checkpoint][stateful]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  Net model;
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.01));
  train(model, optimizer, batches(2, 1));
  Counter first{.count = 1, .total = 10};
  Counter second{.count = 2, .total = 20};
  const auto path = dir.path() / "fails.ckpt";
  fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"a", first}, {"b", second}, {"epoch", 3}});

  Net other;
  torch::optim::AdamW other_optimizer(other->parameters(), torch::optim::AdamWOptions(0.5));
  train(other, other_optimizer, batches(1, 2));
  const auto before = snapshot(*other);
  const auto optimizer_before = optimizer_bytes(other_optimizer);
  Counter a;  // "a" loads first (keys in order), then "b" fails
  Counter b{.fail_load = true};
  int epoch = -1;
  const std::string msg = error_of([&] {
    fabric.load(path,
                {{"model", other}, {"optimizer", other_optimizer}, {"a", a}, {"b", b}, {"epoch", std::ref(epoch)}});
  });
  CHECK_THAT(msg, ContainsSubstring("\"b\": its load_state_dict failed (injected load failure); nothing was changed"));
  CHECK(same(snapshot(*other), before));
  CHECK(optimizer_bytes(other_optimizer) == optimizer_before);
  CHECK((a.count == 0 && a.total == 0));
  CHECK(epoch == -1);
}

TEST_CASE("LibTorch's LR schedulers are Stateful: a resumed StepLR continues the same learning rates",
          "[checkpoint][stateful][scheduler]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  auto lrs_after = [](torch::optim::Optimizer& optimizer, torch::optim::StepLR& scheduler, int steps) {
    std::vector<double> out;
    for (int i = 0; i < steps; ++i) {
      scheduler.step();
      out.push_back(lr_of(optimizer));
    }
    return out;
  };
  torch::nn::Linear model(2, 2);
  torch::optim::SGD optimizer(model->parameters(), 1.0);
  torch::optim::StepLR scheduler(optimizer, /*step_size=*/3, /*gamma=*/0.5);
  (void)lrs_after(optimizer, scheduler, 4);
  const auto path = dir.path() / "sched.ckpt";
  fabric.save(path, {{"optimizer", optimizer}, {"scheduler", scheduler}});
  CHECK(fabric.load(path).at("scheduler").value().toGenericDict().at("step_count").toInt() == 4);
  const auto expected = lrs_after(optimizer, scheduler, 7);

  torch::nn::Linear model2(2, 2);
  torch::optim::SGD optimizer2(model2->parameters(), 1.0);
  torch::optim::StepLR scheduler2(optimizer2, 3, 0.5);
  fabric.load(path, {{"optimizer", optimizer2}, {"scheduler", scheduler2}});
  CHECK(lrs_after(optimizer2, scheduler2, 7) == expected);

  // A state that is not a scheduler's is refused by name before anything changes.
  Counter counter;
  fabric.save(path, {{"scheduler", counter}});
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"scheduler", scheduler2}});
             }),
             ContainsSubstring("\"scheduler.step_count\": missing from the checkpoint"));
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"scheduler", scheduler2}}, false);
             }),
             ContainsSubstring("\"scheduler\": its load_state_dict failed"));
}

TEST_CASE("fabric::RngState saves the random states with a checkpoint and load restores them",
          "[checkpoint][stateful][rng]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  fabric::seed_everything(7);
  (void)torch::rand({3});
  const auto path = dir.path() / "rng.ckpt";
  fabric.save(path, {{"rng", fabric::RngState{}}});
  const auto torch_next = torch::rand({5});
  const auto dropout_next = torch::dropout(torch::ones({16}), 0.5, true);
  const auto engine_next = fabric::random_engine()();

  fabric::seed_everything(99);
  fabric.load(path, {{"rng", fabric::RngState{}}});
  CHECK(torch::equal(torch::rand({5}), torch_next));
  CHECK(torch::equal(torch::dropout(torch::ones({16}), 0.5, true), dropout_next));
  CHECK(fabric::random_engine()() == engine_next);
  fabric::seed_everything(0);
}

namespace {

struct Indices : torch::data::datasets::Dataset<Indices> {
  torch::data::Example<> get(std::size_t i) override {
    return {torch::tensor({static_cast<std::int64_t>(i)}), torch::tensor({0})};
  }
  torch::optional<std::size_t> size() const override { return 12; }
};

template <class Batch>
void append(std::vector<std::int64_t>& out, const Batch& batch) {
  for (std::int64_t i = 0; i < batch.data.size(0); ++i) out.push_back(batch.data[i][0].template item<std::int64_t>());
}

/// One whole pass of a loader.
template <class L>
std::vector<std::int64_t> pass(L& loader) {
  std::vector<std::int64_t> out;
  for (auto& batch : loader) append(out, batch);
  return out;
}

/// A strategy whose save_checkpoint takes no filters (it hides StrategyBase's).
struct NoFilters : fabric::SingleDevice {
  using fabric::SingleDevice::SingleDevice;
  int saves = 0;
  void save_checkpoint(const std::filesystem::path& path, const fabric::State& state) {
    ++saves;
    fabric::SingleDevice::save_checkpoint(path, state);
  }
};

}  // namespace

TEST_CASE("the set-up loader is a state entry: a resumed loader continues mid-epoch with the next batch",
          "[checkpoint][stateful][loader]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(11);
  auto loader =
      fabric.dataloader(Indices().map(torch::data::transforms::Stack<>()), {.batch_size = 2, .shuffle = true});
  (void)pass(loader);  // epoch 0
  // Two batches of epoch 1, a checkpoint while the user holds the second, then the rest of the epoch.
  auto it = loader.begin();
  std::vector<std::int64_t> seen;
  append(seen, *it);
  ++it;
  append(seen, *it);
  const auto path = dir.path() / "loader.ckpt";
  fabric.save(path, {{"loader", loader}});
  std::vector<std::int64_t> expected;
  for (++it; it != std::default_sentinel; ++it) append(expected, *it);
  CHECK(expected.size() == 8);

  auto fresh = fabric.dataloader(Indices().map(torch::data::transforms::Stack<>()), {.batch_size = 2, .shuffle = true});
  fabric.load(path, {{"loader", fresh}});
  CHECK(pass(fresh) == expected);

  // A loader of another batch size is refused by name, and nothing changes (its next pass is a whole one).
  auto other = fabric.dataloader(Indices().map(torch::data::transforms::Stack<>()), {.batch_size = 3, .shuffle = true});
  int epoch = 0;
  CHECK_THAT(error_of([&] {
               fabric.load(path, {{"loader", other}, {"epoch", std::ref(epoch)}}, false);
             }),
             ContainsSubstring("\"loader\": its load_state_dict failed"));
  CHECK(pass(other).size() == 12);
}

TEST_CASE("a strategy whose save_checkpoint takes no filters saves, and refuses filters", "[checkpoint][filter]") {
  TempDir dir;
  fabric::Fabric<fabric::CPU, NoFilters> fabric;
  const auto path = dir.path() / "nofilter.ckpt";
  fabric.save(path, {{"epoch", 1}});
  CHECK(fabric.strategy().saves == 1);
  CHECK_THAT(
      error_of([&] {
        fabric.save(path, {{"epoch", 1}}, {{"epoch", [](std::string_view, const c10::IValue&) { return true; }}});
      }),
      ContainsSubstring("this strategy's save_checkpoint(path, state) takes no filters"));
  CHECK(fabric.strategy().saves == 1);
}
