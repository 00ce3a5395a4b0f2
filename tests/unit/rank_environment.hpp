#pragma once
// fabric_test::RankEnvironment: sets the launcher's rank variables for a scope (unset when not given),
// forgets the rank fabric::rank_zero_only_rank() knows, and restores both when it ends.
#include <fabric/core/rank_zero.hpp>

#include <stdlib.h>

#include <cstdlib>
#include <map>
#include <string>

namespace fabric_test {

/// The variables Lightning's rank_zero_only reads, in its order.
inline constexpr const char* rank_variables[] = {"RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"};

class RankEnvironment {
 public:
  using Vars = std::map<std::string, std::string>;

  explicit RankEnvironment(const Vars& values) {
    for (const char* name : rank_variables) {
      if (const char* v = std::getenv(name)) saved_[name] = v;
      ::unsetenv(name);
    }
    for (const auto& [name, value] : values) ::setenv(name.c_str(), value.c_str(), 1);
    fabric::detail::rank_zero_only_rank().store(-1);
  }
  RankEnvironment(const RankEnvironment&) = delete;
  RankEnvironment& operator=(const RankEnvironment&) = delete;
  ~RankEnvironment() {
    for (const char* name : rank_variables) ::unsetenv(name);
    for (const auto& [name, value] : saved_) ::setenv(name.c_str(), value.c_str(), 1);
    fabric::detail::rank_zero_only_rank().store(-1);
  }

 private:
  Vars saved_;
};

}  // namespace fabric_test
