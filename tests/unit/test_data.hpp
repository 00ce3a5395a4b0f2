#pragma once
// A tiny map-style dataset for the tests: example i is (x[i], y[i]).
#include <torch/torch.h>

#include <cstddef>

namespace fabric_test {

struct XY : torch::data::datasets::Dataset<XY> {
  XY(torch::Tensor x_, torch::Tensor y_) : x(std::move(x_)), y(std::move(y_)) {}
  torch::data::Example<> get(std::size_t i) override {
    const auto index = static_cast<std::int64_t>(i);
    return {x[index], y[index]};
  }
  torch::optional<std::size_t> size() const override { return static_cast<std::size_t>(x.size(0)); }
  torch::Tensor x, y;
};

/// Returns n examples whose x is its index, so batches show which samples they hold.
inline XY indexed(std::int64_t n) {
  const auto idx = torch::arange(n, torch::kLong);
  return XY(idx.to(torch::kFloat).unsqueeze(1), idx);
}

}  // namespace fabric_test
