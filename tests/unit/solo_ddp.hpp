#pragma once
// One-process DDP in the unit tests: SoloEnvironment, a cluster environment for a job that nothing launched
// (rank 0 of 1, meeting on a free port of this host), and require_gloo(): a one-process DDP on the CPU needs
// Gloo, which the PyTorch wheel's LibTorch lacks (it has NCCL only), so those tests skip there.

#include <fabric/distributed.hpp>

#include <catch2/catch_test_macros.hpp>

#include <string_view>

struct SoloEnvironment {
  static constexpr std::string_view name = "solo";
  static bool detect(const fabric::EnvLookup& /*env*/) { return true; }
  fabric::Topology topology(const fabric::EnvLookup& /*env*/, int /*devices*/, int /*num_nodes*/) const {
    fabric::Topology t;
    t.name = name;
    t.creates_processes_externally = true;
    t.main_port = fabric::detail::find_free_port();
    return t;
  }
};

inline void require_gloo() {
  if (!fabric::detail::has_backend("gloo")) SKIP("this LibTorch has no Gloo for a CPU process group");
}
