// TensorBoardLogger: Lightning's layout and version numbering (ported from Lightning's
// tests/tests_fabric/loggers/test_tensorboard.py), the event file's name and first record, the
// TFRecord framing and its CRC-32C checked by an independent reader (tfrecord_reader.hpp), scalars,
// hyper-parameters and text decoded back, the flush cadence (queue, timer, destruction, exit), and
// the errors for bad options and unwritable directories. Torch-free: compiled into fabric_core_tests.

#include <fabric/core/rank_zero.hpp>
#include <fabric/loggers/tensorboard.hpp>

#include "unit/loggers/tfrecord_reader.hpp"
#include "unit/rank_environment.hpp"
#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fmt/format.h>

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace tb = fabric::detail::tensorboard;
namespace rd = fabric_test::tfrecord;
using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::Matches;
using fabric::TensorBoardLogger;

// A fresh directory per test, removed after.
struct TempDir : fabric_test::TempDir {
  TempDir() : fabric_test::TempDir("fabric-tb") {}
};

// Sets an environment variable for the scope, restoring the old value after.
class EnvGuard {
 public:
  EnvGuard(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~EnvGuard() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// The events of the one event file in dir.
std::vector<rd::Event> events_in(const fs::path& dir) {
  const auto files = rd::event_files(dir);
  REQUIRE(files.size() == 1);
  return rd::read_events(files.front());
}

// The (step, value) of every scalar with the tag, in file order.
std::vector<std::pair<std::int64_t, float>> scalars(const std::vector<rd::Event>& events, const std::string& tag) {
  std::vector<std::pair<std::int64_t, float>> out;
  for (const auto& e : events) {
    for (const auto& v : e.values) {
      if (v.tag == tag && v.simple_value) out.emplace_back(e.step, *v.simple_value);
    }
  }
  return out;
}

// The values (with their event) of the tag, in file order.
std::vector<std::pair<const rd::Event*, const rd::Value*>> values(const std::vector<rd::Event>& events,
                                                                  const std::string& tag) {
  std::vector<std::pair<const rd::Event*, const rd::Value*>> out;
  for (const auto& e : events) {
    for (const auto& v : e.values) {
      if (v.tag == tag) out.emplace_back(&e, &v);
    }
  }
  return out;
}

// Polls until the file holds at least n records (or the time is up); returns the records read last.
std::vector<rd::Event> wait_for_records(const fs::path& file, std::size_t n, std::chrono::seconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  std::vector<rd::Event> events = rd::read_events(file);
  while (events.size() < n && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    events = rd::read_events(file);
  }
  return events;
}

TensorBoardLogger::Options at(const fs::path& root) { return {.root_dir = root}; }

}  // namespace

// ---- the format ---------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: CRC-32C and its TFRecord mask match the standard and an independent reader",
          "[tensorboard]") {
  // The CRC-32C check value, and vectors of RFC 3720 (iSCSI) B.4, which TensorFlow's crc32c_test uses.
  CHECK(tb::crc32c("123456789") == 0xE3069283u);
  CHECK(rd::crc32c("123456789") == 0xE3069283u);
  CHECK(tb::crc32c("") == 0u);
  CHECK(tb::crc32c(std::string(32, '\0')) == 0x8A9136AAu);
  CHECK(tb::crc32c(std::string(32, '\xFF')) == 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending += static_cast<char>(i);
  CHECK(tb::crc32c(ascending) == 0x46DD794Eu);
  // The mask: rotate right by 15, add 0xa282ead8.
  const std::uint32_t crc = 0xE3069283u;
  CHECK(tb::masked_crc32c("123456789") == static_cast<std::uint32_t>(((crc >> 15) | (crc << 17)) + 0xa282ead8u));

  std::mt19937 gen(7);
  for (std::size_t n = 0; n < 300; n += 7) {
    std::string data(n, '\0');
    for (auto& c : data) c = static_cast<char>(gen());
    CHECK(tb::masked_crc32c(data) == rd::masked_crc32c(data));
    std::string record;
    tb::append_record(record, data);
    REQUIRE(record.size() == n + 16);
    const auto back = rd::split_records(record);
    REQUIRE(back.size() == 1);
    CHECK(back.front() == data);
  }

  SECTION("the reader rejects a flipped bit in the length, in the data, and a cut record") {
    std::string record;
    tb::append_record(record, "some event bytes");
    std::string bad_length = record;
    bad_length[0] ^= 1;
    CHECK_THROWS_WITH(rd::split_records(bad_length), ContainsSubstring("length checksum"));
    std::string bad_data = record;
    bad_data[14] ^= 1;
    CHECK_THROWS_WITH(rd::split_records(bad_data), ContainsSubstring("data checksum"));
    CHECK_THROWS_WITH(rd::split_records(record.substr(0, record.size() - 1)), ContainsSubstring("truncated"));
  }
}

TEST_CASE("TensorBoardLogger: the protobuf encoding of varints, doubles and floats", "[tensorboard]") {
  tb::ProtoWriter w;
  w.varint(1, 300).int64(2, -1).float64(3, 0.5).float32(4, -2.0f).bytes(5, "ab");
  // 300 = 0xAC 0x02; -1 as ten bytes; 0.5 = 0x3FE0000000000000; -2.0f = 0xC0000000.
  const std::string expected = std::string("\x08\xAC\x02", 3) + "\x10" + std::string(9, '\xFF') + "\x01" + "\x19" +
                               std::string(6, '\0') + "\xE0\x3F" + "\x25" + std::string(3, '\0') + "\xC0" + "\x2A\x02" +
                               "ab";
  CHECK(w.data() == expected);
  const rd::Message m(w.data());
  CHECK(m.int64(1) == 300);
  CHECK(m.int64(2) == -1);
  CHECK(m.float64(3) == 0.5);
  CHECK(m.float32(4) == -2.0f);
  CHECK(m.string(5) == "ab");
}

TEST_CASE("TensorBoardLogger: the event file's name and its first record", "[tensorboard]") {
  TempDir tmp;
  const double before = tb::wall_time_now();
  TensorBoardLogger logger(at(tmp.path()));
  logger.log_metrics({{"loss", 1.0}}, 0);
  logger.save();
  const fs::path file = logger.event_file();
  REQUIRE(file.parent_path() == tmp.path() / "lightning_logs" / "version_0");
  const std::string pattern =
      fmt::format(R"(events\.out\.tfevents\.\d{{10}}\.{}\.{}\.\d+)", tb::host_name(), static_cast<long>(::getpid()));
  CHECK_THAT(file.filename().string(), Matches(pattern));
  const auto seconds = std::stoll(file.filename().string().substr(20, 10));
  CHECK(std::abs(static_cast<double>(seconds) - before) < 5);

  const auto events = rd::read_events(file);
  REQUIRE(events.size() == 2);
  REQUIRE(events[0].file_version);
  CHECK(*events[0].file_version == "brain.Event:2");
  CHECK(events[0].source_writer == std::optional<std::string>("fabric"));
  CHECK(!events[0].has_summary);
  CHECK(std::abs(events[0].wall_time - before) < 5);
  CHECK(events[1].has_summary);
  CHECK(!events[1].file_version);

  SECTION("two loggers in one directory write two files (the last part of the name counts them)") {
    TensorBoardLogger other({.root_dir = tmp.path(), .version = 0});
    other.log_metrics({{"loss", 2.0}}, 0);
    other.save();
    CHECK(other.event_file() != file);
    CHECK(rd::event_files(file.parent_path()).size() == 2);
  }
}

// ---- the layout, as Lightning's tests ---------------------------------------------------------------

TEST_CASE("TensorBoardLogger: Lightning's directory layout and version numbering", "[tensorboard]") {
  TempDir tmp;
  const fs::path root = tmp.path();

  SECTION("test_tensorboard_automatic_versioning: the next number after the version_N directories") {
    fs::create_directories(root / "tb_versioning" / "version_0");
    fs::create_directories(root / "tb_versioning" / "version_1");
    fs::create_directories(root / "tb_versioning" / "version_nonumber");
    fs::create_directories(root / "tb_versioning" / "other");
    std::ofstream(root / "tb_versioning" / "version_7");  // a file, not a directory: not counted
    TensorBoardLogger logger({.root_dir = root, .name = "tb_versioning"});
    CHECK(logger.version() == "2");
    CHECK(logger.log_dir() == root / "tb_versioning" / "version_2");
  }
  SECTION("Lightning reads N up to the next '_': version_5_old counts as 5") {
    fs::create_directories(root / "lightning_logs" / "version_5_old");
    fs::create_directories(root / "lightning_logs" / "version_");
    fs::create_directories(root / "lightning_logs" / "version_x1");
    CHECK(TensorBoardLogger(at(root)).version() == "6");
  }
  SECTION("test_tensorboard_manual_versioning: an int version is version_N") {
    for (int i = 0; i < 3; ++i) fs::create_directories(root / "tb_versioning" / fmt::format("version_{}", i));
    TensorBoardLogger logger({.root_dir = root, .name = "tb_versioning", .version = 1});
    CHECK(logger.version() == "1");
    CHECK(logger.log_dir() == root / "tb_versioning" / "version_1");
  }
  SECTION("test_tensorboard_named_version: a string version is the directory's name") {
    fs::create_directories(root / "tb_versioning");
    TensorBoardLogger logger({.root_dir = root, .name = "tb_versioning", .version = std::string("2020-02-05-162402")});
    logger.log_hyperparams({{"a", "1"}, {"b", "2"}, {"123", "3"}});
    CHECK(logger.version() == "2020-02-05-162402");
    std::vector<std::string> listed;
    for (const auto& e : fs::directory_iterator(root / "tb_versioning")) listed.push_back(e.path().filename());
    CHECK(listed == std::vector<std::string>{"2020-02-05-162402"});
    CHECK(!fs::is_empty(root / "tb_versioning" / "2020-02-05-162402"));
  }
  SECTION("test_tensorboard_no_name: an empty name puts the versions in root_dir") {
    TensorBoardLogger logger({.root_dir = root, .name = ""});
    logger.log_hyperparams({{"a", "1"}});
    CHECK(logger.root_dir() == root);
    CHECK(!fs::is_empty(root / "version_0"));
  }
  SECTION("test_tensorboard_log_sub_dir: sub_dir goes under the version") {
    const fs::path logs = root / "logs";
    CHECK(TensorBoardLogger({.root_dir = logs, .name = "name", .version = std::string("version")}).log_dir() ==
          logs / "name" / "version");
    TensorBoardLogger logger(
        {.root_dir = logs, .name = "name", .version = std::string("version"), .sub_dir = fs::path("sub_dir")});
    CHECK(logger.log_dir() == logs / "name" / "version" / "sub_dir");
    logger.log_metrics({{"x", 1}}, 0);
    CHECK(logger.event_file().parent_path() == logs / "name" / "version" / "sub_dir");
  }
  SECTION("test_tensorboard_expand_home: a leading ~ is $HOME") {
    const EnvGuard home("HOME", (root / "home").string());
    TensorBoardLogger logger(
        {.root_dir = "~/tmp", .name = "name", .version = std::string("version"), .sub_dir = fs::path("sub_dir")});
    CHECK(logger.root_dir() == "~/tmp");
    CHECK(logger.log_dir() == root / "home" / "tmp" / "name" / "version" / "sub_dir");
  }
  SECTION("test_tensorboard_expand_env_vars: $VAR and ${VAR} are the environment's, unset ones stay") {
    const EnvGuard dir("TEST_ENV_DIR", "some_directory");
    TensorBoardLogger logger({.root_dir = "$TEST_ENV_DIR/tmp",
                              .name = "name",
                              .version = std::string("version"),
                              .sub_dir = fs::path("sub_dir")});
    CHECK(logger.log_dir() == fs::path("some_directory/tmp/name/version/sub_dir"));
    ::unsetenv("FABRIC_TB_UNSET_VAR");
    CHECK(TensorBoardLogger({.root_dir = "${TEST_ENV_DIR}/$FABRIC_TB_UNSET_VAR", .version = 0}).log_dir() ==
          fs::path("some_directory/$FABRIC_TB_UNSET_VAR/lightning_logs/version_0"));
  }
  SECTION("test_tensorboard_with_symlink: a symbolic link as root_dir, empty name") {
    fs::create_directories(root / "lightning_logs" / "version_3");
    fs::create_directory_symlink(root / "lightning_logs", root / "sym_lightning_logs");
    CHECK(TensorBoardLogger({.root_dir = root / "sym_lightning_logs", .name = ""}).version() == "4");
  }
  SECTION("lazy: nothing is created before the first record, not even by version() or log_dir()") {
    TensorBoardLogger logger(at(root / "later"));
    CHECK(logger.version() == "0");
    CHECK(logger.log_dir() == root / "later" / "lightning_logs" / "version_0");
    logger.log_metrics({}, 0);
    logger.save();
    logger.finalize("success");
    CHECK(!fs::exists(root / "later"));
    CHECK(logger.event_file().empty());
  }
  SECTION("the version is settled on first use: two loggers made together get version_0 and version_1") {
    TensorBoardLogger a(at(root));
    TensorBoardLogger b(at(root));
    a.log_metrics({{"x", 1}}, 0);
    b.log_metrics({{"x", 2}}, 0);
    CHECK(a.version() == "0");
    CHECK(b.version() == "1");
  }
}

// ---- scalars ----------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: scalars round trip as simple_value floats", "[tensorboard]") {
  TempDir tmp;
  TensorBoardLogger logger(at(tmp.path()));
  const double start = tb::wall_time_now();
  for (int step = 0; step < 25; ++step) {
    logger.log_metrics({{"train/loss", 1.0 / (step + 1)}, {"lr", 0.1}}, step * 10);
  }
  logger.save();
  const auto events = events_in(logger.log_dir());
  REQUIRE(events.size() == 1 + 50);
  const auto loss = scalars(events, "train/loss");
  REQUIRE(loss.size() == 25);
  for (int step = 0; step < 25; ++step) {
    CHECK(loss[step].first == step * 10);
    CHECK(loss[step].second == static_cast<float>(1.0 / (step + 1)));
  }
  CHECK(scalars(events, "lr").size() == 25);
  for (const auto& e : events) {
    CHECK(e.wall_time >= start - 1);
    CHECK(e.wall_time <= tb::wall_time_now() + 1);
    for (const auto& v : e.values) {
      CHECK(!v.plugin);
      CHECK(!v.tensor);
    }
  }
  // One value per event, as SummaryWriter.add_scalar writes them.
  for (std::size_t i = 1; i < events.size(); ++i) CHECK(events[i].values.size() == 1);
}

TEST_CASE("TensorBoardLogger: the step, the prefix, a metric added mid-run", "[tensorboard]") {
  TempDir tmp;

  SECTION("without a step, the count of log_metrics calls") {
    TensorBoardLogger logger(at(tmp.path()));
    logger.log_metrics({{"a", 1}}, std::nullopt);
    logger.log_metrics({{"a", 2}}, std::nullopt);
    logger.log_metrics({{"a", 3}}, 100);
    logger.log_metrics({{"a", 4}}, std::nullopt);
    logger.save();
    const auto a = scalars(events_in(logger.log_dir()), "a");
    CHECK(a == std::vector<std::pair<std::int64_t, float>>{{0, 1.f}, {1, 2.f}, {100, 3.f}, {3, 4.f}});
  }
  SECTION("the prefix is joined with '-', as Lightning's LOGGER_JOIN_CHAR") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .prefix = "fold1"});
    logger.log_metrics({{"loss", 0.5}}, 3);
    logger.save();
    const auto events = events_in(logger.log_dir());
    CHECK(scalars(events, "fold1-loss") == std::vector<std::pair<std::int64_t, float>>{{3, 0.5f}});
    CHECK(scalars(events, "loss").empty());
  }
  SECTION("a metric that first appears mid-run simply starts its series") {
    TensorBoardLogger logger(at(tmp.path()));
    logger.log_metrics({{"loss", 3}}, 0);
    logger.log_metrics({{"loss", 2}}, 1);
    logger.log_metrics({{"loss", 1}, {"val_acc", 0.75}}, 2);
    logger.log_metrics({{"val_acc", 0.8}}, 3);
    logger.save();
    const auto events = events_in(logger.log_dir());
    CHECK(scalars(events, "loss").size() == 3);
    CHECK(scalars(events, "val_acc") == std::vector<std::pair<std::int64_t, float>>{{2, 0.75f}, {3, 0.8f}});
  }
}

TEST_CASE("TensorBoardLogger: non-finite and out-of-range values are written as they are", "[tensorboard]") {
  TempDir tmp;
  TensorBoardLogger logger(at(tmp.path()));
  const double inf = std::numeric_limits<double>::infinity();
  logger.log_metrics({{"nan", std::numeric_limits<double>::quiet_NaN()},
                      {"inf", inf},
                      {"minus_inf", -inf},
                      {"huge", 1e300},
                      {"minus_huge", -1e300},
                      {"tiny", 1e-40},
                      {"zero", -0.0}},
                     0);
  logger.save();
  const auto events = events_in(logger.log_dir());
  CHECK(std::isnan(scalars(events, "nan").at(0).second));
  CHECK(scalars(events, "inf").at(0).second == std::numeric_limits<float>::infinity());
  CHECK(scalars(events, "minus_inf").at(0).second == -std::numeric_limits<float>::infinity());
  CHECK(scalars(events, "huge").at(0).second == std::numeric_limits<float>::infinity());
  CHECK(scalars(events, "minus_huge").at(0).second == -std::numeric_limits<float>::infinity());
  CHECK(scalars(events, "tiny").at(0).second == static_cast<float>(1e-40));
  CHECK(std::signbit(scalars(events, "zero").at(0).second));
}

TEST_CASE("TensorBoardLogger: unicode and awkward tag names pass through byte for byte", "[tensorboard]") {
  TempDir tmp;
  TensorBoardLogger logger(at(tmp.path()));
  const std::vector<std::string> tags = {"损失/训练", "émoji 🚀", "with space", "a\"quote", "", "x/y/z"};
  fabric::Metrics m;
  for (std::size_t i = 0; i < tags.size(); ++i) m[tags[i]] = static_cast<double>(i);
  logger.log_metrics(m, 5);
  logger.save();
  const auto events = events_in(logger.log_dir());
  for (std::size_t i = 0; i < tags.size(); ++i) {
    CHECK(scalars(events, tags[i]) == std::vector<std::pair<std::int64_t, float>>{{5, static_cast<float>(i)}});
  }
}

// ---- hyper-parameters -------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: hyper-parameters as torch.utils.tensorboard.summary.hparams writes them",
          "[tensorboard]") {
  TempDir tmp;
  const fabric::Hyperparameters params = {
      {"lr", "0.001"},         {"batch", "32"},   {"neg", "-1.5e-3"},
      {"zero", "0"},           {"flag", "true"},  {"off", "False"},
      {"name", "adam"},        {"spaced", " 1"},  {"hex", "0x10"},
      {"nan", "nan"},          {"inf", "inf"},    {"comma", "1,5"},
      {"huge", "1e400"},       {"empty", ""},     {"quoted", "say \"hi\"\nnext line\ttab"},
      {"unicode", "学习率 ✓"}, {"", "empty key"},
  };

  SECTION("no metrics: hp_metric = -1, then experiment, session start and end at the step") {
    TensorBoardLogger logger(at(tmp.path()));
    const double before = tb::wall_time_now();
    logger.log_hyperparams(params);
    logger.save();
    const auto events = events_in(logger.log_dir());
    REQUIRE(events.size() == 1 + 4);
    CHECK(scalars(events, "hp_metric") == std::vector<std::pair<std::int64_t, float>>{{0, -1.f}});
    const std::vector<std::string> order = {"hp_metric", "_hparams_/experiment", "_hparams_/session_start_info",
                                            "_hparams_/session_end_info"};
    for (std::size_t i = 0; i < order.size(); ++i) {
      REQUIRE(events[i + 1].values.size() == 1);
      CHECK(events[i + 1].values[0].tag == order[i]);
      CHECK(events[i + 1].step == 0);
    }

    const auto hp_values = [&](const std::string& tag) {
      const auto found = values(events, tag);
      REQUIRE(found.size() == 1);
      const rd::Value& v = *found.front().second;
      REQUIRE(v.plugin == std::optional<std::string>("hparams"));
      CHECK(!v.simple_value);  // a tag and the plugin's content only
      CHECK(!v.tensor);
      return rd::decode_hparams(v.plugin_content);
    };

    const auto experiment = hp_values("_hparams_/experiment");
    CHECK(experiment.version == 0);
    REQUIRE(experiment.kind == rd::Hparams::Kind::experiment);
    std::map<std::string, int> types(experiment.hparam_infos.begin(), experiment.hparam_infos.end());
    REQUIRE(types.size() == params.size());
    constexpr int string = 1, boolean = 2, float64 = 3;  // tensorboard.hparams.DataType
    for (const char* k : {"lr", "batch", "neg", "zero"}) CHECK(types.at(k) == float64);
    for (const char* k : {"flag", "off"}) CHECK(types.at(k) == boolean);
    for (const char* k : {"name", "spaced", "hex", "nan", "inf", "comma", "huge", "empty", "quoted", "unicode", ""})
      CHECK(types.at(k) == string);
    CHECK(experiment.metric_tags == std::vector<std::string>{"hp_metric"});

    const auto start = hp_values("_hparams_/session_start_info");
    REQUIRE(start.kind == rd::Hparams::Kind::session_start);
    REQUIRE(start.values.size() == params.size());
    using K = rd::HparamValue::Kind;
    CHECK(start.values.at("lr").kind == K::number);
    CHECK(start.values.at("lr").number == 0.001);
    CHECK(start.values.at("batch").number == 32);
    CHECK(start.values.at("neg").number == -1.5e-3);
    CHECK(start.values.at("zero").kind == K::number);  // a zero is written: it is a member of a oneof
    CHECK(start.values.at("zero").number == 0);
    CHECK(start.values.at("flag").kind == K::boolean);
    CHECK(start.values.at("flag").boolean);
    CHECK(start.values.at("off").kind == K::boolean);
    CHECK(!start.values.at("off").boolean);
    for (const auto& [k, text] : params) {
      if (types.at(k) != string) continue;
      CHECK(start.values.at(k).kind == K::string);
      CHECK(start.values.at(k).string == text);
    }
    CHECK(start.start_time_secs >= before - 1);

    const auto end = hp_values("_hparams_/session_end_info");
    REQUIRE(end.kind == rd::Hparams::Kind::session_end);
    CHECK(end.status == 1);  // STATUS_SUCCESS
  }
  SECTION("with metrics: they are the scalars and the experiment's metric infos, prefixed, at the step") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .prefix = "p"});
    logger.log_hyperparams({{"lr", "0.1"}}, {{"val/acc", 0.9}, {"loss", 0.2}}, 7);
    logger.save();
    const auto events = events_in(logger.log_dir());
    CHECK(scalars(events, "p-val/acc") == std::vector<std::pair<std::int64_t, float>>{{7, 0.9f}});
    CHECK(scalars(events, "p-loss") == std::vector<std::pair<std::int64_t, float>>{{7, 0.2f}});
    CHECK(scalars(events, "hp_metric").empty());
    const auto exp = rd::decode_hparams(values(events, "_hparams_/experiment").at(0).second->plugin_content);
    CHECK(exp.metric_tags == std::vector<std::string>{"p-loss", "p-val/acc"});
    for (const auto& e : events) {
      if (e.has_summary) CHECK(e.step == 7);
    }
  }
  SECTION("default_hp_metric off and no metrics: nothing is written, as Lightning") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .default_hp_metric = false});
    logger.log_hyperparams(params);
    logger.save();
    CHECK(logger.event_file().empty());
    CHECK(fs::is_empty(tmp.path()));
  }
  SECTION("without a step, the next automatic step, which it does not advance") {
    TensorBoardLogger logger(at(tmp.path()));
    logger.log_metrics({{"a", 1}}, std::nullopt);
    logger.log_hyperparams({{"x", "1"}});
    logger.log_metrics({{"a", 2}}, std::nullopt);
    logger.save();
    const auto events = events_in(logger.log_dir());
    CHECK(scalars(events, "hp_metric").at(0).first == 1);
    CHECK(scalars(events, "a") == std::vector<std::pair<std::int64_t, float>>{{0, 1.f}, {1, 2.f}});
  }
}

TEST_CASE("TensorBoardLogger: classify_hparam reads numbers in full, booleans by name, the rest as text",
          "[tensorboard]") {
  using K = tb::HparamValue::Kind;
  CHECK(tb::classify_hparam("3").kind == K::number);
  CHECK(tb::classify_hparam("-0.5").number == -0.5);
  CHECK(tb::classify_hparam("1e-3").number == 1e-3);
  CHECK(tb::classify_hparam("True").kind == K::boolean);
  CHECK(tb::classify_hparam("TRUE").kind == K::string);
  CHECK(tb::classify_hparam("1 ").kind == K::string);
  CHECK(tb::classify_hparam("+1").kind == K::string);
  CHECK(tb::classify_hparam("-inf").kind == K::string);
  CHECK(tb::classify_hparam("").kind == K::string);
}

// ---- text -------------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: text is a DT_STRING tensor of the text plugin", "[tensorboard]") {
  TempDir tmp;
  TensorBoardLogger logger(at(tmp.path()));
  const std::string text = "# Run\n`--lr 0.1` «unicode» 🚀\n\nwith \"quotes\"";
  logger.log_text("command", text, 4);
  logger.log_metrics({{"a", 1}}, std::nullopt);
  logger.log_text("notes", "");
  logger.save();
  const auto events = events_in(logger.log_dir());
  const auto found = values(events, "command");
  REQUIRE(found.size() == 1);
  CHECK(found[0].first->step == 4);
  const rd::Value& v = *found[0].second;
  CHECK(v.plugin == std::optional<std::string>("text"));
  CHECK(v.plugin_content.empty());  // TextPluginData with version 0
  CHECK(!v.simple_value);
  REQUIRE(v.tensor);
  CHECK(v.tensor->dtype == 7);  // DT_STRING
  CHECK(v.tensor->dims == std::vector<std::int64_t>{1});
  CHECK(v.tensor->strings == std::vector<std::string>{text});
  const auto notes = values(events, "notes");
  REQUIRE(notes.size() == 1);
  CHECK(notes[0].first->step == 1);
  REQUIRE(notes[0].second->tensor);
  CHECK(notes[0].second->tensor->strings == std::vector<std::string>{""});
}

// ---- flushing ---------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: records reach the file at max_queue, save, finalize and destruction", "[tensorboard]") {
  TempDir tmp;

  SECTION("max_queue: written when that many records wait") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 600, .max_queue = 3});
    logger.log_metrics({{"a", 1}}, 0);
    logger.log_metrics({{"a", 2}}, 1);
    const fs::path file = logger.event_file();
    CHECK(rd::read_events(file).size() == 1);  // the first record is written at once
    logger.log_metrics({{"a", 3}}, 2);
    CHECK(rd::read_events(file).size() == 4);
    logger.log_metrics({{"a", 4}, {"b", 5}, {"c", 6}}, 3);  // one call may overfill the queue
    CHECK(rd::read_events(file).size() == 7);
  }
  SECTION("save() and finalize() write what waits; logging goes on into the same file") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 600});
    logger.log_metrics({{"a", 1}}, 0);
    const fs::path file = logger.event_file();
    CHECK(rd::read_events(file).size() == 1);
    logger.save();
    CHECK(rd::read_events(file).size() == 2);
    logger.log_metrics({{"a", 2}}, 1);
    logger.finalize("success");
    CHECK(rd::read_events(file).size() == 3);
    logger.log_metrics({{"a", 3}}, 2);
    logger.finalize("success");
    CHECK(rd::read_events(file).size() == 4);
    CHECK(rd::event_files(file.parent_path()).size() == 1);
  }
  SECTION("destruction writes what waits") {
    fs::path file;
    {
      TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 600});
      logger.log_metrics({{"a", 1}}, 0);
      logger.log_text("t", "x", 0);
      file = logger.event_file();
      CHECK(rd::read_events(file).size() == 1);
    }
    const auto events = rd::read_events(file);
    CHECK(events.size() == 3);
    CHECK(scalars(events, "a").size() == 1);
  }
  SECTION("flush_secs = 0: every log call writes") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 0});
    logger.log_metrics({{"a", 1}}, 0);
    CHECK(rd::read_events(logger.event_file()).size() == 2);
    logger.log_text("t", "x", 0);
    CHECK(rd::read_events(logger.event_file()).size() == 3);
  }
}

TEST_CASE("TensorBoardLogger: the timer writes what waits every flush_secs without another call", "[tensorboard]") {
  TempDir tmp;
  TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 0.05, .max_queue = 1000});
  logger.log_metrics({{"a", 1}}, 0);
  const fs::path file = logger.event_file();
  auto events = wait_for_records(file, 2, std::chrono::seconds(10));
  CHECK(events.size() == 2);
  // And again later, for a record logged after the first timed flush.
  logger.log_metrics({{"a", 2}}, 1);
  events = wait_for_records(file, 3, std::chrono::seconds(10));
  CHECK(scalars(events, "a") == std::vector<std::pair<std::int64_t, float>>{{0, 1.f}, {1, 2.f}});
}

TEST_CASE("TensorBoardLogger: a logger still alive at exit() is flushed", "[tensorboard]") {
  TempDir tmp;
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 1;
    try {
      auto* logger = new TensorBoardLogger({.root_dir = tmp.path(), .flush_secs = 600});  // never deleted
      logger->log_metrics({{"at_exit", 42}}, 9);
      code = 0;
    } catch (...) {
    }
    std::exit(code);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  const auto events = events_in(tmp.path() / "lightning_logs" / "version_0");
  CHECK(scalars(events, "at_exit") == std::vector<std::pair<std::int64_t, float>>{{9, 42.f}});
}

// ---- rank zero --------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: on a rank other than zero nothing is written, as Lightning's @rank_zero_only",
          "[tensorboard]") {
  TempDir tmp;
  const fabric_test::RankEnvironment env(fabric_test::RankEnvironment::Vars{{"RANK", "1"}});
  TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 0});
  logger.log_metrics({{"loss", 0.5}}, 0);
  logger.log_hyperparams({{"lr", "0.1"}});
  logger.log_hyperparams({{"lr", "0.1"}}, {{"acc", 1}}, 0);
  logger.log_text("t", "x", 0);
  logger.save();
  logger.finalize("success");
  CHECK(logger.event_file().empty());
  CHECK(fs::is_empty(tmp.path()));

  fabric::set_rank_zero_only_rank(0);  // the rank the strategy sets wins over RANK
  logger.log_metrics({{"loss", 0.25}}, 1);
  const auto events = events_in(logger.log_dir());
  CHECK(scalars(events, "loss") == std::vector<std::pair<std::int64_t, float>>{{1, 0.25f}});
  CHECK(logger.version() == "0");
}

// ---- errors -----------------------------------------------------------------------------------------

TEST_CASE("TensorBoardLogger: bad options fail at construction with what to pass", "[tensorboard]") {
  TempDir tmp;
  const fs::path root = tmp.path();
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .max_queue = 0}),
                    ContainsSubstring("expected max_queue >= 1, found 0"));
  CHECK_THROWS_AS(TensorBoardLogger({.root_dir = root, .max_queue = -3}), fabric::Error);
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .flush_secs = -1}),
                    ContainsSubstring("expected flush_secs >= 0 (seconds), found -1"));
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .flush_secs = std::nan("")}), ContainsSubstring("found nan"));
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .flush_secs = std::numeric_limits<double>::infinity()}),
                    ContainsSubstring("pass a finite number"));
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .version = -1}),
                    ContainsSubstring("expected version >= 0 (for version_N), found -1"));
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .version = std::string()}),
                    ContainsSubstring("expected a directory name as the string version"));
  CHECK_THROWS_WITH(TensorBoardLogger({.root_dir = root, .max_queue = 0}), ContainsSubstring("fabric: "));
  CHECK(fs::is_empty(root));
}

TEST_CASE("TensorBoardLogger: an unwritable directory is a fabric::Error, and no record is lost", "[tensorboard]") {
  TempDir tmp;
  std::ofstream(tmp / "a_file") << "x";

  SECTION("the log directory cannot be created") {
    TensorBoardLogger logger(at(tmp / "a_file" / "logs"));
    CHECK_THROWS_AS(logger.log_metrics({{"a", 1}}, 0), fabric::Error);
    CHECK_THROWS_WITH(logger.log_text("t", "x"), ContainsSubstring("expected a log directory it can create") &&
                                                     ContainsSubstring("check that root_dir is a writable directory"));
    CHECK(logger.event_file().empty());
  }
  SECTION("a failed flush keeps the records; the next save() writes them all, with the first record") {
    TensorBoardLogger logger({.root_dir = tmp.path(), .flush_secs = 600});
    logger.log_metrics({{"a", 1}}, 0);
    logger.save();
    const fs::path file = logger.event_file();
    const fs::path dir = file.parent_path();
    fs::remove_all(dir);
    std::ofstream(dir) << "in the way";
    logger.log_metrics({{"a", 2}}, 1);
    logger.log_text("t", "kept", 1);
    CHECK_THROWS_WITH(logger.save(), ContainsSubstring("TensorBoardLogger: expected to append") &&
                                         ContainsSubstring("the 2 records are kept"));
    CHECK_THROWS_AS(logger.finalize("failed"), fabric::Error);
    fs::remove(dir);
    logger.save();
    const auto events = rd::read_events(file);
    REQUIRE(events.size() == 3);
    CHECK(events[0].file_version == std::optional<std::string>("brain.Event:2"));
    CHECK(scalars(events, "a") == std::vector<std::pair<std::int64_t, float>>{{1, 2.f}});
    CHECK(values(events, "t").size() == 1);
  }
}

// ---- a sample for Python's TensorBoard ----------------------------------------------------------------

namespace {

// A JSON string literal.
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<int>(c));
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// A JSON number as Python's json module reads it (NaN and Infinity included), exact for a float.
std::string json_number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  return fmt::format("{}", v);
}

}  // namespace

TEST_CASE("TensorBoardLogger: a sample run for tests/python/read_tensorboard.py", "[.tensorboard-sample]") {
  const char* out = std::getenv("FABRIC_TB_SAMPLE_DIR");
  if (out == nullptr || *out == '\0') {
    SKIP(
        "set FABRIC_TB_SAMPLE_DIR to a directory to write the sample run into, then run "
        "python3 tests/python/read_tensorboard.py $FABRIC_TB_SAMPLE_DIR");
  }
  const fs::path root = out;
  fs::path log_dir;
  std::string expected;
  {
    TensorBoardLogger logger({.root_dir = root, .flush_secs = 1, .max_queue = 5});
    const fabric::Hyperparameters params = {{"lr", "0.001"}, {"batch_size", "32"},        {"optimizer", "adam"},
                                            {"amp", "true"}, {"note", "say \"hi\"\nbye"}, {"empty", ""},
                                            {"模型", "小"}};
    logger.log_hyperparams(params, {{"hp_metric", 0.5}}, 0);
    std::map<std::string, std::vector<std::pair<std::int64_t, double>>> logged;
    for (std::int64_t step = 0; step < 30; ++step) {
      fabric::Metrics m = {{"train/loss", 2.0 / static_cast<double>(step + 1)},
                           {"损失", 0.25 * static_cast<double>(step)}};
      if (step >= 10) m["val/acc"] = 0.5 + 0.01 * static_cast<double>(step);
      if (step == 20) m["train/loss"] = std::numeric_limits<double>::quiet_NaN();
      if (step == 21) m["train/loss"] = std::numeric_limits<double>::infinity();
      logger.log_metrics(m, step);
      for (const auto& [k, v] : m) logged[k].emplace_back(step, static_cast<double>(static_cast<float>(v)));
    }
    logged["hp_metric"].emplace_back(0, 0.5);
    const std::string text = "# fabric sample\nlr **0.001**, «unicode» 🚀";
    logger.log_text("command", text, 0);
    logger.finalize("success");
    log_dir = logger.log_dir();

    // What read_tensorboard.py --expected must find.
    expected = "{\n  \"scalars\": {";
    bool first = true;
    for (const auto& [tag, series] : logged) {
      expected += fmt::format("{}\n    {}: [", first ? "" : ",", json_string(tag));
      first = false;
      for (std::size_t i = 0; i < series.size(); ++i)
        expected += fmt::format("{}[{}, {}]", i ? ", " : "", series[i].first, json_number(series[i].second));
      expected += "]";
    }
    expected += "\n  },\n  \"text\": {" + json_string("command") + ": " + json_string(text) + "},\n";
    expected += "  \"hparams\": {";
    first = true;
    for (const auto& [k, v] : params) {
      const auto c = tb::classify_hparam(v);
      const std::string value = c.kind == tb::HparamValue::Kind::number    ? json_number(c.number)
                                : c.kind == tb::HparamValue::Kind::boolean ? (c.boolean ? "true" : "false")
                                                                           : json_string(v);
      expected += fmt::format("{}\n    {}: {}", first ? "" : ",", json_string(k), value);
      first = false;
    }
    expected += "\n  },\n  \"metrics\": [\"hp_metric\"]\n}\n";
  }
  std::ofstream(log_dir / "expected.json") << expected;
  const auto events = events_in(log_dir);
  CHECK(events.size() == 1 + 4 + 30 * 2 + 20 + 1);
  fmt::print("wrote {}; check it with:\n  python3 tests/python/read_tensorboard.py {} --expected {}\n",
             log_dir.string(), log_dir.string(), (log_dir / "expected.json").string());
}
