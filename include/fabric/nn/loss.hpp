#pragma once
// fabric::nn::cross_entropy: cross-entropy of bfloat16 / float16 (or float32) logits that accumulates in
// float32 without a float32 copy of the whole logits, forward and backward, chunk by chunk of rows.

#include "fabric/core/error.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/enum.h>
#include <torch/nn/options/loss.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace fabric::nn {

/// How fabric::nn::cross_entropy splits the logits into chunks of rows.
struct ChunkOptions {
  /// Rows per chunk; 0: the fewest equal chunks that hold at most `max_elements` logits each (at least
  /// one row).
  std::int64_t rows = 0;
  /// The most logits a chunk holds when `rows` is 0 (2^25: 128 MiB of float32 per chunk).
  std::int64_t max_elements = std::int64_t{1} << 25;
};

namespace detail {

/// The reductions, as at::Reduction numbers them.
enum class Reduction : std::int64_t { none = 0, mean = 1, sum = 2 };

/// The autograd Function of fabric::nn::cross_entropy: logits [N, V], targets [N] int64.
struct ChunkedCrossEntropy : torch::autograd::Function<ChunkedCrossEntropy> {
  /// Returns the losses (float32), reduced; saves the logits (no copy) and the targets for backward.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            std::int64_t reduction, std::int64_t ignore_index, double smoothing,
                            std::int64_t chunk_rows) {
    const std::int64_t n = logits.size(0), v = logits.size(1);
    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor safe = targets.masked_fill(valid.logical_not(), 0).unsqueeze(1);  // [N, 1], in range
    at::Tensor losses = at::empty({n}, logits.options().dtype(at::kFloat));
    for (std::int64_t begin = 0; begin < n; begin += chunk_rows) {
      const std::int64_t rows = std::min(chunk_rows, n - begin);
      // NOTE: log_softmax with a dtype reads the chunk in its own dtype and writes float32: the one
      // float32 tensor of the forward, rows x V; it is freed before the next chunk.
      const at::Tensor logp = logits.narrow(0, begin, rows).log_softmax(1, at::kFloat);
      at::Tensor out = losses.narrow(0, begin, rows);
      at::neg_out(out, logp.gather(1, safe.narrow(0, begin, rows)).squeeze(1));
      if (smoothing > 0) {
        // (1 - e) * nll + e * mean over the classes of -log p, as PyTorch's label smoothing.
        out.mul_(1.0 - smoothing).sub_(logp.sum(1), smoothing / static_cast<double>(v));
      }
    }
    losses.masked_fill_(valid.logical_not(), 0.0);
    const at::Tensor count = valid.sum().to(at::kFloat);
    ctx->save_for_backward({logits, targets, count});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["chunk_rows"] = chunk_rows;
    switch (static_cast<Reduction>(reduction)) {
      case Reduction::none:
        return losses;
      case Reduction::sum:
        return losses.sum();
      case Reduction::mean:
        break;
    }
    return losses.sum().div_(count);
  }

  /// Returns the gradient of the logits in their dtype: (softmax - target distribution) times the
  /// incoming gradient per row, computed and written chunk by chunk.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& targets = saved[1];
    const at::Tensor& count = saved[2];
    const auto reduction = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    const std::int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double smoothing = ctx->saved_data["smoothing"].toDouble();
    const std::int64_t chunk_rows = ctx->saved_data["chunk_rows"].toInt();
    const std::int64_t n = logits.size(0), v = logits.size(1);

    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor safe = targets.masked_fill(valid.logical_not(), 0).unsqueeze(1);
    // The gradient each row's loss receives: 0 for ignored rows.
    at::Tensor row = valid.to(at::kFloat);
    // none: grads[0] is [N]; sum and mean: a scalar, divided by the rows counted for mean.
    row.mul_(reduction == Reduction::mean ? grads[0].to(at::kFloat) / count : grads[0].to(at::kFloat));
    row = row.unsqueeze(1);  // [N, 1]
    at::Tensor grad = at::empty({n, v}, logits.options());
    const at::Tensor minus_target =
        at::full({std::min(chunk_rows, n), 1}, -(1.0 - smoothing), logits.options().dtype(at::kFloat));
    for (std::int64_t begin = 0; begin < n; begin += chunk_rows) {
      const std::int64_t rows = std::min(chunk_rows, n - begin);
      // NOTE: the one float32 tensor of the backward, rows x V, freed before the next chunk; the
      // product is written straight into the gradient in the logits' dtype.
      at::Tensor p = logits.narrow(0, begin, rows).softmax(1, at::kFloat);
      p.scatter_add_(1, safe.narrow(0, begin, rows), minus_target.narrow(0, 0, rows));
      if (smoothing > 0) p.sub_(smoothing / static_cast<double>(v));
      at::Tensor out = grad.narrow(0, begin, rows);
      at::mul_out(out, p, row.narrow(0, begin, rows));
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace detail

/// Returns the cross-entropy of logits [N, C] against class indices [N], as
/// `torch::nn::functional::cross_entropy(logits, targets, options)` computes it in float32, without a
/// float32 copy of the logits: it reads them in their dtype (bfloat16, float16 or float32), works on
/// chunks of rows in float32 (log-softmax in forward, softmax in backward, each chunk freed before the
/// next), returns a float32 loss and gives the logits a gradient in their own dtype.
///
///     fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric(
///         {}, {}, fabric::BF16Mixed({.convert_output = false}));  // keep the logits in bfloat16
///     at::Tensor logits = model(tokens);                           // [B, T, V] bfloat16
///     at::Tensor loss = fabric::nn::cross_entropy(logits.view({-1, logits.size(-1)}), targets.view(-1));
///
/// Options: `reduction` (mean, sum, none), `ignore_index`, `label_smoothing`; class `weight` and
/// probability targets are refused (use `torch::nn::functional::cross_entropy`). Memory beyond the
/// logits and their gradient: one float32 chunk (rows x C x 4 bytes; at most 128 MiB by default) and a few
/// float32 vectors of N. Targets out of range are a fabric::Error on the CPU and a device-side assert
/// on the GPU (as in PyTorch). The backward is not itself differentiable.
inline at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets,
                                const torch::nn::functional::CrossEntropyFuncOptions& options = {},
                                const ChunkOptions& chunks = {}) {
  if (!logits.defined() || !targets.defined()) {
    fabric::detail::raise("fabric::nn::cross_entropy: expected defined logits and targets, found {} undefined",
                          logits.defined() ? "the targets" : "the logits");
  }
  if (logits.dim() != 2 || !logits.is_floating_point()) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: expected floating logits [N, C], found {}-D {}; flatten them first: "
        "logits.view({{-1, logits.size(-1)}})",
        logits.dim(), std::string(c10::toString(logits.scalar_type())));
  }
  if (targets.is_floating_point() || targets.is_complex() || targets.scalar_type() == at::kBool) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: expected class indices (int64 targets), found {} targets; class "
        "probabilities need torch::nn::functional::cross_entropy",
        std::string(c10::toString(targets.scalar_type())));
  }
  if (targets.dim() != 1 || targets.size(0) != logits.size(0)) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: expected targets [N] for logits [{}, {}], found {}-D targets of {} elements; "
        "flatten them with targets.view(-1)",
        logits.size(0), logits.size(1), targets.dim(), targets.numel());
  }
  if (targets.device() != logits.device()) {
    fabric::detail::raise("fabric::nn::cross_entropy: expected targets on the logits' device {}, found {}",
                          logits.device().str(), targets.device().str());
  }
  if (logits.size(1) < 1) fabric::detail::raise("fabric::nn::cross_entropy: expected at least one class, found 0");
  if (options.weight().defined()) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: class weights are not supported; drop `weight` or use "
        "torch::nn::functional::cross_entropy");
  }
  const double smoothing = options.label_smoothing();
  if (!(smoothing >= 0.0 && smoothing <= 1.0)) {
    fabric::detail::raise("fabric::nn::cross_entropy: expected label_smoothing in [0, 1], found {}", smoothing);
  }
  if (chunks.rows < 0 || chunks.max_elements < 1) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: expected ChunkOptions rows >= 0 and max_elements >= 1, found rows {} and "
        "max_elements {}",
        chunks.rows, chunks.max_elements);
  }
  const at::Tensor t = targets.to(at::kLong);
  const std::int64_t ignore = options.ignore_index();
  if (!t.is_cuda() && t.numel() > 0) {
    // NOTE: on the CPU the range check costs no device synchronisation; on the GPU it would.
    const at::Tensor bad = t.ne(ignore).logical_and(t.lt(0).logical_or(t.ge(logits.size(1))));
    if (bad.any().item<bool>()) {
      fabric::detail::raise(
          "fabric::nn::cross_entropy: expected targets in [0, {}) or ignore_index {}, found {} at position {}",
          logits.size(1), ignore, t.masked_select(bad)[0].item<std::int64_t>(),
          bad.nonzero()[0][0].item<std::int64_t>());
    }
  }
  // NOTE: equal chunks (8192 rows of 50304 logits: 13 chunks of 631 rows, not 12 of 667 and one of 188):
  // softmax kernels run one block per row, so a short last chunk would leave most of the GPU idle.
  const std::int64_t n = logits.size(0);
  std::int64_t rows = chunks.rows;
  if (rows == 0) {
    const std::int64_t most = std::max<std::int64_t>(1, chunks.max_elements / logits.size(1));
    const std::int64_t count = std::max<std::int64_t>(1, (n + most - 1) / most);
    rows = std::max<std::int64_t>(1, (n + count - 1) / count);
  }
  const auto reduction = static_cast<std::int64_t>(torch::enumtype::reduction_get_enum(options.reduction()));
  return detail::ChunkedCrossEntropy::apply(logits, t, reduction, ignore, smoothing, rows);
}

}  // namespace fabric::nn
