#pragma once
// Test-only (tests/static/reducer_layout.cpp): Debian's libtorch-dev (1.13) omits this header, which c10d's
// reducer.hpp includes for two names; with these declarations the test compiles the real reducer.hpp to
// compare its size with the storage of fabric's own declaration (fabric/detail/reducer_compat.hpp).

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>

namespace torch::distributed::autograd {

/// The distributed-autograd context, as far as c10d::Reducer names it.
class DistAutogradContext {
 public:
  using GradCallback = std::function<bool(at::Tensor&)>;
};
using ContextPtr = std::shared_ptr<DistAutogradContext>;

}  // namespace torch::distributed::autograd
