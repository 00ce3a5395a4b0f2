#pragma once
// Seeding: fabric::seed_everything and the library's own random engine; the random states of a process
// (collect_rng_states, set_rng_states) and fabric::RngState, the state entry that saves them with a
// checkpoint.

#include "fabric/core/error.hpp"
#include "fabric/io/checkpoint_io.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

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

namespace detail {

inline at::Tensor generator_state(at::Generator generator) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

inline void set_generator_state(at::Generator generator, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

inline at::Generator cuda_generator(int index) {
  return at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
}

inline int cuda_devices() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

}  // namespace detail

/// Returns this process's random states, as Lightning's `_collect_rng_states`: torch's CPU generator
/// under "torch", every CUDA device's generator under "torch.cuda" (an empty list without CUDA; left
/// out with include_cuda = false) and fabric::random_engine() under "fabric" (where Lightning keeps
/// Python's `random`).
///
///     auto states = fabric::collect_rng_states();
///     // ... draw random numbers ...
///     fabric::set_rng_states(states);  // the same numbers again
inline StateDict collect_rng_states(bool include_cuda = true) {
  StateDict states = make_state_dict();
  states.insert("torch", detail::generator_state(at::detail::getDefaultCPUGenerator()));
  if (include_cuda) {
    c10::List<at::Tensor> cuda;
    for (int i = 0; i < detail::cuda_devices(); ++i) cuda.push_back(detail::generator_state(detail::cuda_generator(i)));
    states.insert("torch.cuda", cuda);
  }
  std::ostringstream engine;
  engine << random_engine();
  states.insert("fabric", engine.str());
  return states;
}

/// Restores random states taken by collect_rng_states, as Lightning's `_set_rng_states`: "torch" is
/// required, "torch.cuda" and "fabric" are restored when present (older states without them load).
/// Malformed states are a fabric::Error, and then no generator is changed.
inline void set_rng_states(const StateDict& states) {
  if (!states.contains("torch") || !states.at("torch").isTensor()) {
    detail::raise(
        "set_rng_states: expected torch's CPU generator state (a byte tensor) under \"torch\", found {}; pass a "
        "dictionary from fabric::collect_rng_states",
        states.contains("torch") ? states.at("torch").tagKind() : std::string("no such key"));
  }
  std::vector<at::Tensor> cuda;
  if (states.contains("torch.cuda")) {
    const c10::IValue& value = states.at("torch.cuda");
    if (!value.isList()) {
      detail::raise("set_rng_states: expected a list of CUDA generator states under \"torch.cuda\", found {}",
                    value.tagKind());
    }
    for (const c10::IValue& item : value.toListRef()) {
      if (!item.isTensor()) {
        detail::raise("set_rng_states: expected CUDA generator states (byte tensors) under \"torch.cuda\", found {}",
                      item.tagKind());
      }
      cuda.push_back(item.toTensor());
    }
    if (static_cast<int>(cuda.size()) > detail::cuda_devices()) {
      detail::raise(
          "set_rng_states: expected at most {} CUDA generator states (the CUDA devices of this process), found {}; "
          "restore them in a process that sees as many devices",
          detail::cuda_devices(), cuda.size());
    }
  }
  std::mt19937_64 engine;
  const bool has_engine = states.contains("fabric");
  if (has_engine) {
    const c10::IValue& value = states.at("fabric");
    std::istringstream in(value.isString() ? value.toStringRef() : std::string());
    in >> engine;
    if (!value.isString() || in.fail()) {
      detail::raise(
          "set_rng_states: expected the state of fabric::random_engine() (a string) under \"fabric\", found "
          "{}; pass a dictionary from fabric::collect_rng_states",
          value.isString() ? std::string("a malformed string") : value.tagKind());
    }
  }
  // NOTE: a generator rejects a malformed state only when it is set; the states taken first put back
  // what was set before, so a failure changes no generator.
  const StateDict before = collect_rng_states(!cuda.empty());
  try {
    detail::set_generator_state(at::detail::getDefaultCPUGenerator(), states.at("torch").toTensor());
    for (std::size_t i = 0; i < cuda.size(); ++i)
      detail::set_generator_state(detail::cuda_generator(static_cast<int>(i)), cuda[i]);
  } catch (const c10::Error& e) {
    detail::set_generator_state(at::detail::getDefaultCPUGenerator(), before.at("torch").toTensor());
    if (before.contains("torch.cuda")) {
      const auto list = before.at("torch.cuda").toTensorList();
      for (std::size_t i = 0; i < list.size(); ++i)
        detail::set_generator_state(detail::cuda_generator(static_cast<int>(i)), list.get(i));
    }
    detail::raise("set_rng_states: a generator state does not fit this LibTorch ({}); no generator was changed",
                  detail::first_line(e.what_without_backtrace()));
  }
  if (has_engine) random_engine() = engine;
}

/// A state entry for the random states of the process: `{"rng", fabric::RngState{}}` saves
/// collect_rng_states() with the checkpoint, and load restores them with set_rng_states(). Save it when
/// a resumed run must draw the same random numbers (dropout, augmentation) as an uninterrupted one.
/// Under several processes the file holds rank 0's states, as Lightning saves them.
///
///     fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"rng", fabric::RngState{}}});
///     fabric.load(path, {{"model", model}, {"optimizer", optimizer}, {"rng", fabric::RngState{}}});
class RngState {
 public:
  /// Says that the state is the process's, not the object's: a state entry may hold a temporary.
  static constexpr bool global_state = true;

  /// Takes the CUDA generators too unless include_cuda is false.
  explicit RngState(bool include_cuda = true) noexcept : include_cuda_(include_cuda) {}
  /// Returns the random states now (collect_rng_states).
  StateDict state_dict() const { return collect_rng_states(include_cuda_); }
  /// Restores the random states (set_rng_states).
  void load_state_dict(const StateDict& states) const { set_rng_states(states); }

 private:
  bool include_cuda_ = true;
};

}  // namespace fabric
