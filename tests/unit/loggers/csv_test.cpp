// CSVLogger: Lightning's layout (root_dir/name/version_N/metrics.csv), version numbering, header and
// rows read back from the file, flush cadence, new columns mid-run, prefix, step counting, quoting,
// Python-repr floats, and fabric.log / log_dict reaching the file.

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <stdlib.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using fabric::CSVLogger;

// A fresh directory per test, removed after.
struct TempDir : fabric_test::TempDir {
  TempDir() : fabric_test::TempDir("fabric-csv") {}
};

// The lines of a text file (without line terminators); empty when the file does not exist.
std::vector<std::string> lines_of(const fs::path& path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
  }
  return lines;
}

std::shared_ptr<CSVLogger> make_logger(const fs::path& root, int flush_every = 100) {
  return std::make_shared<CSVLogger>(CSVLogger::Options{.root_dir = root, .flush_logs_every_n_steps = flush_every});
}

}  // namespace

// Lightning: tests_fabric/loggers/test_csv.py::test_automatic_versioning
// Lightning: tests_fabric/loggers/test_csv.py::test_named_version
// Lightning: tests_fabric/loggers/test_csv.py::test_no_name
// Lightning: tests_fabric/loggers/test_csv.py::test_manual_versioning_file_exists
TEST_CASE("CSVLogger: Lightning's directory layout and version numbering", "[loggers]") {
  TempDir tmp;
  const fs::path root = tmp.path();

  SECTION("defaults: lightning_logs/version_0, nothing written before the first log") {
    CSVLogger logger({.root_dir = root});
    CHECK(logger.name() == "lightning_logs");
    CHECK(logger.version() == "0");
    CHECK(logger.root_dir() == root);
    CHECK(logger.log_dir() == root / "lightning_logs" / "version_0");
    CHECK(logger.metrics_file() == root / "lightning_logs" / "version_0" / "metrics.csv");
    CHECK_FALSE(fs::exists(root / "lightning_logs"));
    logger.log_metrics({{"loss", 1.0}}, 0);
    logger.finalize("success");
    CHECK(fs::is_regular_file(root / "lightning_logs" / "version_0" / "metrics.csv"));
  }

  SECTION("the next version is one past the highest existing version_N directory") {
    {
      CSVLogger first({.root_dir = root});
      first.log_metrics({{"loss", 1.0}}, 0);
    }
    CSVLogger second({.root_dir = root});
    CHECK(second.version() == "1");
    CHECK(second.log_dir() == root / "lightning_logs" / "version_1");

    fs::create_directories(root / "lightning_logs" / "version_7");
    fs::create_directories(root / "lightning_logs" / "version_x");      // not a number: ignored
    fs::create_directories(root / "lightning_logs" / "version_12abc");  // not a number: ignored
    fs::create_directories(root / "lightning_logs" / "other");
    std::ofstream(root / "lightning_logs" / "version_20") << "a file, not a directory\n";
    CSVLogger third({.root_dir = root});
    CHECK(third.version() == "8");
  }

  SECTION("loggers created before either logs take different versions (resolved on first use)") {
    CSVLogger a({.root_dir = root});
    CSVLogger b({.root_dir = root});
    a.log_metrics({{"x", 1.0}}, 0);
    b.log_metrics({{"y", 2.0}}, 0);
    a.save();
    b.save();
    CHECK(a.log_dir() != b.log_dir());
    CHECK(lines_of(a.metrics_file()) == std::vector<std::string>{"step,x", "0,1.0"});
    CHECK(lines_of(b.metrics_file()) == std::vector<std::string>{"step,y", "0,2.0"});
  }

  SECTION("explicit integer and string versions, custom name") {
    CSVLogger by_int({.root_dir = root, .name = "mnist", .version = 3});
    CHECK(by_int.version() == "3");
    CHECK(by_int.name() == "mnist");
    CHECK(by_int.log_dir() == root / "mnist" / "version_3");
    CSVLogger by_string({.root_dir = root, .name = "mnist", .version = std::string("baseline")});
    CHECK(by_string.version() == "baseline");
    CHECK(by_string.log_dir() == root / "mnist" / "baseline");
    by_int.log_metrics({{"a", 1.0}}, 0);
    by_string.log_metrics({{"b", 2.0}}, 0);
    by_int.finalize("success");
    by_string.finalize("success");
    CHECK(lines_of(root / "mnist" / "version_3" / "metrics.csv") == std::vector<std::string>{"a,step", "1.0,0"});
    CHECK(lines_of(root / "mnist" / "baseline" / "metrics.csv") == std::vector<std::string>{"b,step", "2.0,0"});
    // A string version does not count as version_N for the next free number.
    CSVLogger next({.root_dir = root, .name = "mnist"});
    CHECK(next.version() == "4");
  }

  SECTION("an empty name puts the versions directly under root_dir") {
    CSVLogger logger({.root_dir = root, .name = ""});
    CHECK(logger.log_dir() == root / "version_0");
    logger.log_metrics({{"a", 1.0}}, 0);
    logger.finalize("success");
    CHECK(fs::is_regular_file(root / "version_0" / "metrics.csv"));
  }

  SECTION("reusing an existing version starts a fresh metrics file (Lightning replaces it)") {
    {
      CSVLogger old({.root_dir = root, .version = 0});
      old.log_metrics({{"old_metric", 1.0}}, 0);
      old.log_metrics({{"old_metric", 2.0}}, 1);
    }
    CSVLogger again({.root_dir = root, .version = 0});
    again.log_metrics({{"new_metric", 5.0}}, 0);
    again.finalize("success");
    CHECK(lines_of(again.metrics_file()) == std::vector<std::string>{"new_metric,step", "5.0,0"});
  }
}

// Lightning: tests_fabric/loggers/test_csv.py::test_log_metrics_column_order_sorted
TEST_CASE("CSVLogger: header and rows", "[loggers]") {
  TempDir tmp;
  auto logger = make_logger(tmp.path());

  SECTION("columns sorted by name with step among them") {
    logger->log_metrics({{"loss", 0.5}, {"acc", 1.0}}, 0);
    logger->log_metrics({{"loss", 0.25}, {"acc", 0.75}}, 1);
    logger->log_metrics({{"zeta", 3.0}, {"alpha", -1.5}}, 2);
    logger->finalize("success");
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{
                                                  "acc,alpha,loss,step,zeta",
                                                  "1.0,,0.5,0,",
                                                  "0.75,,0.25,1,",
                                                  ",-1.5,,2,3.0",
                                              });
  }

  SECTION("floats are written like Python's repr") {
    logger->log_metrics({{"a", 1.0},
                         {"b", 1e-5},
                         {"c", 1e16},
                         {"d", 0.1 + 0.2},
                         {"e", 3.0},
                         {"f", std::nan("")},
                         {"g", -std::numeric_limits<double>::infinity()},
                         {"h", 1e15},
                         {"i", -0.0},
                         {"j", 12345.678}},
                        0);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"a,b,c,d,e,f,g,h,i,j,step",
                                   "1.0,1e-05,1e+16,0.30000000000000004,3.0,nan,-inf,1000000000000000.0,-0.0,"
                                   "12345.678,0"});
  }

  SECTION("an empty metrics dictionary still records the step") {
    logger->log_metrics({{"a", 1.0}}, 0);
    logger->log_metrics({}, 1);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,step", "1.0,0", ",1"});
  }

  SECTION("names with a comma or a quote are quoted like Python's csv; spaces are not") {
    logger->log_metrics({{"a,b", 1.0}, {"say \"hi\"", 2.0}, {"plain name", 3.0}}, 0);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"\"a,b\",plain name,\"say \"\"hi\"\"\",step", "1.0,3.0,2.0,0"});
  }

  SECTION("Unicode names are written as UTF-8, ordered by code point as Python's sorted() orders them") {
    logger->log_metrics({{"验证/损失", 0.5}, {"ñ", 1.0}, {"z", 2.0}, {"a", 3.0}}, 0);
    logger->log_metrics({{"λ", 4.0}}, 1);  // a new column mid-run, between ñ and 验
    logger->finalize("success");
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"a,step,z,ñ,λ,验证/损失", "3.0,0,2.0,1.0,,0.5", ",1,,,4.0,"});
  }
}

// Lightning: tests_fabric/loggers/test_csv.py::test_flush_n_steps
// Lightning: tests_fabric/loggers/test_csv.py::test_metrics_reset_after_save
// Lightning: tests_fabric/loggers/test_csv.py::test_append_metrics_file
TEST_CASE("CSVLogger: flush cadence", "[loggers]") {
  TempDir tmp;

  SECTION("rows reach the file every flush_logs_every_n_steps steps") {
    auto logger = make_logger(tmp.path(), 3);
    logger->log_metrics({{"loss", 0.0}}, 0);
    logger->log_metrics({{"loss", 1.0}}, 1);
    CHECK_FALSE(fs::exists(logger->metrics_file()));
    logger->log_metrics({{"loss", 2.0}}, 2);  // (2 + 1) % 3 == 0
    CHECK(lines_of(logger->metrics_file()).size() == 4);
    logger->log_metrics({{"loss", 3.0}}, 3);
    logger->log_metrics({{"loss", 4.0}}, 4);
    CHECK(lines_of(logger->metrics_file()).size() == 4);
    logger->log_metrics({{"loss", 5.0}}, 5);
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"loss,step", "0.0,0", "1.0,1", "2.0,2", "3.0,3", "4.0,4", "5.0,5"});
  }

  SECTION("the default flushes every 100 steps") {
    auto logger = make_logger(tmp.path());
    for (int step = 0; step < 99; ++step) logger->log_metrics({{"loss", 1.0}}, step);
    CHECK_FALSE(fs::exists(logger->metrics_file()));
    logger->log_metrics({{"loss", 1.0}}, 99);
    CHECK(lines_of(logger->metrics_file()).size() == 101);
  }

  SECTION("save(), finalize() and destruction write what is buffered") {
    fs::path file;
    {
      auto logger = make_logger(tmp.path());
      file = logger->metrics_file();
      logger->log_metrics({{"loss", 1.0}}, 0);
      logger->save();
      CHECK(lines_of(file) == std::vector<std::string>{"loss,step", "1.0,0"});
      logger->save();  // nothing new: unchanged
      CHECK(lines_of(file).size() == 2);
      logger->log_metrics({{"loss", 2.0}}, 1);
      logger->finalize("success");
      CHECK(lines_of(file).size() == 3);
      logger->log_metrics({{"loss", 3.0}}, 2);
      CHECK(lines_of(file).size() == 3);
    }
    CHECK(lines_of(file) == std::vector<std::string>{"loss,step", "1.0,0", "2.0,1", "3.0,2"});
  }
}

// Lightning: tests_fabric/loggers/test_csv.py::test_append_columns
// Lightning: tests_fabric/loggers/test_csv.py::test_rewrite_with_new_header
TEST_CASE("CSVLogger: a metric first seen mid-run widens the header", "[loggers]") {
  TempDir tmp;

  SECTION("the file is rewritten and old rows get empty cells") {
    auto logger = make_logger(tmp.path(), 1);
    logger->log_metrics({{"a", 1.0}}, 0);
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,step", "1.0,0"});
    logger->log_metrics({{"a", 2.0}, {"b", 3.0}}, 1);
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,b,step", "1.0,,0", "2.0,3.0,1"});
    logger->log_metrics({{"c", 4.0}}, 2);
    logger->log_metrics({{"a", 5.0}}, 3);
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"a,b,c,step", "1.0,,,0", "2.0,3.0,,1", ",,4.0,2", "5.0,,,3"});
    CHECK_FALSE(fs::exists(logger->metrics_file().string() + ".tmp"));
  }

  SECTION("quoted column names survive the rewrite") {
    auto logger = make_logger(tmp.path(), 1);
    logger->log_metrics({{"x,y", 1.0}}, 0);
    logger->log_metrics({{"x,y", 2.0}, {"a", 3.0}}, 1);
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,step,\"x,y\"", ",0,1.0", "3.0,1,2.0"});
  }

  SECTION("a quoted name with a line break survives the rewrite") {
    auto logger = make_logger(tmp.path(), 1);
    logger->log_metrics({{"two\nlines", 1.0}}, 0);
    logger->log_metrics({{"two\nlines", 2.0}, {"z", 3.0}}, 1);
    std::ifstream in(logger->metrics_file(), std::ios::binary);
    const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    CHECK(text == "step,\"two\nlines\",z\n0,1.0,\n1,2.0,3.0\n");
  }

  SECTION("new columns within one flush need no rewrite") {
    auto logger = make_logger(tmp.path(), 100);
    logger->log_metrics({{"a", 1.0}}, 0);
    logger->log_metrics({{"b", 2.0}}, 1);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,b,step", "1.0,,0", ",2.0,1"});
  }
}

// Lightning: tests_fabric/loggers/test_csv.py::test_automatic_step_tracking
TEST_CASE("CSVLogger: prefix and step counting", "[loggers]") {
  TempDir tmp;

  SECTION("prefix joins with '-'") {
    CSVLogger logger({.root_dir = tmp.path(), .prefix = "train"});
    logger.log_metrics({{"loss", 1.0}, {"acc", 0.5}}, 0);
    logger.save();
    CHECK(lines_of(logger.metrics_file()) == std::vector<std::string>{"step,train-acc,train-loss", "0,0.5,1.0"});
  }

  SECTION("without a step the logger counts the rows it logged, across flushes") {
    auto logger = make_logger(tmp.path(), 2);
    logger->log_metrics({{"a", 1.0}}, std::nullopt);
    logger->log_metrics({{"a", 2.0}}, std::nullopt);  // step 1: flush
    CHECK(lines_of(logger->metrics_file()).size() == 3);
    logger->log_metrics({{"a", 3.0}}, std::nullopt);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,step", "1.0,0", "2.0,1", "3.0,2"});
  }

  SECTION("explicit steps are written as given") {
    auto logger = make_logger(tmp.path());
    logger->log_metrics({{"a", 1.0}}, 10);
    logger->log_metrics({{"a", 2.0}}, 10);
    logger->log_metrics({{"a", 3.0}}, 1234567890123);
    logger->save();
    CHECK(lines_of(logger->metrics_file()) ==
          std::vector<std::string>{"a,step", "1.0,10", "2.0,10", "3.0,1234567890123"});
  }
}

TEST_CASE("CSVLogger: invalid options and metric names", "[loggers]") {
  TempDir tmp;

  SECTION("flush_logs_every_n_steps must be positive") {
    CHECK_THROWS_AS(CSVLogger({.root_dir = tmp.path(), .flush_logs_every_n_steps = 0}), fabric::Error);
    CHECK_THROWS_WITH(
        CSVLogger({.root_dir = tmp.path(), .flush_logs_every_n_steps = -5}),
        ContainsSubstring("flush_logs_every_n_steps") && ContainsSubstring("-5") && ContainsSubstring("fabric: "));
  }

  SECTION("a metric named \"step\" is rejected and nothing of that call is logged") {
    auto logger = make_logger(tmp.path());
    logger->log_metrics({{"a", 1.0}}, 0);
    CHECK_THROWS_AS(logger->log_metrics({{"b", 1.0}, {"step", 3.0}}, 1), fabric::Error);
    CHECK_THROWS_WITH(logger->log_metrics({{"step", 3.0}}, 1), ContainsSubstring("\"step\""));
    logger->save();
    CHECK(lines_of(logger->metrics_file()) == std::vector<std::string>{"a,step", "1.0,0"});
  }

  SECTION("with a prefix, \"step\" becomes an ordinary name") {
    CSVLogger logger({.root_dir = tmp.path(), .prefix = "val"});
    logger.log_metrics({{"step", 3.0}}, 0);
    logger.save();
    CHECK(lines_of(logger.metrics_file()) == std::vector<std::string>{"step,val-step", "0,3.0"});
  }

  SECTION("an unwritable root_dir is a fabric::Error, and the destructor does not throw") {
    const fs::path file = tmp.path() / "not-a-directory";
    std::ofstream(file) << "x";
    auto run = [&] {
      CSVLogger logger({.root_dir = file});
      logger.log_metrics({{"a", 1.0}}, 0);
      logger.finalize("success");
    };
    CHECK_THROWS_AS(run(), fabric::Error);
  }
}

// Lightning: tests_fabric/loggers/test_csv.py::test_log_hyperparams
TEST_CASE("CSVLogger: hyper-parameters go to hparams.yaml", "[loggers]") {
  // Lightning Fabric's CSVLogger raises NotImplementedError here; fabric's writes hparams.yaml, as the
  // CSVLogger of Lightning's Trainer does.
  TempDir tmp;
  CSVLogger logger({.root_dir = tmp.path()});
  logger.log_hyperparams({{"lr", "0.01"}, {"batch_size", "32"}});
  CHECK(lines_of(logger.log_dir() / "hparams.yaml") == std::vector<std::string>{"batch_size: 32", "lr: 0.01"});
}

TEST_CASE("hparams.yaml: plain where YAML reads the text back, quoted and escaped elsewhere", "[loggers][yaml]") {
  using fabric::detail::yaml_scalar;
  // Plain: numbers (as Lightning's files have them) and words that are no boolean or null.
  CHECK(yaml_scalar("0.01") == "0.01");
  CHECK(yaml_scalar("-3") == "-3");
  CHECK(yaml_scalar("1e-3") == "1e-3");
  CHECK(yaml_scalar("adamw") == "adamw");
  CHECK(yaml_scalar("data/train_v2.bin") == "data/train_v2.bin");
  // Quoted: what YAML would read as something else, or not read at all.
  CHECK(yaml_scalar("C:/data: #1") == R"("C:/data: #1")");
  CHECK(yaml_scalar("two\nlines") == R"("two\nlines")");
  CHECK(yaml_scalar("yes") == R"("yes")");
  CHECK(yaml_scalar("Null") == R"("Null")");
  CHECK(yaml_scalar("010") == R"("010")");
  CHECK(yaml_scalar("2026-12-01") == R"("2026-12-01")");
  CHECK(yaml_scalar("") == R"("")");
  CHECK(yaml_scalar("- item") == R"("- item")");
  CHECK(yaml_scalar("say \"hi\" \\ bye") == R"("say \"hi\" \\ bye")");
  CHECK(yaml_scalar("bell\a") == R"("bell\x07")");
  CHECK(yaml_scalar("größe λ") == R"("größe λ")");
  // Keys stay strings even when they look like numbers.
  CHECK(yaml_scalar("42", false) == R"("42")");
}

TEST_CASE("hparams.yaml with every awkward character loads in PyYAML as written", "[loggers][yaml]") {
  // NOTE: Debian's python3-yaml (a dependency of python3-torch, which the tests install).
  const char* python = "/usr/bin/python3";
  if (std::system(fmt::format("{} -c 'import yaml' 2>/dev/null", python).c_str()) != 0) {
    SKIP("no PyYAML for /usr/bin/python3 (Debian package python3-yaml)");
  }
  TempDir tmp;
  CSVLogger logger({.root_dir = tmp.path()});
  logger.log_hyperparams({{"path", "C:/data: #1"},
                          {"notes", "two\nlines\tand a tab"},
                          {"quote", "say \"hi\" \\ bye"},
                          {"flag", "yes"},
                          {"nothing", "~"},
                          {"lr", "0.01"},
                          {"steps", "1000"},
                          {"octal-looking", "010"},
                          {"date", "2026-12-01"},
                          {"empty", ""},
                          {"unicode λ", "größe"},
                          {"list", "[1, 2]"},
                          {"42", "key that looks like a number"}});
  const auto file = logger.log_dir() / "hparams.yaml";
  const auto out = tmp.path() / "loaded.txt";
  const std::string script =
      "import sys, yaml\n"
      "data = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\n"
      "with open(sys.argv[2], 'w', encoding='utf-8') as out:\n"
      "    for key in sorted(data, key=str): out.write(f'{key!r}={data[key]!r}\\n')\n";
  const auto script_file = tmp.path() / "load.py";
  std::ofstream(script_file) << script;
  REQUIRE(std::system(fmt::format("{} {} {} {}", python, script_file.string(), file.string(), out.string()).c_str()) ==
          0);
  CHECK(lines_of(out) ==
        std::vector<std::string>{"'42'='key that looks like a number'", "'date'='2026-12-01'", "'empty'=''",
                                 "'flag'='yes'", "'list'='[1, 2]'", "'lr'=0.01", "'notes'='two\\nlines\\tand a tab'",
                                 "'nothing'='~'", "'octal-looking'='010'", "'path'='C:/data: #1'",
                                 "'quote'='say \"hi\" \\\\ bye'", "'steps'=1000", "'unicode λ'='größe'"});
}

// Lightning: tests_fabric/test_fabric.py::test_log_dict_input_parsing
TEST_CASE("CSVLogger: fabric.log and log_dict reach the file", "[loggers]") {
  TempDir tmp;
  auto csv = make_logger(tmp.path());
  fabric::Fabric<fabric::CPU> fabric{{.loggers = {csv}}};
  REQUIRE(fabric.loggers().size() == 1);
  CHECK(fabric.logger() == csv.get());

  fabric.log("loss", 0.5, 0);
  fabric.log_dict({{"acc", 0.25}, {"loss", 0.125}}, 1);
  fabric.log("t", torch::tensor(2.5), 2);
  fabric.log("t", torch::ones({1, 1}, torch::kFloat64) * 4, 3);
  fabric.log("i", torch::tensor(7, torch::kInt64), 4);
  CHECK_THROWS_AS(fabric.log("bad", torch::ones({2})), fabric::Error);
  CHECK_THROWS_WITH(fabric.log("bad", torch::ones({2, 3})), ContainsSubstring("\"bad\"") && ContainsSubstring("6"));
  fabric.log("loss", 1.0);    // no step: the logger counts its rows (5 so far)
  fabric.log("epoch", 2, 6);  // an integer value
  csv->finalize("success");

  CHECK(lines_of(csv->metrics_file()) == std::vector<std::string>{
                                             "acc,epoch,i,loss,step,t",
                                             ",,,0.5,0,",
                                             "0.25,,,0.125,1,",
                                             ",,,,2,2.5",
                                             ",,,,3,4.0",
                                             ",,7.0,,4,",
                                             ",,,1.0,5,",
                                             ",2.0,,,6,",
                                         });
}

TEST_CASE("CSVLogger: a Fabric without loggers ignores log calls", "[loggers]") {
  fabric::Fabric<fabric::CPU> fabric;
  CHECK(fabric.logger() == nullptr);
  CHECK_NOTHROW(fabric.log("loss", 1.0));
  CHECK_NOTHROW(fabric.log_dict({{"a", 1.0}}, 3));
}

// Lightning: tests_fabric/loggers/test_csv.py::test_automatic_versioning_relative_root_dir
// Lightning: tests_fabric/loggers/test_csv.py::test_manual_versioning
TEST_CASE("CSVLogger: a relative root_dir numbers its versions; a version given is kept", "[loggers]") {
  TempDir tmp;
  fs::create_directories(tmp.path() / "exp" / "logs" / "version_0");
  fs::create_directories(tmp.path() / "exp" / "logs" / "version_1");
  fs::create_directories(tmp.path() / "exp" / "logs" / "version_2");
  const auto previous = fs::current_path();
  fs::current_path(tmp.path());
  std::string automatic, manual;
  try {
    automatic = CSVLogger({.root_dir = "exp", .name = "logs"}).version();
    manual = CSVLogger({.root_dir = "exp", .name = "logs", .version = 1}).version();
  } catch (...) {
    fs::current_path(previous);
    throw;
  }
  fs::current_path(previous);
  CHECK(automatic == "3");
  CHECK(manual == "1");
}

// Lightning: tests_fabric/loggers/test_csv.py::test_log_metrics
TEST_CASE("CSVLogger: one call of log_metrics is one row under a header naming every metric", "[loggers]") {
  TempDir tmp;
  for (const std::optional<std::int64_t> step : {std::optional<std::int64_t>(10), std::optional<std::int64_t>()}) {
    CSVLogger logger({.root_dir = tmp.path(), .version = step ? 10 : 11});
    // Lightning's metrics: a float, an int and two one-element tensors (fabric.log turns tensors into numbers).
    logger.log_metrics({{"float", 0.3},
                        {"int", 1},
                        {"FloatTensor", torch::tensor(0.1).item<double>()},
                        {"IntTensor", torch::tensor(1).item<double>()}},
                       step);
    logger.save();
    const auto lines = lines_of(logger.metrics_file());
    REQUIRE(lines.size() == 2);
    for (const char* name : {"float", "int", "FloatTensor", "IntTensor", "step"}) {
      CHECK_THAT(lines[0], ContainsSubstring(name));
    }
    CHECK_THAT(lines[1], ContainsSubstring(step ? ",10" : ",0"));
  }
}

namespace {

/// Records every log_metrics call (Lightning's tests use a Mock logger).
struct RecordingLogger : fabric::Logger {
  explicit RecordingLogger(std::string name) : name_(std::move(name)) {}
  std::string name() const override { return name_; }
  std::string version() const override { return "0"; }
  void log_metrics(const fabric::Metrics& metrics, std::optional<std::int64_t> step) override {
    calls.emplace_back(metrics, step);
  }
  void log_hyperparams(const fabric::Hyperparameters& /*params*/) override {}
  std::vector<std::pair<fabric::Metrics, std::optional<std::int64_t>>> calls;

 private:
  std::string name_;
};

using Call = std::pair<fabric::Metrics, std::optional<std::int64_t>>;

}  // namespace

// Lightning: tests_fabric/test_fabric.py::test_loggers_input
TEST_CASE("Fabric's loggers: none, one or several, in order", "[loggers]") {
  CHECK(fabric::Fabric<fabric::CPU>().loggers().empty());
  CHECK(fabric::Fabric<fabric::CPU>({.loggers = {}}).logger() == nullptr);
  auto logger0 = std::make_shared<RecordingLogger>("0");
  auto logger1 = std::make_shared<RecordingLogger>("1");
  fabric::Fabric<fabric::CPU> one({.loggers = {logger0}});
  REQUIRE(one.loggers().size() == 1);
  CHECK(one.loggers()[0] == logger0);
  CHECK(one.logger() == logger0.get());
  fabric::Fabric<fabric::CPU> two({.loggers = {logger0, logger1}});
  REQUIRE(two.loggers().size() == 2);
  CHECK(two.loggers()[0] == logger0);
  CHECK(two.loggers()[1] == logger1);
  CHECK(two.logger() == logger0.get());
}

// Lightning: tests_fabric/test_fabric.py::test_log
// Lightning: tests_fabric/test_fabric.py::test_log_dict
TEST_CASE("Fabric::log and log_dict send the metrics and the step to each logger", "[loggers]") {
  auto logger0 = std::make_shared<RecordingLogger>("0");
  auto logger1 = std::make_shared<RecordingLogger>("1");
  fabric::Fabric<fabric::CPU> fabric({.loggers = {logger0, logger1}});
  fabric.log("test", 1);
  fabric.log("test", 2, 15);
  fabric.log_dict({{"foo", 1}, {"bar", 2}});
  fabric.log_dict({{"foo", 3}, {"bar", 4}}, 15);
  const std::vector<Call> expected{{{{"test", 1.0}}, std::nullopt},
                                   {{{"test", 2.0}}, 15},
                                   {{{"foo", 1.0}, {"bar", 2.0}}, std::nullopt},
                                   {{{"foo", 3.0}, {"bar", 4.0}}, 15}};
  CHECK((logger0->calls == expected));
  CHECK((logger1->calls == expected));
}

// Lightning: tests_fabric/test_fabric.py::test_log_dict_input_parsing
TEST_CASE("Fabric::log and log_dict take one-element tensors and refuse others", "[loggers]") {
  auto logger = std::make_shared<RecordingLogger>("0");
  fabric::Fabric<fabric::CPU> fabric({.loggers = {logger}});
  fabric.log("log", torch::tensor(1));
  fabric.log_dict({{"log_dict", torch::tensor(1)}});
  fabric.log("log", torch::tensor({2}));
  fabric.log_dict({{"log_dict", torch::tensor({2})}, {"other", torch::tensor({0.5})}});
  const std::vector<Call> expected{{{{"log", 1.0}}, std::nullopt},
                                   {{{"log_dict", 1.0}}, std::nullopt},
                                   {{{"log", 2.0}}, std::nullopt},
                                   {{{"log_dict", 2.0}, {"other", 0.5}}, std::nullopt}};
  CHECK((logger->calls == expected));
  CHECK_THROWS_WITH(fabric.log("log", torch::tensor({3, 4})), ContainsSubstring("it cannot be converted to a scalar"));
  CHECK_THROWS_WITH(fabric.log_dict({{"log_dict", torch::tensor({3, 4})}}),
                    ContainsSubstring("log_dict: expected a tensor with one element for \"log_dict\", found 2 "
                                      "elements; it cannot be converted to a scalar"));
  CHECK(logger->calls.size() == 4);  // nothing logged by a refused call
}
