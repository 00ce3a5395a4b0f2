#pragma once
// fabric::ProcessGroup: the handle that Fabric::new_group returns and the collectives take as their
// `group` (torch.distributed's `new_group(ranks)` and `group=`); a default-constructed one is the world.

#include "fabric/core/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {
/// What a strategy keeps for a group it created (for c10d: the backend's group); defined by the strategy.
struct ProcessGroupImpl;
}  // namespace detail

/// A subset of the processes that collectives run over: `fabric.new_group({0, 1})` on every process,
/// then `fabric.all_reduce(x, group)`, `fabric.all_gather(x, group)`, `fabric.broadcast(x, src, group)`,
/// `fabric.barrier("name", group)` on its members. A default-constructed group is every process (the
/// world, Lightning's `group=None`). Copies share the connection.
///
///     auto pair = fabric.new_group({0, 1});   // every process calls it, in the same order
///     if (pair.is_member()) loss = fabric.all_reduce(loss, pair);
class ProcessGroup {
 public:
  /// The world: every process.
  ProcessGroup() = default;
  /// A group of the global ranks `ranks` in which this process is `rank` (-1: not a member); made by a
  /// strategy's new_group.
  ProcessGroup(std::vector<int> ranks, int rank, std::shared_ptr<detail::ProcessGroupImpl> impl = nullptr)
      : ranks_(std::move(ranks)), rank_(rank), impl_(std::move(impl)) {}

  /// Says whether this is the world (the default group).
  bool is_world() const noexcept { return ranks_.empty(); }
  /// Returns the global ranks of the members, in group-rank order (empty for the world).
  const std::vector<int>& ranks() const noexcept { return ranks_; }
  /// Returns the number of members (0 for the world: ask the Fabric's world_size()).
  int size() const noexcept { return static_cast<int>(ranks_.size()); }
  /// Returns this process's rank in the group, or -1 when it is not a member (the world: -1 too; ask
  /// the Fabric's global_rank()).
  int rank() const noexcept { return rank_; }
  /// Says whether this process belongs to the group (always, for the world).
  bool is_member() const noexcept { return is_world() || rank_ >= 0; }
  /// Says whether the global rank belongs to the group (every rank belongs to the world).
  bool contains(int global_rank) const noexcept {
    return is_world() || std::find(ranks_.begin(), ranks_.end(), global_rank) != ranks_.end();
  }
  /// Returns the group rank of a global rank of the group, or -1.
  int group_rank(int global_rank) const noexcept {
    const auto it = std::find(ranks_.begin(), ranks_.end(), global_rank);
    return it == ranks_.end() ? -1 : static_cast<int>(it - ranks_.begin());
  }
  /// Returns what the strategy keeps for the group (null for the world, for one process and for non-members).
  const std::shared_ptr<detail::ProcessGroupImpl>& impl() const noexcept { return impl_; }

 private:
  std::vector<int> ranks_{};
  int rank_ = -1;
  std::shared_ptr<detail::ProcessGroupImpl> impl_{};
};

namespace detail {

/// Sorts the ranks of a new group (as torch.distributed.new_group does) and checks them: not empty, each
/// a rank of the world, none twice.
inline void normalize_group_ranks(std::vector<int>& ranks, int world_size) {
  if (ranks.empty()) {
    raise("new_group: expected the global ranks of the group's members, found none; list them, e.g. {{0, 1}}");
  }
  std::sort(ranks.begin(), ranks.end());
  if (ranks.front() < 0 || ranks.back() >= world_size) {
    raise("new_group: expected ranks in [0, {}) (the world size is {}), found {}; list ranks of this job", world_size,
          world_size, fmt::join(ranks, ", "));
  }
  if (std::adjacent_find(ranks.begin(), ranks.end()) != ranks.end()) {
    raise("new_group: expected each rank once, found {}; list each member once", fmt::join(ranks, ", "));
  }
}

/// Fails when this process (global rank `rank`) is not a member of the group a collective runs over.
inline void check_member(const ProcessGroup& group, int rank, std::string_view what) {
  if (!group.is_member()) {
    raise(
        "{}: expected a member of the group of ranks [{}], found rank {}, which is not one; call collectives on a "
        "group only on its members (if (group.is_member()) ...)",
        what, fmt::join(group.ranks(), ", "), rank);
  }
}

}  // namespace detail
}  // namespace fabric
