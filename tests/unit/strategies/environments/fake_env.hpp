#pragma once
// Fake process environments for the cluster-environment tests: a map of variables behind an EnvLookup.
// Torch-free.

#include <fabric/strategies/environments/environment.hpp>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>

namespace fabric_test {

using Vars = std::map<std::string, std::string, std::less<>>;

/// An EnvLookup over a fixed map of variables.
inline fabric::EnvLookup fake(Vars vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

/// Returns base with the variables of more added (replacing those of the same name).
inline Vars with(Vars base, const Vars& more) {
  for (const auto& [k, v] : more) base[k] = v;
  return base;
}

/// Returns base without the variable name.
inline Vars without(Vars base, const std::string& name) {
  base.erase(name);
  return base;
}

}  // namespace fabric_test
