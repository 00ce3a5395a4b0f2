// fabric::rank_zero_only_rank (Lightning's rank_zero_only.rank): read from the launcher's variables,
// set by the strategies, and what the loggers and the progress bar do on the other ranks. Ports
// tests_fabric/utilities/test_rank_zero.py::test_rank_zero_known_environment_variables and
// ::test_rank_zero_priority.
#include <fabric/callbacks/progress.hpp>
#include <fabric/core/rank_zero.hpp>
#include <fabric/loggers/csv.hpp>

#include "unit/rank_environment.hpp"
#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

using Catch::Matchers::ContainsSubstring;

using fabric_test::rank_variables;
using fabric_test::RankEnvironment;
using Vars = RankEnvironment::Vars;

TEST_CASE("rank_zero_only_rank comes from the launcher's variables", "[rank_zero]") {
  SECTION("none set: rank zero") {
    RankEnvironment env(Vars{});
    CHECK(fabric::rank_zero_only_rank() == 0);
    CHECK(fabric::is_rank_zero());
  }
  SECTION("each known variable alone (test_rank_zero_known_environment_variables)") {
    for (const char* name : rank_variables) {
      RankEnvironment env(Vars{{name, "3"}});
      CHECK(fabric::rank_zero_only_rank() == 3);
      CHECK_FALSE(fabric::is_rank_zero());
    }
  }
  SECTION("RANK before LOCAL_RANK before SLURM_PROCID before JSM_NAMESPACE_RANK (test_rank_zero_priority)") {
    {
      RankEnvironment env(Vars{{"RANK", "0"}, {"LOCAL_RANK", "1"}, {"SLURM_PROCID", "2"}, {"JSM_NAMESPACE_RANK", "3"}});
      CHECK(fabric::rank_zero_only_rank() == 0);
    }
    {
      RankEnvironment env(Vars{{"LOCAL_RANK", "1"}, {"SLURM_PROCID", "2"}, {"JSM_NAMESPACE_RANK", "3"}});
      CHECK(fabric::rank_zero_only_rank() == 1);
    }
    {
      RankEnvironment env(Vars{{"SLURM_PROCID", "2"}, {"JSM_NAMESPACE_RANK", "3"}});
      CHECK(fabric::rank_zero_only_rank() == 2);
    }
  }
  SECTION("a rank the strategy sets wins over the variables") {
    RankEnvironment env(Vars{{"RANK", "2"}});
    fabric::set_rank_zero_only_rank(0);
    CHECK(fabric::is_rank_zero());
    fabric::set_rank_zero_only_rank(5);
    CHECK(fabric::rank_zero_only_rank() == 5);
    CHECK_THROWS_WITH(fabric::set_rank_zero_only_rank(-1), ContainsSubstring("expected a rank >= 0, found -1"));
  }
  SECTION("a variable that is not a rank is a clear error (Lightning's int() raises too)") {
    for (const char* bad : {"one", "", "-1", "2x", " 1"}) {
      RankEnvironment env(Vars{{"LOCAL_RANK", bad}});
      CHECK_THROWS_WITH(
          fabric::rank_zero_only_rank(),
          ContainsSubstring("expected LOCAL_RANK to be a rank (an integer >= 0), found \"" + std::string(bad) + "\"") &&
              ContainsSubstring("fix or unset the variable"));
    }
  }
}

TEST_CASE("on a rank other than zero the CSVLogger writes nothing", "[rank_zero][loggers]") {
  fabric_test::TempDir tmp;
  RankEnvironment env(Vars{{"RANK", "1"}});
  fabric::CSVLogger logger({.root_dir = tmp.path(), .flush_logs_every_n_steps = 1});
  logger.log_hyperparams({{"lr", "0.1"}});
  logger.log_metrics({{"loss", 0.5}}, 0);
  logger.save();
  logger.finalize("success");
  CHECK(std::filesystem::is_empty(tmp.path()));

  fabric::set_rank_zero_only_rank(0);  // the same logger on rank zero writes
  logger.log_metrics({{"loss", 0.25}}, 1);
  CHECK(std::filesystem::exists(logger.metrics_file()));
}

TEST_CASE("a ProgressBar made on a rank other than zero shows nothing", "[rank_zero][callbacks]") {
  RankEnvironment env(Vars{{"RANK", "2"}});
  std::FILE* file = std::tmpfile();
  REQUIRE(file != nullptr);
  {
    fabric::ProgressBar bar({.stream = file, .mode = fabric::ProgressBar::Mode::lines, .line_interval = {}});
    bar.on_train_epoch_start(0, 2);
    bar.on_train_batch_end(0);
    bar.on_train_batch_end(1);
    bar.on_train_epoch_end();
  }
  CHECK(std::ftell(file) == 0);
  std::fclose(file);
}
