// Seeding: seed_everything, reset_seed, worker seeds and the random states of a process
// (collect_rng_states, set_rng_states), against Lightning's tests_fabric/utilities/test_seed.py.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdlib>
#include <set>
#include <string>
#include <vector>

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

// Lightning: tests_fabric/utilities/test_seed.py::test_default_seed
TEST_CASE("no seed and no PL_GLOBAL_SEED give 0", "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::seed_everything() == 0);
  CHECK(env("PL_GLOBAL_SEED") == "0");
}

// Lightning: tests_fabric/utilities/test_seed.py::test_seed_stays_same_with_multiple_seed_everything_calls
TEST_CASE("seed_everything() twice keeps the seed", "[seed][lightning]") {
  clear_seed_env();
  fabric::seed_everything();
  const auto initial = env("PL_GLOBAL_SEED");
  fabric::seed_everything();
  CHECK(env("PL_GLOBAL_SEED") == initial);
}

// Lightning: tests_fabric/utilities/test_seed.py::test_correct_seed_with_environment_variable
TEST_CASE("PL_GLOBAL_SEED is read", "[seed][lightning]") {
  clear_seed_env();
  ::setenv("PL_GLOBAL_SEED", "2020", 1);
  CHECK(fabric::seed_everything() == 2020);
  clear_seed_env();
}

// Lightning: tests_fabric/utilities/test_seed.py::test_invalid_seed
TEST_CASE("a malformed PL_GLOBAL_SEED is an error", "[seed][lightning]") {
  clear_seed_env();
  ::setenv("PL_GLOBAL_SEED", "invalid", 1);
  CHECK_THROWS_WITH(fabric::seed_everything(), ContainsSubstring("PL_GLOBAL_SEED") && ContainsSubstring("\"invalid\""));
  clear_seed_env();
}

// Lightning: tests_fabric/utilities/test_seed.py::test_out_of_bounds_seed
TEST_CASE("seeds past 2^32 - 1 are an error", "[seed][lightning]") {
  clear_seed_env();
  CHECK_THROWS_WITH(fabric::seed_everything(10'000'000'000ull),
                    ContainsSubstring("expected a seed in [0, 4294967295]"));
  // -10e9 cannot be passed as the unsigned seed; it reaches seed_everything through the environment.
  ::setenv("PL_GLOBAL_SEED", "-10000000000", 1);
  CHECK_THROWS_WITH(fabric::seed_everything(), ContainsSubstring("expected PL_GLOBAL_SEED in [0, 4294967295]"));
  clear_seed_env();
  CHECK(fabric::seed_everything(4294967295ull) == 4294967295ull);
}

// Lightning: tests_fabric/utilities/test_seed.py::test_seed_everything_accepts_valid_seed_argument
TEST_CASE("seed_everything returns the seed it is given", "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::seed_everything(45) == 45);
}

// Lightning: tests_fabric/utilities/test_seed.py::test_seed_everything_accepts_valid_seed_from_env
TEST_CASE("seed_everything returns the seed of PL_GLOBAL_SEED", "[seed][lightning]") {
  clear_seed_env();
  ::setenv("PL_GLOBAL_SEED", "17", 1);
  CHECK(fabric::seed_everything() == 17);
  clear_seed_env();
}

// Lightning left out: tests_fabric/utilities/test_seed.py::test_seed_everything_non_verbose_no_warning - fabric's seed_everything has no verbose flag and emits no "No seed found" warning (Python warnings machinery); the default seed is tested by test_default_seed
// Lightning left out: tests_fabric/utilities/test_seed.py::test_reset_seed_non_verbose - it counts Python logging records of the "Seed set to" message, which fabric's seed_everything does not log

TEST_CASE("the free seed_everything defaults workers to false, as Lightning's", "[seed]") {
  clear_seed_env();
  fabric::seed_everything(1);
  CHECK(env("PL_SEED_WORKERS") == "0");
  fabric::seed_everything(1, /*workers=*/true);
  CHECK(env("PL_SEED_WORKERS") == "1");
}

// Lightning: tests_fabric/test_fabric.py::test_seed_everything
TEST_CASE("Fabric::seed_everything is static and defaults workers to true", "[seed][lightning]") {
  clear_seed_env();
  CHECK(fabric::Fabric<fabric::CPU>::seed_everything(3) == 3);
  CHECK(env("PL_GLOBAL_SEED") == "3");
  CHECK(env("PL_SEED_WORKERS") == "1");
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(4, /*workers=*/false);
  CHECK(env("PL_SEED_WORKERS") == "0");
}

// Lightning: tests_fabric/utilities/test_seed.py::test_reset_seed_no_op
TEST_CASE("reset_seed does nothing before seed_everything", "[seed][lightning]") {
  clear_seed_env();
  torch::manual_seed(99);
  const auto before = torch::rand({1});
  torch::manual_seed(99);
  fabric::reset_seed();
  CHECK(torch::equal(before, torch::rand({1})));
  CHECK(env("PL_GLOBAL_SEED") == "<unset>");
}

// Lightning: tests_fabric/utilities/test_seed.py::test_reset_seed_everything
TEST_CASE("reset_seed restores the seed and the workers flag", "[seed][lightning]") {
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

// Lightning: tests_fabric/utilities/test_seed.py::test_pl_worker_init_function
TEST_CASE("worker seeds differ per worker and rank, and so do the numbers drawn from them", "[seed][lightning]") {
  for (const std::uint64_t base : {100ull, 1024ull, 4294967295ull}) {
    std::set<std::uint64_t> seeds;
    std::set<std::vector<std::int64_t>> draws;
    for (std::size_t worker = 0; worker < 64; ++worker) {
      for (int rank = 0; rank < 64; ++rank) {
        fabric::seed_everything(base);
        const auto seed = fabric::worker_seed(worker, rank);
        seeds.insert(seed);
        auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
        const auto t = torch::randint(0, 1'000'000, {8}, generator, torch::kLong);
        draws.insert(std::vector<std::int64_t>(t.data_ptr<std::int64_t>(), t.data_ptr<std::int64_t>() + 8));
      }
    }
    CHECK(seeds.size() == 64 * 64);
    CHECK(draws.size() == 64 * 64);
  }
  clear_seed_env();
}

// Lightning: tests_fabric/utilities/test_seed.py::test_generate_seed_sequence_no_collision
TEST_CASE("worker seeds differ across base seeds", "[seed][lightning]") {
  std::set<std::uint64_t> seeds;
  std::set<std::vector<float>> outputs;
  for (const std::uint64_t base : {0ull, 1ull, 42ull, 123ull, 999ull, 12345ull}) {
    fabric::seed_everything(base);
    const auto seed = fabric::worker_seed(0, 0);
    seeds.insert(seed);
    torch::manual_seed(seed);
    const auto t = torch::randn({10});
    outputs.insert(std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + 10));
  }
  CHECK(seeds.size() == 6);
  CHECK(outputs.size() == 6);
  clear_seed_env();
}

// ---- random states -----------------------------------------------------------------------------

TEST_CASE("collect_rng_states and set_rng_states give the same random numbers again", "[seed][rng]") {
  fabric::seed_everything(5);
  (void)torch::rand({2});
  const auto states = fabric::collect_rng_states();
  CHECK(states.contains("torch"));
  CHECK(states.contains("torch.cuda"));
  CHECK(states.contains("fabric"));
  const auto torch_next = torch::rand({4});
  const auto engine_next = fabric::random_engine()();
  (void)torch::rand({100});
  fabric::set_rng_states(states);
  CHECK(torch::equal(torch::rand({4}), torch_next));
  CHECK(fabric::random_engine()() == engine_next);
  CHECK_FALSE(fabric::collect_rng_states(/*include_cuda=*/false).contains("torch.cuda"));
  clear_seed_env();
}

// Lightning: tests_fabric/utilities/test_seed.py::test_backward_compatibility_rng_states_dict
TEST_CASE("states without \"torch.cuda\" (or \"fabric\") restore what they hold", "[seed][rng][lightning]") {
  auto states = fabric::collect_rng_states();
  CHECK(states.contains("torch.cuda"));
  states.erase("torch.cuda");
  const auto next = torch::rand({3});
  fabric::set_rng_states(states);
  CHECK(torch::equal(torch::rand({3}), next));
  states.erase("fabric");
  fabric::set_rng_states(states);
  CHECK(torch::equal(torch::rand({3}), next));
}

// Lightning: tests_fabric/utilities/test_seed.py::test_collect_rng_states_if_cuda_init_fails
TEST_CASE("without CUDA the CUDA states are an empty list, and no CUDA call is made", "[seed][rng][lightning]") {
  if (torch::cuda::is_available()) SKIP("CUDA is available here");
  const auto states = fabric::collect_rng_states();
  CHECK(states.at("torch.cuda").isList());
  CHECK(states.at("torch.cuda").toListRef().empty());
}

TEST_CASE("malformed random states are an error and change no generator", "[seed][rng]") {
  const auto good = fabric::collect_rng_states();
  const auto next = torch::rand({3});
  fabric::set_rng_states(good);

  auto missing = fabric::collect_rng_states();
  missing.erase("torch");
  CHECK_THROWS_WITH(fabric::set_rng_states(missing), ContainsSubstring("under \"torch\""));

  auto bad_tensor = fabric::collect_rng_states();
  bad_tensor.insert_or_assign("torch", torch::zeros({3}, torch::kByte));
  CHECK_THROWS_WITH(fabric::set_rng_states(bad_tensor), ContainsSubstring("no generator was changed"));

  auto bad_engine = fabric::collect_rng_states();
  bad_engine.insert_or_assign("fabric", std::string("not an engine"));
  CHECK_THROWS_WITH(fabric::set_rng_states(bad_engine), ContainsSubstring("fabric::random_engine()"));

  auto cuda = fabric::collect_rng_states();
  if (!torch::cuda::is_available()) {
    cuda.insert_or_assign("torch.cuda", c10::List<at::Tensor>({torch::zeros({16}, torch::kByte)}));
    CHECK_THROWS_WITH(fabric::set_rng_states(cuda), ContainsSubstring("expected at most 0 CUDA generator states"));
  }
  CHECK(torch::equal(torch::rand({3}), next));
}
