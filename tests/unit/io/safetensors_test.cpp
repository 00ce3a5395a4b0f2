// Checkpoints in safetensors: fabric.save / load / load_raw of `*.safetensors` (fabric::AutoCheckpointIO
// picks the format by the extension; fabric::SafetensorsCheckpointIO by name).
//
// Round trips (modules, optimizers, Stateful objects and values; training continues identically), the
// layout Python's safetensors.torch.load_file sees (the state_dict() names, the optimizer flattened,
// type-tagged metadata), files written elsewhere (built here byte by byte per the format's README, as
// Python's save_file writes them) loaded strict or not with names, shapes and dtypes checked, the
// tensors memory-mapped rather than copied, and every hostile header refused with fabric::Error.

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Catch::Matchers::ContainsSubstring;
namespace st = fabric::detail::safetensors;

std::string u64le(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out;
}

/// A safetensors file as the format's README lays it out: the header length, the JSON, the data.
std::string file_bytes(const std::string& json, const std::string& data) { return u64le(json.size()) + json + data; }

std::string floats(std::initializer_list<float> values) {
  std::string out(values.size() * 4, '\0');
  std::memcpy(out.data(), values.begin(), out.size());
  return out;
}

void write(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

st::Header header_of(const std::string& bytes) {
  return st::parse_header(
      std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size()), bytes.size());
}

void refuses(const std::string& bytes, const std::string& why) {
  INFO(why);
  REQUIRE_THROWS_WITH(header_of(bytes), ContainsSubstring(why));
}

torch::nn::Sequential make_model() {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  model->push_back(torch::nn::Linear(3, 4));
  model->push_back(torch::nn::BatchNorm1d(4));
  model->push_back(torch::nn::Linear(4, 2));
  return model;
}

void train(torch::nn::Sequential& model, torch::optim::Optimizer& optimizer, int steps, int seed) {
  torch::manual_seed(seed);
  for (int i = 0; i < steps; ++i) {
    optimizer.zero_grad();
    model->forward(torch::randn({8, 3})).pow(2).mean().backward();
    optimizer.step();
  }
}

}  // namespace

TEST_CASE("safetensors: save and load round-trip modules, optimizers and values; training continues the same",
          "[io][safetensors]") {
  fabric_test::TempDir dir;
  const auto path = dir / "ckpt.safetensors";
  fabric::Fabric fabric;
  auto model = make_model();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
  train(model, optimizer, 3, 1);
  std::int64_t epoch = 7;
  double lr = 0.125;
  bool done = true;
  std::string name = "run-ü";
  fabric.save(path, {{"model", model},
                     {"optimizer", optimizer},
                     {"epoch", epoch},
                     {"lr", lr},
                     {"done", done},
                     {"name", name},
                     {"mask", torch::tensor({true, false, true})}});
  REQUIRE(read(path).substr(0, 2) != "PK");  // not the native zip

  auto copy = make_model();
  torch::optim::Adam copy_optimizer(copy->parameters(), torch::optim::AdamOptions(0.01));
  std::int64_t loaded_epoch = 0;
  double loaded_lr = 0;
  bool loaded_done = false;
  std::string loaded_name;
  fabric::State state{{"model", copy},
                      {"optimizer", copy_optimizer},
                      {"epoch", std::ref(loaded_epoch)},
                      {"lr", std::ref(loaded_lr)},
                      {"done", std::ref(loaded_done)},
                      {"name", std::ref(loaded_name)},
                      {"mask", torch::zeros({3}, at::kBool)}};
  const auto rest = fabric.load(path, state);
  CHECK(rest.empty());
  CHECK(loaded_epoch == 7);
  CHECK(loaded_lr == 0.125);
  CHECK(loaded_done);
  CHECK(loaded_name == "run-ü");
  CHECK(torch::equal(state.at("mask").get<at::Tensor>(), torch::tensor({true, false, true})));
  const auto a = model->named_parameters(), b = copy->named_parameters();
  for (const auto& item : a) CHECK(torch::equal(item.value(), b[item.key()]));
  for (const auto& item : model->named_buffers()) CHECK(torch::equal(item.value(), copy->named_buffers()[item.key()]));
  // The optimizer's moments came back: both continue identically.
  train(model, optimizer, 2, 5);
  train(copy, copy_optimizer, 2, 5);
  for (const auto& item : a) CHECK(torch::equal(item.value(), b[item.key()]));
}

TEST_CASE("safetensors: the file holds the state_dict() names, the optimizer flattened and tagged metadata",
          "[io][safetensors]") {
  fabric_test::TempDir dir;
  const auto path = dir / "ckpt.safetensors";
  fabric::Fabric fabric;
  auto model = make_model();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01).betas({0.8, 0.9}));
  train(model, optimizer, 2, 1);
  fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"epoch", std::int64_t{3}}, {"lr", 0.5}});

  const std::string bytes = read(path);
  const auto header = header_of(bytes);
  CHECK(header.data_start % 8 == 0);  // space-padded as Python's writer
  std::set<std::string> names;
  for (const auto& t : header.tensors) names.insert(t.name);
  std::set<std::string> expected;
  for (const auto& item : model->named_parameters()) expected.insert(item.key());
  for (const auto& item : model->named_buffers()) expected.insert(item.key());
  for (int i = 0; i < 6; ++i) {
    for (const char* field : {"step", "exp_avg", "exp_avg_sq"}) {
      expected.insert("optimizer.state." + std::to_string(i) + "." + field);
    }
  }
  CHECK(names == expected);
  CHECK(names.contains("1.num_batches_tracked"));
  std::map<std::string, std::string> meta(header.metadata.begin(), header.metadata.end());
  CHECK(meta.at("epoch") == "int:3");
  CHECK(meta.at("lr") == "float:0.5");
  const auto groups = nlohmann::json::parse(meta.at("optimizer.param_groups"));
  REQUIRE(groups.size() == 1);
  CHECK(groups[0].at("lr").get<double>() == 0.01);
  CHECK(groups[0].at("betas") == nlohmann::json::array({0.8, 0.9}));
  CHECK(groups[0].at("params") == nlohmann::json::array({0, 1, 2, 3, 4, 5}));
  CHECK(meta.contains("__fabric__"));

  // The flattened moments are the optimizer's own, in parameter order.
  const auto file = st::read(path);
  const auto params = model->parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    using StateMap = std::remove_cvref_t<decltype(optimizer.state())>;
    const auto& s = static_cast<torch::optim::AdamParamState&>(
        *optimizer.state().at(fabric::detail::optimizer_state_key<StateMap>(params[i])));
    CHECK(torch::equal(file.tensors.at("optimizer.state." + std::to_string(i) + ".exp_avg"), s.exp_avg()));
    CHECK(file.tensors.at("optimizer.state." + std::to_string(i) + ".step").item<float>() == 2.0f);
  }
  for (const auto& t : header.tensors) {
    if (t.name == "optimizer.state.2.exp_avg") {
      CHECK(t.dtype == "F32");
      CHECK(t.shape == std::vector<std::int64_t>{4});  // the BatchNorm weight, third parameter
    }
    if (t.name == "optimizer.state.0.step") {
      CHECK(t.dtype == "F32");  // as PyTorch keeps it
      CHECK(t.shape.empty());
    }
  }
}

TEST_CASE("safetensors: several modules are named <entry>.<name>", "[io][safetensors]") {
  fabric_test::TempDir dir;
  const auto path = dir / "two.safetensors";
  fabric::Fabric fabric;
  torch::nn::Linear a(2, 2), b(2, 3);
  fabric.save(path, {{"generator", a}, {"critic", b}});
  std::set<std::string> names;
  for (const auto& t : header_of(read(path)).tensors) names.insert(t.name);
  CHECK(names == std::set<std::string>{"generator.weight", "generator.bias", "critic.weight", "critic.bias"});
  torch::nn::Linear c(2, 2), d(2, 3);
  fabric.load(path, {{"generator", c}, {"critic", d}});
  CHECK(torch::equal(c->weight, a->weight));
  CHECK(torch::equal(d->bias, b->bias));
}

// Lightning: tests_fabric/test_fabric.py::test_load_raw
TEST_CASE("safetensors: load_raw reads a state_dict written elsewhere, strict or not, checking shapes and dtypes",
          "[io][safetensors]") {
  fabric_test::TempDir dir;
  fabric::Fabric fabric;
  // What Python's save_file({"weight": ..., "bias": ...}) writes for a Linear(2, 1), with metadata.
  const std::string json = R"({"__metadata__":{"format":"pt"},"bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                           R"("weight":{"dtype":"F32","shape":[1,2],"data_offsets":[4,12]}})";
  const auto path = dir / "linear.safetensors";
  write(path, file_bytes(json, floats({0.5f, 1.0f, -2.0f})));
  torch::nn::Linear linear(2, 1);
  fabric.load_raw(path, linear);
  CHECK(torch::equal(linear->bias, torch::tensor({0.5f})));
  CHECK(torch::equal(linear->weight, torch::tensor({{1.0f, -2.0f}})));

  // strict: a tensor the module lacks is an error, and nothing changes; not strict, it is skipped.
  const auto extra = dir / "extra.safetensors";
  write(extra, file_bytes(R"({"bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                          R"("scale":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                          floats({3.0f, 9.0f})));
  REQUIRE_THROWS_WITH(fabric.load_raw(extra, linear),
                      ContainsSubstring("\"scale\": in the file but not in the module") &&
                          ContainsSubstring("\"weight\": missing from the file"));
  CHECK(torch::equal(linear->bias, torch::tensor({0.5f})));
  fabric.load_raw(extra, linear, /*strict=*/false);
  CHECK(torch::equal(linear->bias, torch::tensor({3.0f})));

  // A wrong shape or an integer tensor into a floating-point parameter is refused.
  const auto shape = dir / "shape.safetensors";
  write(shape, file_bytes(R"({"bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", floats({1, 2})));
  REQUIRE_THROWS_WITH(fabric.load_raw(shape, linear, false), ContainsSubstring("expected shape [1], found shape [2]"));
  const auto dtype = dir / "dtype.safetensors";
  write(dtype, file_bytes(R"({"bias":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", u64le(4)));
  REQUIRE_THROWS_WITH(fabric.load_raw(dtype, linear, false), ContainsSubstring("expected dtype F32, found I64"));

  // bf16 converts to the float parameter, as load_state_dict does (0x3fc0 is 1.5 in bfloat16).
  const auto bf16 = dir / "bf16.safetensors";
  write(bf16, file_bytes(R"({"bias":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})", std::string("\xc0\x3f", 2)));
  fabric.load_raw(bf16, linear, false);
  CHECK(torch::equal(linear->bias, torch::tensor({1.5f})));

  // An optimizer is not read from a bare safetensors file.
  torch::optim::SGD sgd(linear->parameters(), 0.1);
  REQUIRE_THROWS_WITH(fabric.load_raw(path, sgd), ContainsSubstring("not an optimizer"));
}

TEST_CASE("safetensors: load of a file written elsewhere gives its tensors and metadata, memory-mapped",
          "[io][safetensors]") {
  fabric_test::TempDir dir;
  fabric::Fabric fabric;
  std::string data = floats({1, 2, 3, 4});
  data += u64le(42);
  data += std::string("\x01\x00", 2);
  const std::string json = R"({"__metadata__":{"step":"int:12","note":"plain text"},)"
                           R"("w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                           R"("n":{"dtype":"I64","shape":[],"data_offsets":[16,24]},)"
                           R"("b":{"dtype":"BOOL","shape":[2],"data_offsets":[24,26]},)"
                           R"("e":{"dtype":"F16","shape":[0,3],"data_offsets":[26,26]}})";
  std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  const auto path = dir / "foreign.safetensors";
  write(path, file_bytes(padded, data));
  const fabric::State rest = fabric.load(path);
  CHECK(torch::equal(rest.at("w").get<at::Tensor>(), torch::tensor({{1.f, 2.f}, {3.f, 4.f}})));
  CHECK(rest.at("n").get<at::Tensor>().item<std::int64_t>() == 42);
  CHECK(rest.at("n").get<at::Tensor>().dim() == 0);
  CHECK(torch::equal(rest.at("b").get<at::Tensor>(), torch::tensor({true, false})));
  CHECK(rest.at("e").get<at::Tensor>().sizes() == at::IntArrayRef({0, 3}));
  CHECK(rest.at("e").get<at::Tensor>().scalar_type() == at::kHalf);
  CHECK(rest.at("step").get<std::int64_t>() == 12);
  CHECK(rest.at("note").get<std::string>() == "plain text");

  // Mapped, not copied: the tensor's data lies in a mapping of the file (/proc/self/maps names it).
  const auto address = reinterpret_cast<std::uintptr_t>(rest.at("w").get<at::Tensor>().data_ptr());
  std::ifstream maps("/proc/self/maps");
  bool in_file = false;
  for (std::string line; std::getline(maps, line);) {
    std::uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream(line) >> std::hex >> begin >> dash >> end;
    if (address >= begin && address < end) in_file = line.find(path.filename().string()) != std::string::npos;
  }
  CHECK(in_file);
  // Writing to a loaded tensor is private (copy-on-write): the file is unchanged.
  rest.at("w").get<at::Tensor>().fill_(0);
  CHECK(read(path) == file_bytes(padded, data));
}

TEST_CASE("safetensors: the extension picks the format; a named SafetensorsCheckpointIO writes any path",
          "[io][safetensors]") {
  fabric_test::TempDir dir;
  fabric::Fabric fabric;
  torch::nn::Linear linear(2, 2);
  fabric.save(dir / "native.ckpt", {{"model", linear}});
  CHECK(read(dir / "native.ckpt").substr(0, 2) == "PK");
  fabric::SafetensorsCheckpointIO io;
  fabric::Checkpoint checkpoint(c10::StringType::get(), c10::AnyType::get());
  checkpoint.insert("w", torch::ones({2}));
  io.save_checkpoint(checkpoint, dir / "weights.bin");
  CHECK(header_of(read(dir / "weights.bin")).tensors.at(0).name == "w");
  CHECK(torch::equal(io.load_checkpoint(dir / "weights.bin").at("w").toTensor(), torch::ones({2})));
  REQUIRE_THROWS_WITH(fabric::NativeCheckpointIO{}.load_checkpoint(dir / "weights.bin"), ContainsSubstring("could"));
}

TEST_CASE("safetensors: a hostile or malformed header is a fabric::Error naming what is wrong", "[io][safetensors]") {
  const auto tensor = [](const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
  };
  // A valid file to start from.
  const std::string ok = file_bytes(R"({"a":)" + tensor("F32", "[2]", "[0,8]") + "}", floats({1, 2}));
  CHECK(header_of(ok).tensors.size() == 1);

  refuses("1234567", "expected at least the 8-byte header length");
  refuses(u64le(1000) + "{}", "the file has 2 bytes after it");
  refuses(u64le(9) + "{}", "the header length is 9 bytes but the file has 2 bytes after it");
  refuses(u64le(200'000'000) + "{}", "over the 100000000 bytes");
  refuses(file_bytes("[1,2]", ""), "expected a JSON object starting with '{'");
  refuses(file_bytes(R"({"a":)", ""), "not valid UTF-8 JSON");
  refuses(file_bytes("{\"a\xff\":" + tensor("F32", "[0]", "[0,0]") + "}", ""), "not valid UTF-8 JSON");
  std::string bomb(100000, '[');
  refuses(file_bytes("{\"a\":" + bomb, ""), "nested deeper than 3 levels");
  refuses(file_bytes(R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,0]}})", ""), "nested deeper than 3");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1]", "[0,4]") + R"(,"a":)" + tensor("F32", "[1]", "[4,8]") + "}",
                     floats({1, 2})),
          "the key \"a\" appears twice");
  refuses(file_bytes(R"({"a":)" + tensor("Q7", "[1]", "[0,4]") + "}", floats({1})), "has the dtype \"Q7\"");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[-1]", "[0,4]") + "}", floats({1})), "non-negative integer");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1.5]", "[0,4]") + "}", floats({1})), "non-negative integer");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[4294967296,4294967296]", "[0,4]") + "}", floats({1})),
          "byte size of its shape overflows");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[9223372036854775808]", "[0,4]") + "}", floats({1})), "is too large");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[3]", "[0,8]") + "}", floats({1, 2})), "has 12 bytes");
  refuses(file_bytes(R"({"a":)" + tensor("I64", "[1]", "[0,4]") + "}", floats({1})), "has 8 bytes");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[0]", "[8,0]") + "}", floats({1, 2})), "end before they begin");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1]", "[0]") + "}", floats({1})), "expected data_offsets");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1]", "[0,4,8]") + "}", floats({1})), "expected data_offsets");
  refuses(file_bytes(R"({"a":{"dtype":"F32","shape":[1]}})", floats({1})), "has no \"data_offsets\"");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[2]", "[0,8]") + R"(,"b":)" + tensor("F32", "[2]", "[4,12]") + "}",
                     floats({1, 2, 3})),
          "it overlaps the tensor before it");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1]", "[0,4]") + R"(,"b":)" + tensor("F32", "[1]", "[8,12]") + "}",
                     floats({1, 2, 3})),
          "a gap before it");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[1]", "[0,4]") + "}", floats({1, 2})),
          "the tensors cover 4 bytes of data, but the file has 8");
  refuses(file_bytes(R"({"a":)" + tensor("F32", "[2]", "[0,8]") + "}", floats({1})),
          "the tensors cover 8 bytes of data, but the file has 4");
  refuses(file_bytes(R"({"__metadata__":{"k":1}})", ""), "\"__metadata__\" entry \"k\" is number");
  refuses(file_bytes(R"({"__metadata__":[]})", ""), "expected \"__metadata__\" to map strings to strings");
  refuses(file_bytes(R"({"a":[1,2]})", ""), "tensor \"a\" is array");

  // Through load: a hostile file is a fabric::Error, never a crash.
  fabric_test::TempDir dir;
  fabric::Fabric fabric;
  write(dir / "bad.safetensors", u64le(1) + "{");
  REQUIRE_THROWS_AS(fabric.load(dir / "bad.safetensors"), fabric::Error);
  write(dir / "short.safetensors", "abc");
  REQUIRE_THROWS_WITH(fabric.load(dir / "short.safetensors"), ContainsSubstring("expected at least 8"));
  // Truncations of a real checkpoint all fail cleanly.
  torch::nn::Linear linear(3, 3);
  fabric.save(dir / "real.safetensors", {{"model", linear}, {"epoch", std::int64_t{1}}});
  const std::string real = read(dir / "real.safetensors");
  for (std::size_t n = 0; n < real.size(); n += 7) {
    write(dir / "cut.safetensors", real.substr(0, n));
    REQUIRE_THROWS_AS(fabric.load(dir / "cut.safetensors"), fabric::Error);
  }
}

TEST_CASE("safetensors: what safetensors cannot hold is refused at save, naming the entry", "[io][safetensors]") {
  fabric_test::TempDir dir;
  fabric::Fabric fabric;
  torch::nn::Linear linear(2, 2);
  REQUIRE_THROWS_WITH(fabric.save(dir / "c.safetensors", {{"model", linear}, {"weight", torch::ones({1})}}),
                      ContainsSubstring("the tensor name \"weight\" is given twice"));
  REQUIRE_THROWS_WITH(fabric.save(dir / "u.safetensors", {{"bits", torch::zeros({2}, at::kComplexDouble)}}),
                      ContainsSubstring("has no safetensors type"));
  CHECK_FALSE(std::filesystem::exists(dir / "c.safetensors"));
}

TEST_CASE("safetensors: files Python's safetensors.torch.save_file wrote load with their dtypes, shapes and values",
          "[io][safetensors]") {
  // Written on the GPU machine by tests/python/safetensors_fixtures.py (torch 2.11, safetensors 0.8).
  const auto dir = std::filesystem::path(__FILE__).parent_path() / "fixtures/safetensors";
  std::ifstream in(dir / "expected.json");
  REQUIRE(in);
  const auto expected = nlohmann::json::parse(in);
  fabric::Fabric fabric;
  for (const auto& [file, spec] : expected.items()) {
    INFO(file);
    const fabric::State rest = fabric.load(dir / file);
    CHECK(rest.size() == spec.at("tensors").size() + spec.at("metadata").size());
    for (const auto& [name, t] : spec.at("tensors").items()) {
      INFO(name);
      const at::Tensor loaded = rest.at(name).get<at::Tensor>();
      CHECK(st::dtype_name(loaded.scalar_type()) == t.at("dtype").get<std::string>());
      CHECK(loaded.sizes().vec() == t.at("shape").get<std::vector<std::int64_t>>());
      const at::Tensor as_double = loaded.to(at::kDouble).flatten().contiguous();
      CHECK(std::vector<double>(as_double.data_ptr<double>(), as_double.data_ptr<double>() + as_double.numel()) ==
            t.at("values").get<std::vector<double>>());
    }
  }
  const fabric::State dtypes = fabric.load(dir / "dtypes.safetensors");
  CHECK(dtypes.at("step").get<std::int64_t>() == 12);  // "int:12"
  CHECK(dtypes.at("lr").get<double>() == 0.001);
  CHECK(dtypes.at("name").get<std::string>() == "run");
  CHECK(fabric.load(dir / "model.safetensors").at("format").get<std::string>() == "pt");  // untagged: as it is

  // Python's state_dict() names are the C++ module's: the model loads strictly.
  auto model = make_model();
  fabric.load_raw(dir / "model.safetensors", model);
  const fabric::State tensors = fabric.load(dir / "model.safetensors");
  CHECK(torch::equal(model[1]->named_buffers()["running_mean"], tensors.at("1.running_mean").get<at::Tensor>()));
  CHECK(model[1]->named_buffers()["num_batches_tracked"].item<std::int64_t>() == 1);
}

// Writes a checkpoint and what Python must find in it, for tests/python/read_safetensors.py (hidden: run
// by hand or on the GPU machine with FABRIC_ST_SAMPLE_DIR set).
TEST_CASE("safetensors: a sample for Python's reader", "[.safetensors-sample]") {
  const char* out = std::getenv("FABRIC_ST_SAMPLE_DIR");
  REQUIRE(out != nullptr);
  const std::filesystem::path dir(out);
  fabric::Fabric fabric;
  auto model = make_model();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(0.01));
  train(model, optimizer, 2, 1);
  fabric.save(dir / "fabric.safetensors", {{"model", model}, {"optimizer", optimizer}, {"epoch", std::int64_t{3}}});
  nlohmann::json expected{{"tensors", nlohmann::json::object()},
                          {"metadata", {{"epoch", "int:3"}}},
                          {"model_keys", nlohmann::json::array()}};
  const auto values = [](const at::Tensor& t) {
    const at::Tensor d = t.detach().to(at::kDouble).flatten().contiguous();
    return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  };
  const auto file = st::read(dir / "fabric.safetensors");
  for (const auto& [name, t] : file.tensors) {
    nlohmann::json spec{{"dtype", st::dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}};
    spec["values"] = values(t);
    expected["tensors"][name] = std::move(spec);
  }
  for (const auto& item : model->named_parameters()) expected["model_keys"].push_back(item.key());
  for (const auto& item : model->named_buffers()) expected["model_keys"].push_back(item.key());
  // The values are the model's own, not just what the file holds.
  for (const auto& item : model->named_parameters()) {
    REQUIRE(expected["tensors"][item.key()]["values"] == nlohmann::json(values(item.value())));
  }
  std::ofstream(dir / "expected.json") << expected.dump(1) << "\n";
}
