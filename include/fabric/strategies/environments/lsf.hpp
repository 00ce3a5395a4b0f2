#pragma once
// fabric::LSFEnvironment: processes started by IBM LSF's jsrun. Torch-free (fmt, std, POSIX gethostname).

#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace fabric {

/// The environment of jsrun under LSF (Lightning's LSFEnvironment): detected by LSB_JOBID,
/// LSB_DJOB_RANKFILE, JSM_NAMESPACE_LOCAL_RANK and JSM_NAMESPACE_SIZE; reads JSM_NAMESPACE_SIZE,
/// JSM_NAMESPACE_RANK and JSM_NAMESPACE_LOCAL_RANK. The hosts of the job are the lines of the rank
/// file LSB_DJOB_RANKFILE after the first (the launch node); the main node is the first of them, this
/// node's rank is the position of its host name among them, and the port is MASTER_PORT or
/// LSB_JOBID % 1000 + 10000.
struct LSFEnvironment {
  static constexpr std::string_view name = "lsf";

  /// This machine's host name as the rank file spells it; empty: gethostname().
  std::string hostname{};

  /// Returns true when jsrun started this process.
  static bool detect(const EnvLookup& env) {
    return env("LSB_JOBID") && env("LSB_DJOB_RANKFILE") && env("JSM_NAMESPACE_LOCAL_RANK") && env("JSM_NAMESPACE_SIZE");
  }

  /// Reads the compute hosts of the job from the rank file (its first line, the launch node, left out).
  static std::vector<std::string> read_hosts(const EnvLookup& env) {
    const auto file = env("LSB_DJOB_RANKFILE");
    if (!file || file->empty()) {
      detail::raise(
          "expected LSB_DJOB_RANKFILE to name LSF's rank file, found it {}; start the job with jsrun, or unset the "
          "LSB_* variables",
          file ? "empty" : "unset");
    }
    std::ifstream in(*file);
    if (!in) {
      detail::raise("expected to read LSF's rank file {} (LSB_DJOB_RANKFILE), found no readable file there", *file);
    }
    std::vector<std::string> hosts;
    for (std::string line; std::getline(in, line);) {
      const auto first = line.find_first_not_of(" \t\r");
      const auto last = line.find_last_not_of(" \t\r");
      hosts.push_back(first == std::string::npos ? std::string() : line.substr(first, last - first + 1));
    }
    if (hosts.size() < 2 || hosts[1].empty()) {
      detail::raise(
          "expected LSF's rank file {} to list the launch node and then the compute hosts, found {} line{}; check "
          "LSB_DJOB_RANKFILE",
          *file, hosts.size(), hosts.size() == 1 ? "" : "s");
    }
    hosts.erase(hosts.begin());
    return hosts;
  }

  /// Reads this process's place in the job.
  Topology topology(const EnvLookup& env, int /*devices*/, int /*num_nodes*/) const {
    Topology e;
    e.name = name;
    e.creates_processes_externally = true;
    e.world_size = detail::env_required_int(env, "JSM_NAMESPACE_SIZE", "jsrun");
    e.global_rank = detail::env_required_int(env, "JSM_NAMESPACE_RANK", "jsrun");
    e.local_rank = detail::env_required_int(env, "JSM_NAMESPACE_LOCAL_RANK", "jsrun");
    const auto hosts = read_hosts(env);
    e.main_address = hosts.front();
    const std::string host = hostname.empty() ? this_host() : hostname;
    std::vector<std::string> distinct;
    for (const auto& h : hosts) {
      if (std::find(distinct.begin(), distinct.end(), h) == distinct.end()) distinct.push_back(h);
    }
    const auto it = std::find(distinct.begin(), distinct.end(), host);
    if (it == distinct.end()) {
      detail::raise(
          "expected this host, {}, among the compute hosts of LSF's rank file {}, found only {}; run under jsrun "
          "on the job's hosts",
          host, *env("LSB_DJOB_RANKFILE"), fmt::format("{}", fmt::join(distinct, ", ")));
    }
    e.node_rank = static_cast<int>(it - distinct.begin());
    if (auto port = detail::env_port(env, "MASTER_PORT")) {
      e.main_port = *port;
    } else {
      const auto job = env("LSB_JOBID");
      if (!job) {
        detail::raise(
            "expected LSB_JOBID to be set by LSF, found it unset; set MASTER_PORT to choose the port "
            "yourself, or run under jsrun");
      }
      const auto id = detail::parse_integer(*job);
      if (!id || *id < 0) {
        detail::raise("expected LSB_JOBID to be a number, found {:?}; set MASTER_PORT to choose the port yourself",
                      *job);
      }
      e.main_port = static_cast<int>(*id % 1000) + 10000;
    }
    return e;
  }

 private:
  static std::string this_host() {
    char buffer[HOST_NAME_MAX + 1] = {};
    if (::gethostname(buffer, sizeof(buffer) - 1) != 0) {
      detail::raise("could not read this machine's host name for LSF; set LSFEnvironment::hostname");
    }
    return buffer;
  }
};

}  // namespace fabric
