#pragma once
// NOTE: Debian's libtorch-dev (1.13) omits this header, which c10d's reducer.hpp includes for two
// names. The Reducer only stores a shared_ptr to the context, so these declarations suffice; fabric's
// CMake adds this directory to the include path only when LibTorch lacks the real header.

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
