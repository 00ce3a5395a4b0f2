#pragma once
// fabric::CapturedStep: a whole training step (forward, loss, backward, optimizer step, zero_grad)
// recorded once in a CUDA graph after eager warm-up steps and replayed with each new batch copied
// into its static inputs (Fabric::capture).

#include "fabric/core/error.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

// NOTE: CUDA graphs live in libtorch_cuda; a CPU-only LibTorch (Debian's) ships ATen/cuda/CUDAGraph.h
// but neither the CUDA runtime headers nor the library, so the graph code is compiled only where both
// headers are found. Define FABRIC_CUDA_GRAPHS=0 for a CPU-only LibTorch on a machine with the toolkit.
#ifndef FABRIC_CUDA_GRAPHS
#if __has_include(<cuda_runtime_api.h>) && __has_include(<ATen/cuda/CUDAGraph.h>)
#define FABRIC_CUDA_GRAPHS 1
#else
#define FABRIC_CUDA_GRAPHS 0
#endif
#endif

#if FABRIC_CUDA_GRAPHS
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace fabric {

/// Settings of Fabric::capture.
///
///     auto step = fabric.capture(train_step, {.warmup_steps = 3, .fallback = true});
struct CaptureOptions {
  /// Eager steps on a side stream before the capture (at least one): they create the optimizer's state
  /// and let cuBLAS and cuDNN settle their workspaces, as a CUDA graph needs.
  int warmup_steps = 3;
  /// Run every step eagerly where it cannot be captured (not a CUDA device, a gradient scaler, a
  /// distributed strategy, an optimizer whose step is not capturable, a host sync in the step, a batch
  /// of another shape) instead of refusing with a fabric::Error.
  bool fallback = false;
};

namespace detail {

/// What a captured step checks of each batch tensor: it must match the first batch's.
struct BatchSignature {
  std::vector<std::int64_t> sizes;
  c10::ScalarType dtype;
  c10::Device device;

  static BatchSignature of(const at::Tensor& t) { return {t.sizes().vec(), t.scalar_type(), t.device()}; }
  bool matches(const at::Tensor& t) const {
    return t.sizes().vec() == sizes && t.scalar_type() == dtype && t.device() == device;
  }
  std::string str() const {
    return fmt::format("[{}] {} on {}", fmt::join(sizes, ", "), c10::toString(dtype), device.str());
  }
};

/// Lets optimizer_step report its steps and read device step counts while it lives.
struct StepListenGuard {
  StepListenGuard(std::vector<LoggedStep>* log, CapturableSteps* steps) noexcept {
    optimizer_step_log() = log;
    capturable_steps() = steps;
  }
  ~StepListenGuard() {
    optimizer_step_log() = nullptr;
    capturable_steps() = nullptr;
  }
  StepListenGuard(const StepListenGuard&) = delete;
  StepListenGuard& operator=(const StepListenGuard&) = delete;
};

/// Returns why no step of the optimizer that logged this can be replayed from a graph, or "".
inline std::string uncapturable_step(const LoggedStep& step) {
  const bool adam = *step.type == typeid(torch::optim::Adam) || *step.type == typeid(torch::optim::AdamW);
  if (*step.type == typeid(torch::optim::SGD) && step.path == StepPath::foreach) return {};
  if (adam && step.path == StepPath::fused) return {};
  if (*step.type == typeid(torch::optim::SGD)) {
    return "torch::optim::SGD with its own step (FABRIC_FOREACH_STEP=0): it writes through .data() with host "
           "scalars; leave FABRIC_FOREACH_STEP unset so that fabric's foreach step runs";
  }
  if (adam) {
    return fmt::format(
        "{} through the foreach step: its bias corrections are host numbers, so a graph would replay one "
        "step's forever; the fused step (float32 parameters on CUDA, FABRIC_FOREACH_STEP unset) is capturable",
        c10::demangle(step.type->name()));
  }
  return fmt::format("{}: its own step() reads host state per step (step counts, learning-rate schedules)",
                     c10::demangle(step.type->name()));
}

}  // namespace detail

/// A training step captured in one CUDA graph (what Fabric::capture returns). Each call is one training
/// step on the batch it is given: the first `warmup_steps` calls run eagerly on a side stream, the next
/// records the step function into a graph and replays it, and every later call copies its batch into
/// the graph's static inputs and replays. The returned loss is the graph's static output: read it (or
/// clone it) before the next call.
///
///     auto step = fabric.capture([&](const at::Tensor& x, const at::Tensor& y) {
///       auto loss = torch::nn::functional::cross_entropy(model(x), y);
///       fabric.backward(loss);
///       optimizer.step();
///       optimizer.zero_grad();  // set to none: the recorded backward writes the gradients, adds nothing
///       return loss;
///     });
///     for (auto& batch : loader) losses.push_back(step(batch.data, batch.target).item<float>());
template <class F, class Fn>
class CapturedStep {
 public:
  /// Checks what is known before any step (the device, the precision, the strategy, the options).
  CapturedStep(F& fabric, Fn fn, CaptureOptions options) : fabric_(&fabric), fn_(std::move(fn)), options_(options) {
    if (options_.warmup_steps < 1) {
      detail::raise(
          "capture: expected warmup_steps >= 1, found {}; a CUDA graph needs an eager step first (the optimizer's "
          "state, cuBLAS workspaces), keep the default 3",
          options_.warmup_steps);
    }
    std::string reason;
    const c10::Device& device = fabric.device();
    if constexpr (NeedsFabricStep<typename F::precision_type>) {
      reason = fmt::format(
          "capture: expected a precision without a gradient scaler, found {}: its step reads on the host whether "
          "the gradients are finite and skips or scales from that, which a graph cannot replay; use bf16-mixed, "
          "or pass {{.fallback = true}}",
          F::precision_type::name);
    } else if constexpr (F::strategy_type::is_distributed) {
      reason = fmt::format(
          "capture: expected a single-device strategy, found {}: its gradient synchronisation runs on the host "
          "(buckets, hooks) and is not captured; use fabric::SingleDevice, or pass {{.fallback = true}}",
          F::strategy_type::name);
    }
    if (reason.empty() && !device.is_cuda()) {
      reason = fmt::format(
          "capture: expected a CUDA device, found {}; CUDA graphs record CUDA kernels only: use fabric::CUDA, or "
          "pass {{.fallback = true}} to run the step eagerly",
          device.str());
    } else if (reason.empty() && !FABRIC_CUDA_GRAPHS) {
      reason =
          "capture: expected a build with CUDA graphs, found FABRIC_CUDA_GRAPHS = 0 (cuda_runtime_api.h or "
          "ATen/cuda/CUDAGraph.h not found); add the CUDA toolkit's include directory, or pass {.fallback = true}";
    }
    if (!reason.empty()) refuse(reason);
  }

  /// Runs one training step on the batch and returns the loss (the graph's static output once captured).
  template <class... Ts>
  requires(std::same_as<std::remove_cvref_t<Ts>, at::Tensor>&&...) at::Tensor operator()(const Ts&... batch) {
    if (eager_) return std::invoke(fn_, batch...);
    if (signature_.empty()) {
      (signature_.push_back(detail::BatchSignature::of(batch)), ...);
    } else if (!matches(batch...)) {
      const std::vector<const at::Tensor*> found{&batch...};
      std::vector<std::string> expected_s, found_s;
      for (std::size_t i = 0; i < signature_.size() && i < found.size(); ++i) {
        expected_s.push_back(signature_[i].str());
        found_s.push_back(detail::BatchSignature::of(*found[i]).str());
      }
      if (options_.fallback) return std::invoke(fn_, batch...);
      detail::raise(
          "captured step: expected a batch of {} (as the first call's, which the graph was recorded for), found "
          "{}; a CUDA graph replays fixed shapes: drop or pad the last batch (drop_last), capture one step per "
          "shape, or pass {{.fallback = true}} to run such batches eagerly",
          fmt::join(expected_s, ", "), fmt::join(found_s, ", "));
    }
#if FABRIC_CUDA_GRAPHS
    return run(std::index_sequence_for<Ts...>{}, batch...);
#else
    // NOTE: unreachable: the constructor refused or fell back.
    return std::invoke(fn_, batch...);
#endif
  }

  /// Returns true once the step is recorded in a graph (after the warm-up calls).
  bool captured() const noexcept {
#if FABRIC_CUDA_GRAPHS
    return graph_ != nullptr;
#else
    return false;
#endif
  }
  /// Returns true when every step runs eagerly (options.fallback and something could not be captured).
  bool eager() const noexcept { return eager_; }

 private:
  void refuse(const std::string& reason) {
    if (!options_.fallback) detail::raise("{}", reason);
    eager_ = true;
  }
  template <class... Ts>
  bool matches(const Ts&... batch) const {
    if (sizeof...(Ts) != signature_.size()) return false;
    std::size_t i = 0;
    return (signature_[i++].matches(batch) && ...);
  }

#if FABRIC_CUDA_GRAPHS
  template <std::size_t... I, class... Ts>
  at::Tensor run(std::index_sequence<I...>, const Ts&... batch) {
    const auto index = fabric_->device().index();
    if (calls_ < options_.warmup_steps) {
      ++calls_;
      if (!side_) side_ = c10::cuda::getStreamFromPool(false, index);
      std::vector<detail::LoggedStep> steps;
      c10::cuda::device_synchronize();
      at::Tensor loss;
      {
        c10::cuda::CUDAStreamGuard guard(*side_);
        detail::StepListenGuard listen(&steps, &capturable_);
        loss = std::invoke(fn_, batch...);
      }
      c10::cuda::device_synchronize();
      for (const auto& step : steps) {
        if (std::find(stepped_.begin(), stepped_.end(), step.optimizer) == stepped_.end()) {
          stepped_.push_back(step.optimizer);
        }
        if (const std::string why = detail::uncapturable_step(step); !why.empty()) {
          refuse(fmt::format(
              "capture: expected optimizers whose step a graph can replay (torch::optim::SGD through fabric's "
              "foreach step, Adam and AdamW through the fused step), found {}; this step ran eagerly; pass {{.fallback "
              "= true}} to train eagerly",
              why));
          break;
        }
      }
      return loss;
    }
    if (!graph_) {
      recorded_lrs_.clear();
      for (const auto* optimizer : stepped_) {
        for (const auto& group : optimizer->param_groups()) recorded_lrs_.push_back(group.options().get_lr());
      }
      static_inputs_ = {batch.clone()...};
      auto graph = std::make_unique<at::cuda::CUDAGraph>();
      c10::cuda::device_synchronize();
      std::string failure;
      {
        c10::cuda::CUDAStreamGuard guard(*side_);
        capturable_.recording = true;
        detail::StepListenGuard listen(nullptr, &capturable_);
        graph->capture_begin();
        bool recording = true;
        // NOTE: an error inside the step leaves the stream capturing: end the (invalidated) capture and
        // clear CUDA's last error, so that the next launch does not report it.
        const auto end_broken_capture = [&] {
          if (recording) {
            try {
              graph->capture_end();
            } catch (const c10::Error&) {
            }
          }
          (void)cudaGetLastError();
        };
        try {
          static_loss_ = std::invoke(fn_, static_inputs_[I]...);
          recording = false;
          graph->capture_end();
        } catch (const c10::Error& e) {
          failure = e.what_without_backtrace();
          end_broken_capture();
        } catch (...) {
          end_broken_capture();
          capturable_.recording = false;
          static_inputs_.clear();
          throw;
        }
      }
      capturable_.recording = false;
      if (!failure.empty()) {
        static_inputs_.clear();
        static_loss_ = at::Tensor();
        c10::cuda::device_synchronize();
        refuse(fmt::format(
            "captured step: expected a step function without host synchronisation, found one that failed while "
            "being recorded ({}); a CUDA graph holds no host reads: move loss.item(), printing, .cpu() and "
            "data-dependent branches out of the step function (read the returned loss after the call), or pass "
            "{{.fallback = true}}",
            failure));
        return std::invoke(fn_, batch...);
      }
      graph_ = std::move(graph);
      // NOTE: the capture recorded the step without running it; the replay below is this call's step.
      return replay(batch...);
    }
    return replay(batch...);
  }
  template <class... Ts>
  at::Tensor replay(const Ts&... batch) {
    check_learning_rates();
    std::size_t i = 0;
    (static_inputs_[i++].copy_(batch, /*non_blocking=*/true), ...);
    graph_->replay();
    // NOTE: recording counted the first replay's step on the host already.
    if (replays_++ > 0) {
      for (const auto& advance : capturable_.advance) advance();
    }
    return static_loss_;
  }

  /// Refuses a learning rate changed since the recording (an LR scheduler's step, set_lr): the graph holds
  /// the step's kernels with the rates they were recorded with, so a changed one would be ignored silently.
  void check_learning_rates() const {
    std::size_t i = 0;
    for (const auto* optimizer : stepped_) {
      const auto& groups = optimizer->param_groups();
      for (std::size_t g = 0; g < groups.size() && i < recorded_lrs_.size(); ++g, ++i) {
        const double now = groups[g].options().get_lr();
        if (now != recorded_lrs_[i]) {
          detail::raise(
              "captured step: expected the learning rate the step was recorded with, {}, found {} in param group {} "
              "of {}; the graph replays the optimizer's kernels with the recorded rate and would ignore the new "
              "one: keep the rate fixed while replaying (schedule it between captures: a new fabric.capture "
              "records the new rate after its warm-up), or step eagerly",
              recorded_lrs_[i], now, g, c10::demangle(typeid(*optimizer).name()));
        }
      }
    }
  }

  std::optional<c10::cuda::CUDAStream> side_{};
  std::int64_t replays_ = 0;
  std::unique_ptr<at::cuda::CUDAGraph> graph_{};
#endif

  F* fabric_;
  Fn fn_;
  CaptureOptions options_;
  bool eager_ = false;
  int calls_ = 0;
  std::vector<detail::BatchSignature> signature_{};
  /// The optimizers the warm-up steps stepped, and their param groups' learning rates at the recording.
  std::vector<const torch::optim::Optimizer*> stepped_{};
  std::vector<double> recorded_lrs_{};
  detail::CapturableSteps capturable_{};
  std::vector<at::Tensor> static_inputs_{};
  at::Tensor static_loss_{};
};

}  // namespace fabric
