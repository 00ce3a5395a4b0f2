#pragma once
// The names of the autograd nodes behind a tensor: which kernels' backward a layer took (tests/unit/nn/).

#include <torch/torch.h>

#include <memory>
#include <set>
#include <string>
#include <vector>

namespace fabric_test {

/// Returns the names of the autograd nodes that produced y.
inline std::set<std::string> graph_of(const at::Tensor& y) {
  std::set<std::string> names;
  std::vector<std::shared_ptr<torch::autograd::Node>> todo{y.grad_fn()};
  while (!todo.empty()) {
    auto node = todo.back();
    todo.pop_back();
    if (!node || !names.insert(node->name()).second) continue;
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function);
  }
  return names;
}

}  // namespace fabric_test
