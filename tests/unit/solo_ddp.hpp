#pragma once
// One-process DDP tests on the CPU need Gloo, which the PyTorch wheel's LibTorch lacks (it has NCCL only):
// they call require_gloo() first and skip there.

#include <fabric/distributed.hpp>

#include <catch2/catch_test_macros.hpp>

inline void require_gloo() {
  if (!fabric::detail::has_backend("gloo")) SKIP("this LibTorch has no Gloo for a CPU process group");
}
