// Python's checkpoints both ways: fabric::TorchCheckpointIO and load_raw read files of Python's
// torch.save (fixtures made by tests/python/make_pickle_fixtures.py with Debian's torch 1.13, their
// values in fixtures/expected.txt) through the restricted unpickler, refuse hostile and broken ones
// with a fabric::Error, resume training from Lightning-shaped checkpoints exactly as Python continues,
// and write .ckpt files that Python loads (tests/python/check_ckpt.py).

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

using Catch::Matchers::ContainsSubstring;
using fabric_test::TempDir;

const std::filesystem::path fixtures = std::filesystem::path(__FILE__).parent_path() / "fixtures";
const std::filesystem::path python_dir =
    std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "python";

struct Expected {
  std::string path, kind;
  std::vector<std::int64_t> shape;
  std::vector<std::string> values;
};

std::map<std::string, std::vector<Expected>> expected_values() {
  std::map<std::string, std::vector<Expected>> out;
  // expected_lightning.txt: made by tests/python/make_lightning_fixtures.py (torch 2.11, Lightning 2.6.6).
  for (const char* name : {"expected.txt", "expected_lightning.txt"}) {
    std::ifstream in(fixtures / name);
    REQUIRE(in.good());
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      std::vector<std::string> fields;
      std::stringstream ss(line);
      std::string field;
      while (std::getline(ss, field, '|')) fields.push_back(field);
      if (fields.size() == 4) fields.emplace_back();
      REQUIRE(fields.size() == 5);
      Expected e{fields[1], fields[2], {}, {}};
      std::stringstream shape(fields[3]);
      while (std::getline(shape, field, ',')) e.shape.push_back(std::stoll(field));
      std::stringstream values(fields[4]);
      while (values >> field) e.values.push_back(field);
      if (e.kind == "str") e.values = {fields[4]};
      out[fields[0]].push_back(e);
    }
  }
  return out;
}

/// The value at a '/'-separated path (dictionary keys, list and tuple indices).
c10::IValue at_path(c10::IValue v, const std::string& path) {
  std::stringstream ss(path);
  std::string part;
  while (std::getline(ss, part, '/')) {
    if (v.isGenericDict()) {
      const auto d = v.toGenericDict();
      const c10::IValue key = d.keyType()->kind() == c10::TypeKind::IntType
                                  ? c10::IValue(static_cast<std::int64_t>(std::stoll(part)))
                                  : c10::IValue(part);
      INFO(path);
      REQUIRE(d.contains(key));
      v = d.at(key);
    } else if (v.isList()) {
      v = v.toList().get(std::stoul(part));
    } else if (v.isTuple()) {
      v = v.toTupleRef().elements().at(std::stoul(part));
    } else {
      FAIL("no " << part << " in " << path);
    }
  }
  return v;
}

void check_tensor(const at::Tensor& t, const Expected& e);

void check_value(const c10::IValue& v, const Expected& e) {
  INFO(e.path << " (" << e.kind << ")");
  if (v.isTensor()) {
    check_tensor(v.toTensor(), e);
  } else if (e.kind == "int") {
    REQUIRE(v.isInt());
    CHECK(v.toInt() == std::stoll(e.values.at(0)));
  } else if (e.kind == "float") {
    REQUIRE(v.isDouble());
    CHECK(v.toDouble() == std::strtod(e.values.at(0).c_str(), nullptr));
  } else if (e.kind == "bool") {
    REQUIRE(v.isBool());
    CHECK(v.toBool() == (e.values.at(0) == "1"));
  } else if (e.kind == "str") {
    REQUIRE(v.isString());
    CHECK(v.toStringRef() == e.values.at(0));
  } else if (e.kind == "none") {
    CHECK(v.isNone());
  } else {
    FAIL("expected a tensor, found " << v.tagKind());
  }
}

void check_tensor(const at::Tensor& t, const Expected& e) {
  CHECK(c10::toString(t.scalar_type()) == std::map<std::string, std::string>{{"float32", "Float"},
                                                                             {"float64", "Double"},
                                                                             {"float16", "Half"},
                                                                             {"bfloat16", "BFloat16"},
                                                                             {"int64", "Long"},
                                                                             {"int32", "Int"},
                                                                             {"uint8", "Byte"},
                                                                             {"int8", "Char"},
                                                                             {"bool", "Bool"}}
                                              .at(e.kind));
  CHECK(t.sizes().vec() == e.shape);
  const at::Tensor flat = t.reshape({-1});
  REQUIRE(flat.numel() == static_cast<std::int64_t>(e.values.size()));
  const bool floating = t.is_floating_point();
  const at::Tensor as = floating ? flat.to(at::kDouble) : flat.to(at::kLong);
  for (std::int64_t i = 0; i < flat.numel(); ++i) {
    if (floating) {
      CHECK(as[i].item<double>() == std::strtod(e.values[i].c_str(), nullptr));
    } else {
      CHECK(as[i].item<std::int64_t>() == std::stoll(e.values[i]));
    }
  }
}

std::map<std::string, at::Tensor> params_of(const torch::nn::Sequential& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& item : model->named_parameters(true)) out.emplace(item.key(), item.value());
  return out;
}

torch::nn::Sequential python_model() {
  return torch::nn::Sequential(torch::nn::Linear(3, 4), torch::nn::BatchNorm1d(4), torch::nn::Linear(4, 2));
}

at::Tensor input() { return torch::arange(6, torch::kFloat).reshape({2, 3}) / 10; }

template <class Optimizer>
void train_step(torch::nn::Sequential& model, Optimizer& optimizer) {
  optimizer.zero_grad();
  model->forward(input()).pow(2).sum().backward();
  optimizer.step();
}

fabric::Fabric<fabric::CPU> torch_fabric() {
  return fabric::Fabric<fabric::CPU>({}, fabric::SingleDevice({.checkpoint_io = fabric::TorchCheckpointIO{}}),
                                     fabric::FP32{});
}

std::string error_of(const std::filesystem::path& path) {
  try {
    (void)fabric::TorchCheckpointIO::read(path);
  } catch (const fabric::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST_CASE("TorchCheckpointIO reads Python's torch.save files value for value", "[torch_pickle]") {
  const auto expected = expected_values();
  for (const char* file : {"state_dict.pt", "views.pt", "dtypes.pt", "sgd.pt", "adamw.pt", "fabric_sgd.ckpt",
                           "fabric_adamw.ckpt", "lightning_adamw.ckpt", "lightning_state_dict.pt"}) {
    INFO(file);
    const c10::IValue root = fabric::TorchCheckpointIO::read(fixtures / file);
    REQUIRE(expected.contains(file));
    for (const auto& e : expected.at(file)) check_value(at_path(root, e.path), e);
  }
}

TEST_CASE("TorchCheckpointIO keeps views of one storage as views with their strides and offsets", "[torch_pickle]") {
  const auto root = fabric::TorchCheckpointIO::read(fixtures / "views.pt").toGenericDict();
  const at::Tensor base = root.at("base").toTensor();
  const at::Tensor t = root.at("t").toTensor();
  const at::Tensor row = root.at("row").toTensor();
  const at::Tensor cols = root.at("cols").toTensor();
  CHECK_FALSE(t.is_contiguous());
  CHECK(t.strides().vec() == std::vector<std::int64_t>{1, 5});
  CHECK(row.storage_offset() == 10);
  CHECK(cols.storage_offset() == 1);
  CHECK(cols.strides().vec() == std::vector<std::int64_t>{5, 1});
  for (const auto& view : {t, row, cols}) CHECK(view.storage().data() == base.storage().data());
  base.fill_(7);  // one storage: a write through one shows through all
  CHECK(row.eq(7).all().item<bool>());
}

// Python Lightning's fabric.save (torch 2.11) is read by fabric's default format too, chosen from the file.
TEST_CASE("fabric.load resumes from Lightning's fabric.save and continues as Python does", "[torch_pickle]") {
  const auto expected = expected_values();
  for (const std::string name : {"sgd", "adamw", "lightning"}) {
    INFO(name);
    auto model = python_model();
    model->train();
    fabric::Fabric<fabric::CPU> fabric = name == "lightning" ? fabric::Fabric<fabric::CPU>() : torch_fabric();
    const std::string file = name == "lightning" ? "lightning_adamw.ckpt" : "fabric_" + name + ".ckpt";
    std::int64_t step = 0;
    std::shared_ptr<torch::optim::Optimizer> optimizer;
    if (name == "sgd") {
      optimizer = std::make_shared<torch::optim::SGD>(model->parameters(),
                                                      torch::optim::SGDOptions(0.5).momentum(0.9).weight_decay(0.01));
    } else {
      optimizer =
          std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(0.5).weight_decay(0.1));
    }
    fabric::State state{{"model", model}, {"optimizer", *optimizer}, {"step", std::ref(step)}};
    const fabric::State rest = fabric.load(fixtures / file, state);
    CHECK(step == 5);
    CHECK(rest.at("name").get<std::string>() == "x");
    CHECK(rest.contains("nested"));
    // The group options came from the file (lr 0.1 / 0.01, not the 0.5 above).
    CHECK(optimizer->param_groups()[0].options().get_lr() == (name == "sgd" ? 0.1 : 0.01));
    optimizer->zero_grad();
    model->forward(input()).pow(2).sum().backward();
    optimizer->step();
    const auto params = model->named_parameters(true);
    for (const auto& e : expected.at("after_step3_" + name)) {
      if (!params.contains(e.path)) continue;  // buffers: the step does not change them
      INFO(e.path);
      const at::Tensor got = params[e.path].detach().reshape({-1}).to(at::kDouble);
      for (std::size_t i = 0; i < e.values.size(); ++i) {
        const double want = std::strtod(e.values[i].c_str(), nullptr);
        CHECK(std::abs(got[static_cast<std::int64_t>(i)].item<double>() - want) <= 1e-6 * (1 + std::abs(want)));
      }
    }
  }
}

TEST_CASE("load_raw reads Python's torch.save of a state_dict and of an optimizer.state_dict()", "[torch_pickle]") {
  auto model = python_model();
  auto fabric = torch_fabric();
  fabric.load_raw(fixtures / "state_dict.pt", model);
  const auto root = fabric::TorchCheckpointIO::read(fixtures / "state_dict.pt").toGenericDict();
  for (const auto& [name, tensor] : params_of(model)) CHECK(torch::equal(tensor, root.at(name).toTensor()));
  CHECK(model->named_buffers(true)["1.num_batches_tracked"].item<std::int64_t>() == 0);
  CHECK(model->named_buffers(true)["1.num_batches_tracked"].scalar_type() == at::kLong);

  torch::optim::AdamW adamw(model->parameters(), torch::optim::AdamWOptions(0.5));
  fabric.load_raw(fixtures / "adamw.pt", adamw);
  // And through the default format: a torch.save of torch 2.11.
  fabric::Fabric<fabric::CPU> plain;
  plain.load_raw(fixtures / "lightning_state_dict.pt", model);
  const auto lightning = fabric::TorchCheckpointIO::read(fixtures / "lightning_state_dict.pt").toGenericDict();
  CHECK(torch::equal(params_of(model).at("0.weight"), lightning.at("0.weight").toTensor()));
  CHECK(adamw.param_groups()[0].options().get_lr() == 0.01);
  CHECK(adamw.state().size() == 6);
  // The wrong optimizer type and a wrong model are refused, naming the problem.
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  CHECK_THROWS_WITH(fabric.load_raw(fixtures / "adamw.pt", sgd), ContainsSubstring("another type of optimizer"));
  auto other = torch::nn::Sequential(torch::nn::Linear(3, 5));
  CHECK_THROWS_WITH(fabric.load_raw(fixtures / "state_dict.pt", other), ContainsSubstring("expected shape [5, 3]"));
}

TEST_CASE("hostile and broken pickles are refused with a fabric::Error naming what was refused", "[torch_pickle]") {
  CHECK_THAT(error_of(fixtures / "hostile_os_system.pt"), ContainsSubstring("refused the global os.system"));
  CHECK_THAT(error_of(fixtures / "hostile_eval.pt"), ContainsSubstring("refused the global builtins.eval"));
  CHECK_THAT(error_of(fixtures / "hostile_torch_load.pt"),
             ContainsSubstring("refused the global torch.serialization.load"));
  CHECK_THAT(error_of(fixtures / "hostile_memo_bomb.pt"), ContainsSubstring("a memo bomb"));
  CHECK_THAT(error_of(fixtures / "hostile_memo_missing.pt"), ContainsSubstring("never stored"));
  CHECK_THAT(error_of(fixtures / "hostile_cycle.pt"), ContainsSubstring("contains itself"));
  CHECK_THAT(error_of(fixtures / "truncated_pickle.pt"), ContainsSubstring("truncated"));
  CHECK_THAT(error_of(fixtures / "missing_storage.pt"), ContainsSubstring("has no record state_dict/data/0"));
  CHECK_THAT(error_of(fixtures / "truncated_file.pt"), ContainsSubstring("not a readable zip archive"));
  CHECK_THAT(error_of(fixtures / "legacy.pt"), ContainsSubstring("_use_new_zipfile_serialization=False"));
  // Through fabric.load and load_raw too.
  auto fabric = torch_fabric();
  auto model = python_model();
  CHECK_THROWS_WITH(fabric.load(fixtures / "hostile_os_system.pt", {{"model", model}}),
                    ContainsSubstring("refused the global os.system"));
  CHECK_THROWS_WITH(fabric.load_raw(fixtures / "hostile_os_system.pt", model),
                    ContainsSubstring("refused the global os.system"));
}

TEST_CASE("every truncation of a torch.save file is a fabric::Error", "[torch_pickle]") {
  std::ifstream in(fixtures / "fabric_adamw.ckpt", std::ios::binary);
  const std::string whole((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  TempDir tmp;
  const auto path = tmp / "cut.pt";
  for (std::size_t n = 0; n < whole.size(); n += 7) {
    std::ofstream(path, std::ios::binary | std::ios::trunc).write(whole.data(), static_cast<std::streamsize>(n));
    CHECK_THROWS_AS(fabric::TorchCheckpointIO::read(path), fabric::Error);
  }
}

/// A C++ run: a model and an AdamW after two steps, a second model and an SGD with momentum.
struct Run {
  torch::nn::Sequential model = python_model();
  torch::nn::Sequential model2 = python_model();
  torch::optim::AdamW adamw{model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1)};
  torch::optim::SGD sgd{model2->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01)};
  std::int64_t step = 7;
  fabric::State state() {
    return {{"model", model}, {"optimizer", adamw}, {"model2", model2}, {"optimizer2", sgd}, {"step", std::ref(step)}};
  }
};

TEST_CASE("TorchCheckpointIO's own files load back exactly and continue training identically", "[torch_pickle]") {
  TempDir tmp;
  torch::manual_seed(1);
  Run a;
  for (int i = 0; i < 2; ++i) {
    train_step(a.model, a.adamw);
    train_step(a.model2, a.sgd);
  }
  auto fabric = torch_fabric();
  auto state = a.state();
  state.emplace("name", std::string("run"));
  fabric.save(tmp / "run.ckpt", state);
  // What Python sees: plain dictionaries, PyTorch's optimizer layout.
  const auto root = fabric::TorchCheckpointIO::read(tmp / "run.ckpt").toGenericDict();
  const auto opt = root.at("optimizer").toGenericDict();
  CHECK(opt.at("state").toGenericDict().at(0).toGenericDict().at("step").toTensor().item<double>() == 2.0);
  CHECK(opt.at("param_groups").toList().get(0).toGenericDict().at("params").toIntVector() ==
        std::vector<std::int64_t>{0, 1, 2, 3, 4, 5});

  torch::manual_seed(2);
  Run b;
  b.step = 0;
  auto b_state = b.state();
  (void)fabric.load(tmp / "run.ckpt", b_state, false);
  CHECK(b.step == 7);
  train_step(a.model, a.adamw);
  train_step(a.model2, a.sgd);
  train_step(b.model, b.adamw);
  train_step(b.model2, b.sgd);
  for (const auto& [name, p] : params_of(a.model)) CHECK(torch::equal(p, params_of(b.model).at(name)));
  for (const auto& [name, p] : params_of(a.model2)) CHECK(torch::equal(p, params_of(b.model2).at(name)));
}

namespace {

/// A Stateful object whose state nests lists, tuples, dictionaries, tensors and plain values.
struct Nested {
  c10::IValue value;
  fabric::StateDict state_dict() const {
    auto d = fabric::make_state_dict();
    d.insert("value", value);
    return d;
  }
  void load_state_dict(const fabric::StateDict& d) { value = d.at("value"); }
};

c10::IValue nested_value() {
  c10::impl::GenericDict inner(c10::StringType::get(), c10::AnyType::get());
  inner.insert("t", torch::arange(4, torch::kInt32));
  inner.insert("flag", false);
  inner.insert("none", c10::IValue());
  c10::impl::GenericDict outer(c10::StringType::get(), c10::AnyType::get());
  outer.insert("ints", c10::List<std::int64_t>({1, 2, 3}));
  outer.insert("pair", c10::ivalue::Tuple::create({c10::IValue(1.5), c10::IValue(std::string("a"))}));
  outer.insert("inner", inner);
  c10::impl::GenericList list(c10::AnyType::get());
  list.push_back(c10::IValue(std::string("x")));
  list.push_back(c10::IValue(torch::ones({2})));
  outer.insert("list", list);
  return outer;
}

/// Every kind of state fabric saves, trained a little: the model, an optimizer of each LibTorch type
/// PyTorch has too, an LR scheduler, a grad scaler, the random states, a nested Stateful and values.
struct EveryKind {
  torch::nn::Sequential model = python_model();
  torch::optim::SGD sgd{model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).nesterov(true)};
  torch::optim::Adam adam{model->parameters(), torch::optim::AdamOptions(0.01).amsgrad(true)};
  torch::optim::AdamW adamw{model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1)};
  torch::optim::Adagrad adagrad{model->parameters(), torch::optim::AdagradOptions(0.05).lr_decay(0.01)};
  torch::optim::RMSprop rmsprop{model->parameters(), torch::optim::RMSpropOptions(0.01).momentum(0.5).centered(true)};
  torch::optim::StepLR scheduler{sgd, 2, 0.5};
  fabric::GradScaler scaler{{.init_scale = 512.0, .growth_interval = 3}};
  Nested nested;
  std::int64_t step = 0;
  double loss = 0.0;
  bool done = false;
  std::string name;
  at::Tensor tensor;

  fabric::State state() {
    return {{"model", model},
            {"sgd", sgd},
            {"adam", adam},
            {"adamw", adamw},
            {"adagrad", adagrad},
            {"rmsprop", rmsprop},
            {"scheduler", scheduler},
            {"scaler", scaler},
            {"rng", fabric::RngState{}},
            {"nested", nested},
            {"step", std::ref(step)},
            {"loss", std::ref(loss)},
            {"done", std::ref(done)},
            {"name", std::ref(name)},
            {"tensor", std::ref(tensor)}};
  }
  void train() {
    for (auto* o : std::vector<torch::optim::Optimizer*>{&sgd, &adam, &adamw, &adagrad, &rmsprop}) {
      o->zero_grad();
      model->forward(input()).pow(2).sum().backward();
      o->step();
    }
    scheduler.step();
  }
};

}  // namespace

TEST_CASE("every kind of state round trips through .ckpt (PyTorch's format, the default there) as through .fabric",
          "[torch_pickle]") {
  for (const char* extension : {".ckpt", ".pt", ".pth", ".fabric"}) {
    DYNAMIC_SECTION(extension) {
      TempDir tmp;
      const auto path = tmp / (std::string("every") + extension);
      fabric::Fabric<fabric::CPU> fabric;
      torch::manual_seed(4);
      EveryKind a;
      a.train();
      a.train();
      (void)a.scaler.scale(torch::ones({}));  // the scale tensor exists
      a.nested.value = nested_value();
      a.step = 41;
      a.loss = 0.125;
      a.done = true;
      a.name = "every";
      a.tensor = torch::tensor({1.0, -2.0}, torch::kFloat64);
      fabric.save(path, a.state());
      CHECK(fabric::TorchCheckpointIO{}.recognises(path) == (std::string_view(extension) != ".fabric"));
      const double drawn = torch::rand({1}).item<double>();

      torch::manual_seed(5);
      EveryKind b;
      auto b_state = b.state();
      CHECK(fabric.load(path, b_state).empty());
      CHECK(torch::rand({1}).item<double>() == drawn);  // the random states came back
      CHECK(b.step == 41);
      CHECK(b.loss == 0.125);
      CHECK(b.done);
      CHECK(b.name == "every");
      CHECK(torch::equal(b.tensor, a.tensor));
      CHECK(b.tensor.scalar_type() == torch::kFloat64);
      CHECK(b.scaler.get_scale() == 512.0);
      CHECK(b.scaler.state_dict().at("growth_interval").toInt() == 3);
      CHECK(b.sgd.param_groups()[0].options().get_lr() == a.sgd.param_groups()[0].options().get_lr());
      const auto nested = b.nested.value.toGenericDict();
      CHECK(nested.at("ints").toList().size() == 3);
      CHECK(nested.at("ints").toList().get(2).toInt() == 3);
      const auto pair = nested.at("pair").toTupleRef().elements();
      CHECK(pair.size() == 2);
      CHECK(pair[0].toDouble() == 1.5);
      CHECK(pair[1].toStringRef() == "a");
      const auto inner = nested.at("inner").toGenericDict();
      CHECK(torch::equal(inner.at("t").toTensor(), torch::arange(4, torch::kInt32)));
      CHECK_FALSE(inner.at("flag").toBool());
      CHECK(inner.at("none").isNone());
      CHECK(nested.at("list").toList().get(0).toStringRef() == "x");
      CHECK(torch::equal(nested.at("list").toList().get(1).toTensor(), torch::ones({2})));
      // Every optimizer continues as the original does.
      for (const auto& [key, p] : params_of(a.model)) CHECK(torch::equal(p, params_of(b.model).at(key)));
      a.train();
      b.train();
      for (const auto& [key, p] : params_of(a.model)) CHECK(torch::equal(p, params_of(b.model).at(key)));
      CHECK(b.sgd.param_groups()[0].options().get_lr() == a.sgd.param_groups()[0].options().get_lr());
    }
  }
}

TEST_CASE("what PyTorch's format cannot hold is refused at save naming the entry and .fabric", "[torch_pickle]") {
  TempDir tmp;
  fabric::Fabric<fabric::CPU> fabric;
  auto model = python_model();
  torch::optim::LBFGS lbfgs(model->parameters(), torch::optim::LBFGSOptions(0.1));
  const auto path = tmp / "lbfgs.ckpt";
  fabric.save(path, {{"step", 1}});
  try {
    fabric.save(path, {{"model", model}, {"quasi_newton", lbfgs}});
    FAIL("no error");
  } catch (const fabric::Error& e) {
    CHECK_THAT(e.what(), ContainsSubstring("\"quasi_newton\""));
    CHECK_THAT(e.what(), ContainsSubstring("LBFGS"));
    CHECK_THAT(e.what(), ContainsSubstring(".fabric"));
  }
  CHECK(fabric.load(path).at("step").get<std::int64_t>() == 1);  // nothing was written
  fabric.save(tmp / "lbfgs.fabric", {{"model", model}, {"quasi_newton", lbfgs}});
  CHECK(fabric.load(tmp / "lbfgs.fabric").contains("quasi_newton"));
}

TEST_CASE("the default format tells Python's files from fabric's native ones", "[torch_pickle]") {
  TempDir tmp;
  Run a;
  fabric::Fabric<fabric::CPU> native;
  native.save(tmp / "native.fabric", {{"model", a.model}, {"optimizer", a.adamw}});
  auto bytes = [](const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  CHECK_FALSE(fabric::detail::torch_pickle::is_python_torch_bytes(bytes(tmp / "native.fabric")));
  for (const char* file : {"state_dict.pt", "fabric_adamw.ckpt", "lightning_adamw.ckpt", "legacy.pt"}) {
    CHECK(fabric::detail::torch_pickle::is_python_torch_bytes(bytes(fixtures / file)));
  }
  // The default load refuses a hostile Python file as TorchCheckpointIO does.
  auto model = python_model();
  CHECK_THROWS_WITH(native.load(fixtures / "hostile_eval.pt", {{"model", model}}),
                    ContainsSubstring("refused the global builtins.eval"));
}

TEST_CASE("TorchCheckpointIO reads fabric's native checkpoints", "[torch_pickle]") {
  TempDir tmp;
  Run a;
  train_step(a.model, a.adamw);
  fabric::Fabric<fabric::CPU> native;
  native.save(tmp / "native.fabric", {{"model", a.model},
                                      {"optimizer", a.adamw},
                                      {"values", fabric::StateEntry(c10::IValue(c10::List<std::int64_t>({1, 2})))}});
  Run b;
  auto fabric = torch_fabric();
  (void)fabric.load(tmp / "native.fabric", {{"model", b.model}, {"optimizer", b.adamw}});
  for (const auto& [name, p] : params_of(a.model)) CHECK(torch::equal(p, params_of(b.model).at(name)));
  CHECK(b.adamw.state().size() == a.adamw.state().size());
}

/// Writes dir/run.ckpt (after two steps of Run) and dir/expected.txt (the parameters after a third).
void write_python_sample(const std::filesystem::path& dir) {
  Run a;
  for (int i = 0; i < 2; ++i) {
    train_step(a.model, a.adamw);
    train_step(a.model2, a.sgd);
  }
  auto fabric = torch_fabric();
  auto state = a.state();
  state.emplace("name", std::string("run"));
  state.emplace("nested", fabric::StateEntry(c10::IValue(c10::List<double>({1.5, 2.5}))));
  fabric.save(dir / "run.ckpt", state);
  // The step Python must reproduce: one more on each model.
  train_step(a.model, a.adamw);
  train_step(a.model2, a.sgd);
  std::ofstream out(dir / "expected.txt");
  for (const auto& [label, model] : {std::pair{"model", a.model}, std::pair{"model2", a.model2}}) {
    for (const auto& [name, p] : params_of(model)) {
      out << label << '|' << name;
      const at::Tensor flat = p.detach().reshape({-1}).to(at::kDouble);
      for (std::int64_t i = 0; i < flat.numel(); ++i) out << fmt::format("|{:a}", flat[i].item<double>());
      out << '\n';
    }
  }
}

TEST_CASE("Python's torch.load(weights_only=True) reads TorchCheckpointIO's .ckpt and resumes from it",
          "[torch_pickle][python]") {
  const char* python = "/usr/bin/python3";
  if (std::system(fmt::format("{} -c 'import torch' 2>/dev/null", python).c_str()) != 0) {
    SKIP("no torch for /usr/bin/python3 (Debian package python3-torch)");
  }
  TempDir tmp;
  write_python_sample(tmp.path());
  const std::string command = fmt::format("{} {} {} {}", python, (python_dir / "check_ckpt.py").string(),
                                          (tmp / "run.ckpt").string(), (tmp / "expected.txt").string());
  CHECK(std::system(command.c_str()) == 0);
}

// For torch 2.x and Python Lightning elsewhere (the GPU machine): FABRIC_PICKLE_SAMPLE_DIR=dir fabric_tests
// "[.torch_pickle_sample]", then there: python3 tests/python/check_ckpt.py dir/run.ckpt dir/expected.txt
TEST_CASE("TorchCheckpointIO: a sample .ckpt for tests/python/check_ckpt.py", "[.torch_pickle_sample]") {
  const char* dir = std::getenv("FABRIC_PICKLE_SAMPLE_DIR");
  REQUIRE(dir != nullptr);
  std::filesystem::create_directories(dir);
  write_python_sample(dir);
}

/// "<name> <value> <value> ..." lines of a fixture's expected values (floats in hex), '#' lines skipped.
std::map<std::string, std::vector<double>> expected_numbers(const std::filesystem::path& file) {
  std::map<std::string, std::vector<double>> out;
  std::ifstream in(file);
  REQUIRE(in.good());
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream words(line);
    std::string name, value;
    words >> name;
    while (words >> value) out[name].push_back(std::strtod(value.c_str(), nullptr));
  }
  return out;
}

// tests/python/fidelity.py --fixtures (Lightning 2.6.6, torch 2.11): Python Lightning's fabric.save after 20 of
// 40 steps, with the data ("x", "y"); fabric loads it and trains the other 20 steps, as fidelity.py does on the GPU
// machine (there bit for bit for SGD). Here the LibTorch and the CPU differ from the fixture's, hence a tolerance
// (measured with LibTorch 1.13 on the CI machine's CPU: 2.2e-7 relative at most).
TEST_CASE("fabric continues Python Lightning's run from its fabric.save without a jump in the loss curve",
          "[torch_pickle]") {
  const auto expected = expected_numbers(fixtures / "expected_fidelity.txt");
  for (const std::string name : {"sgd", "adamw"}) {
    INFO(name);
    torch::manual_seed(0);  // other weights than the run's: the checkpoint replaces them
    torch::nn::Sequential net{torch::nn::Linear(4, 16), torch::nn::Tanh(), torch::nn::Linear(16, 1)};
    std::shared_ptr<torch::optim::Optimizer> optimizer;
    if (name == "sgd") {
      optimizer = std::make_shared<torch::optim::SGD>(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    } else {
      optimizer =
          std::make_shared<torch::optim::AdamW>(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(1e-2));
    }
    fabric::Fabric<fabric::CPU> fabric;
    std::int64_t step = 0;
    fabric::State state{{"model", net}, {"optimizer", *optimizer}, {"step", std::ref(step)}};
    const fabric::State rest = fabric.load(fixtures / ("lightning_fidelity_" + name + ".ckpt"), state);
    REQUIRE(step == 20);
    const auto x = rest.at("x").get<at::Tensor>();
    const auto y = rest.at("y").get<at::Tensor>();
    const auto& want = expected.at(name);
    REQUIRE(want.size() == 20);
    for (std::size_t i = 0; i < want.size(); ++i, ++step) {
      const auto rows = (step % 4) * 16;
      optimizer->zero_grad();
      auto loss = torch::mse_loss(net->forward(x.narrow(0, rows, 16)), y.narrow(0, rows, 16));
      loss.backward();
      optimizer->step();
      INFO("step " << step + 1);
      CHECK(std::abs(loss.item<double>() - want[i]) <= 1e-5 * want[i]);
    }
  }
}

// tests/python/make_scaler_fixture.py (Lightning 2.6.6 on CUDA, 16-mixed with its GradScaler): the scaler backed
// off from 2^24 to 2^16 and grew and backed off again; fabric::GradScaler takes PyTorch's state, and the CUDA
// model and optimizer state load into CPU objects.
TEST_CASE("Python Lightning's fabric.save of a GradScaler loads into fabric::GradScaler", "[torch_pickle]") {
  const auto expected = expected_numbers(fixtures / "expected_scaler.txt");
  fabric::GradScaler scaler({.init_scale = 2.0, .growth_interval = 100});
  torch::nn::Sequential net{torch::nn::Linear(4, 8), torch::nn::Tanh(), torch::nn::Linear(8, 1)};
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(0.5));
  std::int64_t step = 0;
  fabric::Fabric<fabric::CPU> fabric;
  fabric::State state{{"model", net}, {"optimizer", adamw}, {"scaler", scaler}, {"step", std::ref(step)}};
  fabric.load(fixtures / "lightning_scaler.ckpt", state);
  CHECK(step == 12);
  CHECK(scaler.get_scale() == expected.at("scale").at(0));
  CHECK(scaler.get_scale() == 65536.0);
  CHECK(scaler.options().growth_factor == expected.at("growth_factor").at(0));
  CHECK(scaler.options().backoff_factor == expected.at("backoff_factor").at(0));
  CHECK(scaler.options().growth_interval == static_cast<std::int64_t>(expected.at("growth_interval").at(0)));
  CHECK(scaler.growth_tracker() == static_cast<std::int64_t>(expected.at("_growth_tracker").at(0)));
  CHECK(adamw.param_groups()[0].options().get_lr() == 1e-2);
  CHECK(net->parameters()[0].device().is_cpu());
}

}  // namespace
