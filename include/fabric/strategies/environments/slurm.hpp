#pragma once
// fabric::SLURMEnvironment: tasks started by SLURM's srun, and SLURM's host lists. Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"

#include <fmt/format.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fabric {
namespace detail {

/// Expands a SLURM host list such as `node[001-004,007],gpu5` into host names, in order.
inline std::vector<std::string> expand_slurm_nodelist(std::string_view list) {
  std::vector<std::string> hosts;
  // Split on the commas and spaces outside brackets ("a, b" and "a b c" are lists too, as Lightning reads them).
  std::vector<std::string_view> items;
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || ((list[i] == ',' || list[i] == ' ') && depth == 0)) {
      if (i > start) items.push_back(list.substr(start, i - start));
      start = i + 1;
    } else if (list[i] == '[') {
      ++depth;
    } else if (list[i] == ']') {
      if (--depth < 0) raise("expected balanced brackets in the SLURM node list, found {:?}", list);
    }
  }
  if (depth != 0) raise("expected balanced brackets in the SLURM node list, found {:?}", list);
  for (auto item : items) {
    auto open = item.find('[');
    if (open == std::string_view::npos) {
      hosts.emplace_back(item);
      continue;
    }
    auto close = item.find(']', open);
    auto prefix = item.substr(0, open);
    auto ranges = item.substr(open + 1, close - open - 1);
    // The suffix may hold more bracket groups (`rack[1-2]-n[1-2]`): expand it recursively.
    auto suffixes =
        close + 1 < item.size() ? expand_slurm_nodelist(item.substr(close + 1)) : std::vector<std::string>{""};
    std::size_t from = 0;
    while (from <= ranges.size()) {
      auto comma = ranges.find(',', from);
      if (comma == std::string_view::npos) comma = ranges.size();
      auto range = ranges.substr(from, comma - from);
      from = comma + 1;
      while (!range.empty() && range.front() == ' ') range.remove_prefix(1);
      while (!range.empty() && range.back() == ' ') range.remove_suffix(1);
      auto dash = range.find('-');
      auto low_text = range.substr(0, dash);
      auto high_text = dash == std::string_view::npos ? low_text : range.substr(dash + 1);
      auto low = parse_integer(low_text);
      auto high = parse_integer(high_text);
      if (!low || !high || *low > *high || *low < 0) {
        raise("expected ranges like 001-004 in the SLURM node list, found {:?} in {:?}", range, list);
      }
      for (long long n = *low; n <= *high; ++n) {
        // Zero padding follows the width of the lower bound, as SLURM writes it.
        auto number = fmt::format("{:0{}}", n, low_text.size());
        for (const auto& suffix : suffixes) hosts.push_back(fmt::format("{}{}{}", prefix, number, suffix));
      }
    }
  }
  return hosts;
}

/// Returns the first host of a SLURM host list (the main node), or nothing for an empty list.
inline std::optional<std::string> first_slurm_host(std::string_view list) {
  auto hosts = expand_slurm_nodelist(list);
  if (hosts.empty()) return std::nullopt;
  return hosts.front();
}

}  // namespace detail

/// The environment of srun (Lightning's SLURMEnvironment): detected by SLURM_NTASKS unless the job is
/// an interactive shell (SLURM_JOB_NAME bash or interactive); reads SLURM_NTASKS, SLURM_PROCID,
/// SLURM_LOCALID, SLURM_NODEID, checks SLURM_NTASKS_PER_NODE and SLURM_NNODES against the options;
/// the main node is the first host of SLURM_NODELIST (unless MASTER_ADDR is set) and the port comes
/// from the job id (the last four digits + 15000, unless MASTER_PORT is set).
struct SLURMEnvironment {
  static constexpr std::string_view name = "slurm";

  /// Returns true when srun started this process as a task of a batch job.
  static bool detect(const EnvLookup& env) {
    if (!env("SLURM_NTASKS")) return false;
    auto job_name = env("SLURM_JOB_NAME");
    return !(job_name && (*job_name == "bash" || *job_name == "interactive"));
  }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int devices, int num_nodes) const {
    Topology e;
    e.name = name;
    e.creates_processes_externally = true;
    e.world_size = detail::env_required_int(env, "SLURM_NTASKS", "srun");
    e.global_rank = detail::env_required_int(env, "SLURM_PROCID", "srun");
    e.local_rank = detail::env_required_int(env, "SLURM_LOCALID", "srun");
    e.node_rank = detail::env_required_int(env, "SLURM_NODEID", "srun");
    if (auto per_node = detail::env_int(env, "SLURM_NTASKS_PER_NODE"); per_node && *per_node != devices) {
      detail::raise(
          "expected SLURM_NTASKS_PER_NODE to equal devices = {}, found {}; set `#SBATCH --ntasks-per-node={}` or "
          "Options{{.devices = {}}}",
          devices, *per_node, devices, *per_node);
    }
    if (auto nodes = detail::env_int(env, "SLURM_NNODES"); nodes && *nodes != num_nodes) {
      detail::raise(
          "expected SLURM_NNODES to equal num_nodes = {}, found {}; set `#SBATCH --nodes={}` or "
          "Options{{.num_nodes = {}}}",
          num_nodes, *nodes, num_nodes, *nodes);
    }
    if (auto address = env("MASTER_ADDR")) {
      e.main_address = *address;
    } else {
      auto list = env("SLURM_NODELIST");
      if (!list) list = env("SLURM_JOB_NODELIST");
      std::optional<std::string> host = list ? detail::first_slurm_host(*list) : std::nullopt;
      if (!host && num_nodes > 1) detail::require_main_address(env, e.name, num_nodes);
      e.main_address = host.value_or("127.0.0.1");
    }
    if (auto port = detail::env_port(env, "MASTER_PORT")) {
      e.main_port = *port;
    } else if (auto job_id = env("SLURM_JOB_ID")) {
      auto digits = std::string_view(*job_id);
      if (digits.size() > 4) digits = digits.substr(digits.size() - 4);
      auto last = detail::parse_integer(digits);
      if (!last || *last < 0) {
        detail::raise("expected SLURM_JOB_ID to be a number, found {:?}; set MASTER_PORT to choose the port yourself",
                      *job_id);
      }
      e.main_port = static_cast<int>(*last) + 15000;
    } else {
      e.main_port = 12910;
    }
    return e;
  }
};

}  // namespace fabric
