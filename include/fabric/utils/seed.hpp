#pragma once
// Seeding: fabric::seed_everything and the library's own random engine.

#include "fabric/core/error.hpp"

#include <ATen/Context.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace fabric {

/// Returns the library's own random engine (seeded by seed_everything), for user-side randomness
/// that must follow the global seed, e.g. random augmentations.
inline std::mt19937_64& random_engine() {
  static std::mt19937_64 engine{0};
  return engine;
}

namespace detail {

inline constexpr std::uint64_t max_seed = std::numeric_limits<std::uint32_t>::max();

/// Reads an integer environment variable; absent gives nothing, malformed throws.
inline std::optional<std::int64_t> env_int(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return std::nullopt;
  const std::string_view text(raw);
  std::int64_t value = 0;
  auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc{} || end != text.data() + text.size()) {
    raise("expected an integer in the environment variable {}, found \"{}\"; set it to a number or unset it", name,
          text);
  }
  return value;
}

inline void set_env(const char* name, const std::string& value) {
  if (::setenv(name, value.c_str(), 1) != 0) raise("could not set the environment variable {}", name);
}

}  // namespace detail

/// Seeds torch's CPU and CUDA generators and fabric::random_engine(), exports PL_GLOBAL_SEED and
/// PL_SEED_WORKERS (`"1"` or `"0"`) so relaunched processes and data-loader samplers see them, and
/// returns the seed. Without a seed, PL_GLOBAL_SEED is used, else 0. As Lightning's free function,
/// `workers` defaults to false here; `Fabric::seed_everything` defaults it to true.
///
///     fabric::seed_everything(42);
inline std::uint64_t seed_everything(std::optional<std::uint64_t> seed = std::nullopt, bool workers = false) {
  if (!seed) {
    const auto env = detail::env_int("PL_GLOBAL_SEED");
    if (env && (*env < 0 || static_cast<std::uint64_t>(*env) > detail::max_seed)) {
      detail::raise("expected PL_GLOBAL_SEED in [0, {}], found {}; set a seed in that range", detail::max_seed, *env);
    }
    seed = env ? static_cast<std::uint64_t>(*env) : 0;
  }
  if (*seed > detail::max_seed) {
    detail::raise("expected a seed in [0, {}], found {}; pass a 32-bit seed as Lightning does", detail::max_seed,
                  *seed);
  }
  detail::set_env("PL_GLOBAL_SEED", std::to_string(*seed));
  detail::set_env("PL_SEED_WORKERS", workers ? "1" : "0");
  at::manual_seed(*seed);
  random_engine().seed(*seed);
  return *seed;
}

/// Seeds again with the seed and `workers` flag seed_everything exported (PL_GLOBAL_SEED,
/// PL_SEED_WORKERS), as Lightning's `reset_seed`; does nothing when seed_everything was not called.
inline void reset_seed() {
  const auto seed = detail::env_int("PL_GLOBAL_SEED");
  if (!seed) return;
  const auto workers = detail::env_int("PL_SEED_WORKERS");
  seed_everything(static_cast<std::uint64_t>(*seed), workers.value_or(0) != 0);
}

/// Returns the seed exported by seed_everything (PL_GLOBAL_SEED), or 0 when none was set.
inline std::uint64_t global_seed() {
  const auto env = detail::env_int("PL_GLOBAL_SEED");
  return env && *env >= 0 ? static_cast<std::uint64_t>(*env) : 0;
}

/// Returns a deterministic seed for a data-loader worker, distinct per (global seed, worker, rank),
/// like Lightning's worker init function; seed a worker's own generator with it.
inline std::uint64_t worker_seed(std::size_t worker_id, int global_rank = 0) {
  const std::uint64_t base = global_seed();
  std::seed_seq sequence{static_cast<std::uint32_t>(base), static_cast<std::uint32_t>(base >> 32),
                         static_cast<std::uint32_t>(worker_id), static_cast<std::uint32_t>(global_rank)};
  std::uint32_t out[2];
  sequence.generate(out, out + 2);
  return (static_cast<std::uint64_t>(out[0]) << 32) | out[1];
}

}  // namespace fabric
