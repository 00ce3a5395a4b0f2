// Policies written outside the library, as a user writes them: a strategy that overrides one step, a
// precision, an accelerator, checkpoint formats and a logger that derives from nothing. None of them needs
// an edit of fabric; each runs through Fabric's delegation.
// Lightning: tests_fabric/test_connector.py::test_custom_accelerator,
// tests_fabric/strategies/test_strategy.py::test_save_checkpoint_convert_stateful_objects (the strategy's
// save through its CheckpointIO)

#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

using Catch::Matchers::ContainsSubstring;

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl() : fc(register_module("fc", torch::nn::Linear(3, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(x); }
  torch::nn::Linear fc;
};
TORCH_MODULE(Net);

/// A strategy that differs from one device in one step only: it clips every gradient element to
/// max_norm, whatever the options ask, and counts its calls.
struct ClipElementwise : fabric::SingleDevice {
  static constexpr std::string_view name = "clip_elementwise";
  int clips = 0;

  template <class M, class State, class O, class P>
  std::optional<at::Tensor> clip_gradients(M& /*module*/, State& /*state*/, O& optimizer, P& precision,
                                           const fabric::ClipOptions& options) {
    ++clips;
    precision.unscale_gradients(optimizer);
    fabric::clip_gradients_value(fabric::optimizer_gradients(optimizer), options.max_norm.value_or(0.0));
    return std::nullopt;
  }
};

/// A precision that counts what the strategy hands it.
struct Counting : fabric::PrecisionBase {
  static constexpr std::string_view name = "counting";
  int backwards = 0;
  int steps = 0;
  int unscales = 0;

  template <class... Args>
  void backward(const at::Tensor& loss, Args&&... args) {
    ++backwards;
    loss.backward(std::forward<Args>(args)...);
  }
  template <class O>
  void unscale_gradients(O& /*optimizer*/) {
    ++unscales;
  }
  template <class O, class Closure>
  at::Tensor optimizer_step(O& optimizer, Closure&& closure) {
    ++steps;
    return fabric::PrecisionBase::optimizer_step(optimizer, std::forward<Closure>(closure));
  }
};

/// An accelerator of one's own: the CPU, with a count of what Fabric asks of it.
struct Recording {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "recording";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static inline int checks = 0, selections = 0, teardowns = 0;
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
  void check(int devices) const {
    ++checks;
    if (devices != 1) fabric::detail::raise("recording: expected one device, found {}", devices);
  }
  c10::Device select_device(int /*local_rank*/, int /*devices*/) const {
    ++selections;
    return c10::Device(c10::DeviceType::CPU);
  }
  void teardown() { ++teardowns; }
};

/// A checkpoint format that keeps checkpoints in memory (the format boundary without any file).
struct InMemory {
  std::shared_ptr<std::map<std::string, fabric::Checkpoint>> store =
      std::make_shared<std::map<std::string, fabric::Checkpoint>>();
  void save_checkpoint(const fabric::Checkpoint& checkpoint, const std::filesystem::path& path) {
    store->insert_or_assign(path.string(), checkpoint.copy());
  }
  fabric::Checkpoint load_checkpoint(const std::filesystem::path& path) {
    const auto it = store->find(path.string());
    if (it == store->end()) fabric::detail::raise("in memory: no checkpoint at {}", path.string());
    return it->second.copy();
  }
  void remove_checkpoint(const std::filesystem::path& path) { store->erase(path.string()); }
};

/// The native format with a count of the files it wrote and read.
struct CountingNative {
  int saves = 0, loads = 0, removes = 0;
  fabric::NativeCheckpointIO native;
  void save_checkpoint(const fabric::Checkpoint& checkpoint, const std::filesystem::path& path) {
    ++saves;
    native.save_checkpoint(checkpoint, path);
  }
  fabric::Checkpoint load_checkpoint(const std::filesystem::path& path) {
    ++loads;
    return native.load_checkpoint(path);
  }
  void remove_checkpoint(const std::filesystem::path& path) {
    ++removes;
    native.remove_checkpoint(path);
  }
};

/// A logger that derives from nothing.
struct Collecting {
  std::vector<std::pair<std::int64_t, fabric::Metrics>> rows;
  fabric::Hyperparameters params;
  std::string name() const { return "collecting"; }
  std::string version() const { return "7"; }
  void log_metrics(const fabric::Metrics& metrics, std::optional<std::int64_t> step) {
    rows.emplace_back(step.value_or(-1), metrics);
  }
  void log_hyperparams(const fabric::Hyperparameters& p) { params = p; }
};

}  // namespace

TEST_CASE("a strategy derived from SingleDevice overrides clip_gradients and keeps every other step",
          "[strategy][custom]") {
  static_assert(fabric::Strategy<ClipElementwise>);
  fabric::Fabric<fabric::CPU, ClipElementwise> fabric;
  CHECK(fabric.strategy().name == "clip_elementwise");
  Net net;
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1));
  auto [model, optimizer] = fabric.setup(net, sgd);
  fabric.backward((model(torch::full({4, 3}, 10.0)) * 100).sum());
  // The override runs, and does what it says (elementwise, not by norm).
  CHECK_FALSE(fabric.clip_gradients(model, optimizer, {.max_norm = 0.5}).has_value());
  CHECK(fabric.strategy().clips == 1);
  for (const auto& p : net->parameters()) CHECK(p.grad().abs().max().item<double>() <= 0.5);
  // Fabric's checks of the options come before the strategy.
  CHECK_THROWS_WITH(fabric.clip_gradients(model, optimizer, {}), ContainsSubstring("exactly one of"));
  CHECK(fabric.strategy().clips == 1);
  // Everything else is SingleDevice's: the step, collectives, checkpoints.
  const auto before = net->fc->weight.clone();
  optimizer.step();
  CHECK_FALSE(torch::equal(before, net->fc->weight));
  CHECK(fabric.all_reduce(3.0).item<double>() == 3.0);
  fabric_test::TempDir dir("custom-strategy");
  fabric.save(dir / "c.ckpt", {{"model", model}, {"step", 1}});
  Net other;
  fabric::State state{{"model", other}};
  CHECK(fabric.load(dir / "c.ckpt", state).at("step").get<int>() == 1);
  CHECK(torch::equal(other->fc->weight, net->fc->weight));
}

TEST_CASE("backward, clipping and the optimizer step reach the precision through the strategy",
          "[strategy][precision][custom]") {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, Counting> fabric;
  Net net;
  torch::optim::AdamW adamw(net->parameters());
  auto [model, optimizer] = fabric.setup(net, adamw);
  fabric.backward(model(torch::ones({2, 3})).sum());
  auto norm = fabric.clip_gradients(model, optimizer, {.max_norm = 1.0});
  optimizer.step();
  CHECK(fabric.precision().backwards == 1);
  CHECK(fabric.precision().unscales == 1);
  CHECK(fabric.precision().steps == 1);
  REQUIRE(norm.has_value());
  CHECK(norm->item<double>() > 0.0);
}

TEST_CASE("an accelerator of one's own is checked, selects the device and is torn down", "[accelerator][custom]") {
  Recording::checks = Recording::selections = Recording::teardowns = 0;
  {
    fabric::Fabric<Recording> fabric;
    CHECK(fabric.device().is_cpu());
    CHECK(Recording::checks == 1);
    CHECK(Recording::selections == 1);
    CHECK(Recording::teardowns == 0);
    Net net;
    auto model = fabric.setup(net);
    CHECK(model(torch::ones({1, 3})).sizes() == torch::IntArrayRef({1, 2}));
  }
  CHECK(Recording::teardowns == 1);
  CHECK_THROWS_WITH(fabric::Fabric<Recording>({.devices = 2}), ContainsSubstring("recording: expected one device"));
}

TEST_CASE("save and load go through the strategy's CheckpointIO", "[strategy][checkpoint][custom]") {
  SECTION("a format that keeps checkpoints in memory") {
    InMemory memory;
    fabric::Fabric<fabric::CPU> fabric({}, fabric::SingleDevice({.checkpoint_io = memory}), fabric::FP32{});
    Net net;
    auto model = fabric.setup(net);
    fabric.save("run/last.ckpt", {{"model", model}, {"epoch", 3}});
    CHECK_FALSE(std::filesystem::exists("run/last.ckpt"));
    REQUIRE(memory.store->contains("run/last.ckpt"));
    // The dictionary a format receives: the entries and fabric's marker, modules as {dotted name: tensor}.
    const auto& written = memory.store->at("run/last.ckpt");
    CHECK(written.contains("model"));
    CHECK(written.contains("epoch"));
    CHECK(written.contains("__fabric__"));
    CHECK(written.at("model").toGenericDict().contains("fc.weight"));
    Net other;
    fabric::State state{{"model", other}};
    auto rest = fabric.load("run/last.ckpt", state);
    CHECK(rest.at("epoch").get<int>() == 3);
    CHECK(torch::equal(other->fc->weight, net->fc->weight));
    fabric.strategy().remove_checkpoint("run/last.ckpt");
    CHECK(memory.store->empty());
    CHECK_THROWS_WITH(fabric.load("run/last.ckpt", state), ContainsSubstring("in memory: no checkpoint"));
  }
  SECTION("the native format behind a counting wrapper, set after construction") {
    fabric_test::TempDir dir("custom-io");
    fabric::Fabric<fabric::CPU> fabric;
    CHECK_FALSE(fabric.strategy().checkpoint_io());
    fabric.strategy().set_checkpoint_io(CountingNative{});
    auto* counting = fabric.strategy().checkpoint_io().target<CountingNative>();
    REQUIRE(counting != nullptr);
    CHECK(fabric.strategy().checkpoint_io().target<InMemory>() == nullptr);
    fabric.save(dir / "a.ckpt", {{"step", 5}});
    CHECK(fabric.load(dir / "a.ckpt").at("step").get<int>() == 5);
    CHECK(counting->saves == 1);
    CHECK(counting->loads == 1);
    // What the counting format wrote is fabric's native file.
    fabric::Fabric<fabric::CPU> plain;
    CHECK(plain.load(dir / "a.ckpt").at("step").get<int>() == 5);
    fabric.strategy().remove_checkpoint(dir / "a.ckpt");
    CHECK(counting->removes == 1);
    CHECK_FALSE(std::filesystem::exists(dir / "a.ckpt"));
  }
}

namespace {

/// A format of one's own in the list: `*.tagged` files, a magic line and then a torch pickle.
struct Tagged {
  static constexpr std::string_view magic = "TAGGED\n";
  bool claims(const std::filesystem::path& p) const { return p.extension() == ".tagged"; }
  bool recognises(const std::filesystem::path& p) const { return fabric::file_head(p, magic.size()) == magic; }
  void save_checkpoint(const fabric::Checkpoint& c, const std::filesystem::path& p) const {
    const std::vector<char> bytes = torch::jit::pickle_save(c);
    std::ofstream out(p, std::ios::binary);
    out << magic;
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  fabric::Checkpoint load_checkpoint(const std::filesystem::path& p) const {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(magic.size()));
    return torch::jit::pickle_load(bytes).toGenericDict();
  }
  void remove_checkpoint(const std::filesystem::path& p) const { std::filesystem::remove(p); }
  void load_raw(const std::filesystem::path& p, torch::nn::Module& module, bool /*strict*/) const {
    const auto model = load_checkpoint(p).at("model").toGenericDict();
    torch::NoGradGuard no_grad;
    for (auto& item : module.named_parameters()) item.value().copy_(model.at(item.key()).toTensor());
    ++*raw_loads;
  }
  std::shared_ptr<int> raw_loads = std::make_shared<int>(0);
};

}  // namespace

TEST_CASE("a format of one's own joins the list of fabric's formats for save, load and load_raw",
          "[strategy][checkpoint][custom]") {
  static_assert(fabric::ListedFormat<Tagged>);
  static_assert(!fabric::ListedFormat<InMemory>);  // no claims / recognises: a plain CheckpointIO only
  using Formats = fabric::FormatList<Tagged, fabric::SafetensorsCheckpointIO, fabric::TorchCheckpointIO,
                                     fabric::NativeCheckpointIO>;
  fabric_test::TempDir dir("format-list");
  Tagged tagged;
  fabric::Fabric<fabric::CPU> fabric({}, fabric::SingleDevice({.checkpoint_io = Formats(tagged, {}, {}, {})}),
                                     fabric::FP32{});
  Net net;
  fabric.save(dir / "a.tagged", {{"model", net}, {"step", 1}});
  fabric.save(dir / "b.ckpt", {{"model", net}, {"step", 2}});
  fabric.save(dir / "c.fabric", {{"model", net}, {"step", 3}});
  fabric.save(dir / "d.safetensors", {{"model", net}, {"step", 4}});
  fabric.save(dir / "e.bin", {{"model", net}, {"step", 5}});
  // Each path went to the format that claims it; the last (native) took the one nobody claims.
  CHECK(fabric::file_head(dir / "a.tagged", 7) == "TAGGED\n");
  CHECK(fabric::TorchCheckpointIO{}.recognises(dir / "b.ckpt"));
  CHECK(fabric::TorchCheckpointIO::read(dir / "b.ckpt").toGenericDict().at("step").toInt() == 2);
  CHECK_FALSE(fabric::TorchCheckpointIO{}.recognises(dir / "c.fabric"));
  CHECK(fabric::NativeCheckpointIO{}.load_checkpoint(dir / "c.fabric").at("step").toInt() == 3);
  CHECK(fabric::SafetensorsCheckpointIO{}.load_checkpoint(dir / "d.safetensors").contains("model"));
  CHECK_FALSE(fabric::TorchCheckpointIO{}.recognises(dir / "e.bin"));
  CHECK(fabric::NativeCheckpointIO{}.load_checkpoint(dir / "e.bin").at("step").toInt() == 5);
  int step = 1;
  for (const char* name : {"a.tagged", "b.ckpt", "c.fabric", "d.safetensors", "e.bin"}) {
    INFO(name);
    CHECK(fabric.load(dir / name).at("step").get<int>() == step++);
  }
  // The file is what counts when reading: a tagged file under another name is still the user's format.
  std::filesystem::copy_file(dir / "a.tagged", dir / "tagged.ckpt");
  CHECK(fabric.load(dir / "tagged.ckpt").at("step").get<int>() == 1);
  // load_raw goes to the format that recognises the file, the user's included.
  Net other;
  CHECK_FALSE(torch::equal(other->fc->weight, net->fc->weight));
  fabric.load_raw(dir / "a.tagged", other);
  CHECK(*tagged.raw_loads == 1);
  CHECK(torch::equal(other->fc->weight, net->fc->weight));
  Net from_python;
  torch::save(net, (dir / "net.pt").string());  // LibTorch's archive: the native format's load_raw
  fabric.load_raw(dir / "net.pt", from_python);
  CHECK(torch::equal(from_python->fc->weight, net->fc->weight));
  CHECK(*tagged.raw_loads == 1);
  // Without the list the tagged file is nobody's: the native format, last, says what it found.
  fabric::Fabric<fabric::CPU> plain;
  CHECK_THROWS_AS(plain.load(dir / "a.tagged"), fabric::Error);
  CHECK_THROWS_AS(plain.load_raw(dir / "a.tagged", other), fabric::Error);
  fabric.strategy().remove_checkpoint(dir / "a.tagged");
  CHECK_FALSE(std::filesystem::exists(dir / "a.tagged"));
}

TEST_CASE("a logger that derives from nothing is adapted by as_logger", "[loggers][custom]") {
  auto collecting = std::make_shared<Collecting>();
  fabric::Fabric<fabric::CPU> fabric{{.loggers = {fabric::as_logger(collecting)}}};
  REQUIRE(fabric.logger() != nullptr);
  CHECK(fabric.logger()->name() == "collecting");
  CHECK(fabric.logger()->version() == "7");
  CHECK(fabric.logger()->log_dir().empty());
  fabric.log("loss", 0.5, 3);
  fabric.log_dict({{"a", 1.0}, {"b", 2.0}});
  fabric.logger()->log_hyperparams({{"lr", "0.1"}});
  fabric.logger()->finalize("success");
  REQUIRE(collecting->rows.size() == 2);
  CHECK(collecting->rows[0].first == 3);
  CHECK(collecting->rows[0].second.at("loss") == 0.5);
  CHECK(collecting->rows[1].first == -1);
  CHECK(collecting->rows[1].second.at("b") == 2.0);
  CHECK(collecting->params.at("lr") == "0.1");
  // A fabric::Logger passes through as it is.
  auto csv = std::make_shared<fabric::CSVLogger>(fabric::CSVLogger::Options{.root_dir = "unused"});
  CHECK(fabric::as_logger(csv).get() == csv.get());
}
