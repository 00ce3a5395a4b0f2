// Seeding, against Lightning's tests/tests_fabric/utilities/test_seed.py (and test_fabric.py's
// test_seed_everything): the default seed, PL_GLOBAL_SEED, the bounds, PL_SEED_WORKERS and reset_seed.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdlib>
#include <string>

using Catch::Matchers::ContainsSubstring;

namespace {

/// Clears the variables seed_everything exports, as Lightning's `mock.patch.dict(os.environ, clear=True)`.
void clear_seed_env() {
  ::unsetenv("PL_GLOBAL_SEED");
  ::unsetenv("PL_SEED_WORKERS");
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "<unset>";
}

}  // namespace

TEST_CASE("test_default_seed: no seed and no PL_GLOBAL_SEED give 0", "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::seed_everything() == 0);
  CHECK(env("PL_GLOBAL_SEED") == "0");
}

TEST_CASE("test_seed_stays_same_with_multiple_seed_everything_calls", "[seed][lightning]") {
  clear_seed_env();
  fabric::seed_everything();
  const auto initial = env("PL_GLOBAL_SEED");
  fabric::seed_everything();
  CHECK(env("PL_GLOBAL_SEED") == initial);
}

TEST_CASE("test_correct_seed_with_environment_variable and test_seed_everything_accepts_valid_seed_from_env",
          "[seed][lightning]") {
  clear_seed_env();
  ::setenv("PL_GLOBAL_SEED", "2020", 1);
  CHECK(fabric::seed_everything() == 2020);
  ::setenv("PL_GLOBAL_SEED", "17", 1);
  CHECK(fabric::seed_everything() == 17);
  clear_seed_env();
}

TEST_CASE("test_invalid_seed: a malformed PL_GLOBAL_SEED is an error", "[seed][lightning]") {
  clear_seed_env();
  ::setenv("PL_GLOBAL_SEED", "invalid", 1);
  CHECK_THROWS_WITH(fabric::seed_everything(), ContainsSubstring("PL_GLOBAL_SEED") && ContainsSubstring("\"invalid\""));
  clear_seed_env();
}

TEST_CASE("test_out_of_bounds_seed: seeds past 2^32 - 1 are an error", "[seed][lightning]") {
  clear_seed_env();
  CHECK_THROWS_WITH(fabric::seed_everything(10'000'000'000ull),
                    ContainsSubstring("expected a seed in [0, 4294967295]"));
  ::setenv("PL_GLOBAL_SEED", "-10000000000", 1);
  CHECK_THROWS_WITH(fabric::seed_everything(), ContainsSubstring("expected PL_GLOBAL_SEED in [0, 4294967295]"));
  clear_seed_env();
  CHECK(fabric::seed_everything(4294967295ull) == 4294967295ull);
}

TEST_CASE("test_seed_everything_accepts_valid_seed_argument", "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::seed_everything(45) == 45);
}

TEST_CASE("seed.py's signature: the free seed_everything defaults workers to false", "[seed][lightning]") {
  clear_seed_env();
  fabric::seed_everything(1);
  CHECK(env("PL_SEED_WORKERS") == "0");
  fabric::seed_everything(1, /*workers=*/true);
  CHECK(env("PL_SEED_WORKERS") == "1");
}

TEST_CASE("test_fabric.py::test_seed_everything: Fabric::seed_everything defaults workers to true",
          "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::Fabric<fabric::CPU>::seed_everything(3) == 3);
  CHECK(env("PL_GLOBAL_SEED") == "3");
  CHECK(env("PL_SEED_WORKERS") == "1");
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(4, /*workers=*/false);
  CHECK(env("PL_SEED_WORKERS") == "0");
}

TEST_CASE("test_reset_seed_no_op: reset_seed does nothing before seed_everything", "[seed][lightning]") {
  clear_seed_env();
  torch::manual_seed(99);
  const auto before = torch::rand({1});
  torch::manual_seed(99);
  fabric::reset_seed();
  CHECK(torch::equal(before, torch::rand({1})));
  CHECK(env("PL_GLOBAL_SEED") == "<unset>");
}

TEST_CASE("test_reset_seed_everything: reset_seed restores the seed and the workers flag", "[seed][lightning]") {
  for (const bool workers : {true, false}) {
    clear_seed_env();
    fabric::seed_everything(123, workers);
    const auto before = torch::rand({1});
    const auto r1 = fabric::random_engine()();
    CHECK(env("PL_GLOBAL_SEED") == "123");
    CHECK(env("PL_SEED_WORKERS") == (workers ? "1" : "0"));
    fabric::reset_seed();
    CHECK(torch::equal(before, torch::rand({1})));
    CHECK(r1 == fabric::random_engine()());
    CHECK(env("PL_GLOBAL_SEED") == "123");
    CHECK(env("PL_SEED_WORKERS") == (workers ? "1" : "0"));
  }
  clear_seed_env();
}
