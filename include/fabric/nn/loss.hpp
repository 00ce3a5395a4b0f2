#pragma once
// fabric::nn::cross_entropy: cross-entropy of bfloat16 / float16 (or float32) logits that accumulates in
// float32 without a float32 copy of the whole logits. Where the logits require grad, the forward also writes
// their gradient (the llm.c / Liger trick: softmax - target distribution is known once the row's log-sum-exp
// is), so that the backward only scales it: on CUDA in one fused kernel compiled at run time with NVRTC
// (fabric/detail/cross_entropy_kernel.hpp), elsewhere chunk by chunk of rows with ATen ops.

#include "fabric/core/error.hpp"
#include "fabric/detail/cross_entropy_kernel.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
#include <utility>

namespace fabric::nn {

/// How fabric::nn::cross_entropy computes the gradient of the logits.
enum class LossKernel {
  /// The fused CUDA kernel where it runs (CUDA logits of float32, bfloat16 or float16, fabric compiled with
  /// the toolkit's NVRTC headers, the kernel compiled for the device), else `aten`.
  automatic,
  /// The fused CUDA kernel (NVRTC); a fabric::Error where it cannot run.
  fused,
  /// In forward, chunk by chunk of rows with ATen ops: float32 log-softmax, loss, gradient in the logits'
  /// dtype; the backward scales it.
  aten,
  /// Nothing in forward; the backward recomputes each chunk's softmax from the saved logits (the gradient
  /// buffer exists only during the backward, at the price of a second pass of softmax kernels).
  recompute,
};

/// How fabric::nn::cross_entropy splits the logits into chunks of rows, and where the gradient goes.
struct ChunkOptions {
  /// Rows per chunk (ATen paths); 0: the fewest equal chunks that hold at most `max_elements` logits each
  /// (at least one row).
  std::int64_t rows = 0;
  /// The most logits a chunk holds when `rows` is 0 (2^25: 128 MiB of float32 per chunk).
  std::int64_t max_elements = std::int64_t{1} << 25;
  /// Which computation (above).
  LossKernel kernel = LossKernel::automatic;
  /// Write the gradient into the logits' own storage instead of a new N x C buffer (fused and aten only):
  /// saves the buffer, but the logits hold their gradient after the call. Only where nothing else reads
  /// the logits afterwards: an autograd node that saved them (tanh, softcapping, ...) refuses its backward
  /// ("modified by an inplace operation"), user code would read gradients.
  bool in_place = false;
};

namespace detail {

/// The reductions, as at::Reduction numbers them.
enum class Reduction : std::int64_t { none = 0, mean = 1, sum = 2 };

/// The autograd Function of fabric::nn::cross_entropy: logits [N, V], targets [N] int64.
struct ChunkedCrossEntropy : torch::autograd::Function<ChunkedCrossEntropy> {
  /// Returns the losses (float32), reduced. `kernel`: fused, aten or recompute (automatic resolved);
  /// `wanted`: whether the logits' gradient will be asked for (they require grad in grad mode). recompute
  /// saves the logits (no copy) and the targets; fused and aten keep the gradient of the logits (for mean
  /// already divided by the count of rows) in saved_data for backward to scale and hand over.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            std::int64_t reduction, std::int64_t ignore_index, double smoothing,
                            std::int64_t chunk_rows, std::int64_t kernel, bool wanted, bool in_place) {
    const std::int64_t n = logits.size(0), v = logits.size(1);
    const auto path = static_cast<LossKernel>(kernel);
    const bool gradient = wanted && path != LossKernel::recompute;
    const bool mean = static_cast<Reduction>(reduction) == Reduction::mean;
    const at::Tensor valid = targets.ne(ignore_index);
    const at::Tensor count = valid.sum().to(at::kFloat);
    at::Tensor losses = at::empty({n}, logits.options().dtype(at::kFloat));
    at::Tensor grad;
    if (gradient) {
      // NOTE: in place, the gradient is written through the logits (bumping their version counter, so that
      // any other node that saved them refuses its backward); the buffer kept for backward is an alias
      // with a version counter of its own (variable_data), so that this node's backward does not.
      grad = in_place ? logits.variable_data() : at::empty_like(logits, at::MemoryFormat::Contiguous);
    }
    if (path == LossKernel::fused) {
      fabric::detail::launch_cross_entropy_kernel(logits, grad, targets.contiguous(), losses, count, ignore_index,
                                                  smoothing, mean);
    } else {
      const at::Tensor safe = targets.masked_fill(valid.logical_not(), 0).unsqueeze(1);  // [N, 1], in range
      // The gradient each row's loss gives its logits: 0 for ignored rows, divided by the count for mean.
      at::Tensor scale;
      if (gradient) {
        scale = valid.to(at::kFloat).unsqueeze(1);
        if (mean) scale.div_(count);
      }
      const at::Tensor minus_target =
          gradient ? at::full({std::min(chunk_rows, n), 1}, -(1.0 - smoothing), logits.options().dtype(at::kFloat))
                   : at::Tensor();
      for (std::int64_t begin = 0; begin < n; begin += chunk_rows) {
        const std::int64_t rows = std::min(chunk_rows, n - begin);
        // NOTE: log_softmax with a dtype reads the chunk in its own dtype and writes float32: the one
        // float32 tensor of the forward, rows x V; it is freed before the next chunk.
        const at::Tensor logp = logits.narrow(0, begin, rows).log_softmax(1, at::kFloat);
        const at::Tensor chunk_targets = safe.narrow(0, begin, rows);
        at::Tensor out = losses.narrow(0, begin, rows);
        at::neg_out(out, logp.gather(1, chunk_targets).squeeze(1));
        if (smoothing > 0) {
          // (1 - e) * nll + e * mean over the classes of -log p, as PyTorch's label smoothing.
          out.mul_(1.0 - smoothing).sub_(logp.sum(1), smoothing / static_cast<double>(v));
        }
        if (!gradient) continue;
        // softmax - (1 - e) onehot(target) - e / V, times the row's scale, written in the logits' dtype.
        at::Tensor p = logp.exp_();
        p.scatter_add_(1, chunk_targets, minus_target.narrow(0, 0, rows));
        if (smoothing > 0) p.sub_(smoothing / static_cast<double>(v));
        at::Tensor into = (in_place ? logits : grad).narrow(0, begin, rows);
        at::mul_out(into, p, scale.narrow(0, begin, rows));
      }
      losses.masked_fill_(valid.logical_not(), 0.0);
    }
    if (gradient && in_place && path == LossKernel::fused) logits.unsafeGetTensorImpl()->bump_version();  // the kernel
    ctx->saved_data["kernel"] = kernel;
    ctx->saved_data["reduction"] = reduction;
    if (gradient) {
      ctx->saved_data["gradient"] = grad;
    } else if (path == LossKernel::recompute) {
      ctx->save_for_backward({logits, targets, count});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["smoothing"] = smoothing;
      ctx->saved_data["chunk_rows"] = chunk_rows;
    }
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

  /// The gradients of forward's inputs: the logits' and none for the other eight.
  static torch::autograd::variable_list inputs_gradient(at::Tensor logits) {
    torch::autograd::variable_list out(9);
    out[0] = std::move(logits);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (at::GradMode::is_enabled()) {
      fabric::detail::raise(
          "fabric::nn::cross_entropy: expected a backward without create_graph, found a double backward; the "
          "loss's backward is not differentiable: use torch::nn::functional::cross_entropy for higher-order "
          "gradients");
    }
    const auto path = static_cast<LossKernel>(ctx->saved_data["kernel"].toInt());
    const auto reduction = static_cast<Reduction>(ctx->saved_data["reduction"].toInt());
    if (path != LossKernel::recompute) {
      const auto found = ctx->saved_data.find("gradient");
      if (found == ctx->saved_data.end()) {
        fabric::detail::raise(
            "fabric::nn::cross_entropy: expected one backward through the loss, found a second one (the "
            "logits' gradient, computed in forward, went to the first); compute the loss again, or pass "
            "{{.kernel = fabric::nn::LossKernel::recompute}} to backward through it more than once");
      }
      // NOTE: the buffer leaves saved_data (which autograd does not free after backward) so that it lives no
      // longer than the gradient it becomes; scaled in place: one pass over it, no host synchronisation.
      at::Tensor grad = found->second.toTensor();
      ctx->saved_data.erase(found);
      const at::Tensor g = grads[0].to(at::kFloat);
      if (path == LossKernel::fused) {
        // NOTE: ATen's mul_ of bfloat16 by a float32 device scalar takes its mixed-dtype (not vectorised) loop:
        // 1.5 ms for GPT-2's logits on an H200; the kernel's module has a vectorised pass.
        fabric::detail::launch_cross_entropy_scale(grad, g.contiguous(), reduction == Reduction::none);
      } else {
        grad.mul_(reduction == Reduction::none ? g.unsqueeze(1) : g);
      }
      return inputs_gradient(std::move(grad));
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& targets = saved[1];
    const at::Tensor& count = saved[2];
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
    return inputs_gradient(std::move(grad));
  }
};

}  // namespace detail

/// Returns the cross-entropy of logits [N, C] against class indices [N], as
/// `torch::nn::functional::cross_entropy(logits, targets, options)` computes it in float32, without a
/// float32 copy of the logits: it reads them in their dtype (bfloat16, float16 or float32), accumulates in
/// float32, returns a float32 loss and gives the logits a gradient in their own dtype. Where the logits
/// require grad, the forward computes that gradient too (their softmax is at hand then) and the backward
/// only multiplies it by the incoming gradient.
///
///     fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric(
///         {}, {}, fabric::BF16Mixed({.convert_output = false}));  // keep the logits in bfloat16
///     at::Tensor logits = model(tokens);                           // [B, T, V] bfloat16
///     at::Tensor loss = fabric::nn::cross_entropy(logits.view({-1, logits.size(-1)}), targets.view(-1));
///
/// Options: `reduction` (mean, sum, none), `ignore_index`, `label_smoothing`; class `weight` and
/// probability targets are refused (use `torch::nn::functional::cross_entropy`). `chunks` picks the
/// computation (ChunkOptions::kernel: the fused CUDA kernel by default where it runs, else chunks of ATen
/// ops) and whether the gradient overwrites the logits (`in_place`). Memory beyond the logits: their
/// gradient (N x C in their dtype, from forward to backward; none with `in_place`), for the ATen paths one
/// float32 chunk (rows x C x 4 bytes; at most 128 MiB by default), and a few float32 vectors of N. Targets
/// out of range are a fabric::Error on the CPU, a device-side assert on the GPU through ATen (as in
/// PyTorch) and NaN losses through the fused kernel. The backward runs once (a second backward through the
/// same graph is refused, except with LossKernel::recompute) and is not itself differentiable.
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
  LossKernel kernel = chunks.kernel;
  // NOTE: the kernel reads rows of stride 1 (views with other strides take the ATen path).
  const bool rows_of_stride_one = logits.size(1) == 1 || logits.stride(1) == 1;
  if (kernel == LossKernel::automatic) {
    kernel = logits.is_cuda() && rows_of_stride_one && fabric::detail::cross_entropy_kernel_unavailable(logits).empty()
                 ? LossKernel::fused
                 : LossKernel::aten;
  } else if (kernel == LossKernel::fused) {
    const std::string why = rows_of_stride_one ? fabric::detail::cross_entropy_kernel_unavailable(logits)
                                               : "the logits' rows have a stride";
    if (!why.empty()) {
      fabric::detail::raise(
          "fabric::nn::cross_entropy: expected logits the fused CUDA kernel can read, found {}; pass "
          "{{.kernel = fabric::nn::LossKernel::aten}} (or automatic)",
          why);
    }
  }
  if (chunks.in_place && kernel == LossKernel::recompute) {
    fabric::detail::raise(
        "fabric::nn::cross_entropy: expected in_place with LossKernel fused, aten or automatic, found recompute "
        "(its backward reads the logits); drop in_place");
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
  const bool wanted = at::GradMode::is_enabled() && logits.requires_grad();
  const auto reduction = static_cast<std::int64_t>(torch::enumtype::reduction_get_enum(options.reduction()));
  return detail::ChunkedCrossEntropy::apply(logits, t, reduction, ignore, smoothing, rows,
                                            static_cast<std::int64_t>(kernel), wanted, chunks.in_place);
}

}  // namespace fabric::nn
