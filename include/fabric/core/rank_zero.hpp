#ifndef FABRIC_CORE_RANK_ZERO_HPP
#define FABRIC_CORE_RANK_ZERO_HPP
// The process's global rank as the rank-zero-only parts see it: Lightning's `rank_zero_only.rank`. The
// loggers write on rank zero only and ProgressBar draws there; the strategies set it when they learn
// the ranks, and before that it comes from the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID,
// JSM_NAMESPACE_RANK, the first one set), as in Lightning.

#include "fabric/core/error.hpp"

#include <atomic>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <system_error>

namespace fabric {

namespace detail {

/// The rank named by the first of Lightning's rank variables that is set; nothing when none is.
inline std::optional<int> rank_from_environment() {
  for (const char* name : {"RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"}) {
    const char* value = std::getenv(name);
    if (value == nullptr) continue;
    const std::string_view text(value);
    int rank = -1;
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), rank);
    if (ec != std::errc{} || end != text.data() + text.size() || rank < 0) {
      raise("expected {} to be a rank (an integer >= 0), found \"{}\"; fix or unset the variable", name, text);
    }
    return rank;
  }
  return std::nullopt;
}

/// -1 until known.
inline std::atomic<int>& rank_zero_only_rank() noexcept {
  static std::atomic<int> rank{-1};
  return rank;
}

}  // namespace detail

/// Returns this process's global rank as the rank-zero-only parts see it: the rank the strategy set,
/// else the launcher's variables', else 0.
inline int rank_zero_only_rank() {
  auto& rank = detail::rank_zero_only_rank();
  if (const int known = rank.load(std::memory_order_relaxed); known >= 0) return known;
  const int found = detail::rank_from_environment().value_or(0);
  rank.store(found, std::memory_order_relaxed);
  return found;
}

/// Sets this process's global rank for the rank-zero-only parts (the strategies call it).
inline void set_rank_zero_only_rank(int rank) {
  if (rank < 0) detail::raise("set_rank_zero_only_rank: expected a rank >= 0, found {}", rank);
  detail::rank_zero_only_rank().store(rank, std::memory_order_relaxed);
}

/// Returns whether this process is global rank zero (the one that logs).
inline bool is_rank_zero() { return rank_zero_only_rank() == 0; }

}  // namespace fabric

#endif  // FABRIC_CORE_RANK_ZERO_HPP
