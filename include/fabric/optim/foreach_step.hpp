#pragma once
// The fast optimizer step: LibTorch's own Adam, AdamW and SGD stepped with multi-tensor kernels
// (`at::_foreach_*`, and `at::_fused_adam_`/`at::_fused_adamw_` where this LibTorch has them) on
// the optimizer's own param groups and state objects, so that state_dict and checkpoints are what
// the optimizer's own step() writes. Everything else goes to the optimizer's own step().

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_addcdiv.h>
#include <ATen/ops/_foreach_addcmul.h>
#include <ATen/ops/_foreach_div.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_sqrt.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/full.h>
#include <ATen/ops/max.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/version.h>

#include "fabric/core/error.hpp"
#include "fabric/detail/torch_version.hpp"

#if FABRIC_TORCH_FUSED_ADAM
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#define FABRIC_HAS_FUSED_ADAM 1
#else
#define FABRIC_HAS_FUSED_ADAM 0
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric::detail {

/// The kernels a step ran with.
enum class StepPath : std::uint8_t { own, foreach, fused };

/// Which kernels the fast step may use: set from the environment variable FABRIC_FOREACH_STEP
/// ("0" = always the optimizer's own step, "foreach" = no fused kernels, unset or "1" = fused where
/// this LibTorch has them for the device, else foreach).
inline StepPath& optimizer_step_kernels() noexcept {
  static StepPath kernels = [] {
    const char* env = std::getenv("FABRIC_FOREACH_STEP");
    if (env == nullptr) return StepPath::fused;
    if (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0) return StepPath::own;
    if (std::strcmp(env, "foreach") == 0) return StepPath::foreach;
    return StepPath::fused;
  }();
  return kernels;
}

/// Returns the kernels the last optimizer_step of this thread ran with (a test hook).
inline StepPath& last_optimizer_step_path() noexcept {
  thread_local StepPath path = StepPath::own;
  return path;
}

/// Returns true when the last optimizer_step of this thread took the multi-tensor path.
inline bool last_step_was_fast() noexcept { return last_optimizer_step_path() != StepPath::own; }

/// Returns the key under which the optimizer's state map keeps p's state (the TensorImpl address:
/// a string in LibTorch 1.x, the pointer itself in 2.x).
template <class Map>
typename Map::key_type optimizer_state_key(const at::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    // NOTE: what c10::guts::to_string does for a pointer in LibTorch 1.x (not in every 2.x).
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

/// True when the fused Adam kernels of this LibTorch run on the device for the dtype.
inline bool fused_adam_supported(const c10::Device& device, c10::ScalarType dtype) noexcept {
#if FABRIC_HAS_FUSED_ADAM
  // NOTE: float16/bfloat16 are left to foreach: the fused kernels round once per element, the own
  // step once per operation, which differs visibly in half precision.
  if (dtype != c10::ScalarType::Float && dtype != c10::ScalarType::Double) return false;
  if (device.is_cuda()) return true;
  return device.is_cpu() && FABRIC_TORCH_FUSED_ADAM_CPU;
#else
  (void)device;
  (void)dtype;
  return false;
#endif
}

/// True when p's gradient can go through the multi-tensor kernels (else the own step runs).
inline bool foreach_grad_ok(const at::Tensor& p) {
  const at::Tensor& g = p.grad();
  return g.layout() == c10::kStrided && p.layout() == c10::kStrided && !g.is_sparse() && !p.is_complex() &&
         p.is_floating_point() && g.scalar_type() == p.scalar_type() && g.device() == p.device();
}

/// True when t is one dense block laid out like p (what the fused kernels need).
inline bool fused_layout_ok(const at::Tensor& p, const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && t.strides() == p.strides();
}

// NOTE: on the CPU the foreach kernels loop over the tensors anyway; buckets there are capped so
// that the temporaries of one bucket (denominators, decayed gradients) stay small and are reused
// by the allocator instead of being fresh pages every step.
inline constexpr std::int64_t cpu_bucket_numel = std::int64_t{1} << 22;

/// True when a bucket on the device holding numel elements should take no more tensors.
inline bool bucket_full(const c10::Device& device, std::int64_t numel) noexcept {
  return device.is_cpu() && numel >= cpu_bucket_numel;
}

/// The device step counts of Adam and AdamW while a captured step warms up and records
/// (fabric::CapturedStep): the fused step reads them instead of a step tensor filled on the host, and
/// increments them on the device while recording, so that each replay advances them. `advance` keeps
/// the host counts (state_dict, an eager step later) in line, one call per replay.
struct CapturableSteps {
  bool recording = false;
  std::unordered_map<const void*, at::Tensor> steps{};
  std::vector<std::function<void()>> advance{};
};

/// The capturable step counts of this thread (null when no captured step warms up or records).
inline CapturableSteps*& capturable_steps() noexcept {
  thread_local CapturableSteps* steps = nullptr;
  return steps;
}

/// The tensors of one param group that share device, dtype and step count.
struct AdamBucket {
  c10::Device device;
  c10::ScalarType dtype;
  std::int64_t step;
  bool fusable = true;
  std::int64_t numel = 0;
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
  std::vector<void*> states;
};

/// Steps Adam (Decoupled = false) or AdamW (true) with multi-tensor kernels; returns false, having
/// changed nothing, when something needs the optimizer's own step.
template <bool Decoupled, class Opt>
bool adam_foreach_step(Opt& optimizer) {
  using Options = std::conditional_t<Decoupled, torch::optim::AdamWOptions, torch::optim::AdamOptions>;
  using State = std::conditional_t<Decoupled, torch::optim::AdamWParamState, torch::optim::AdamParamState>;
  using Map = std::remove_cvref_t<decltype(optimizer.state())>;
  auto& state_map = optimizer.state();

  // Check everything first, so that a fallback happens before any tensor changed.
  for (auto& group : optimizer.param_groups()) {
    auto& options = static_cast<Options&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      if (!foreach_grad_ok(p)) return false;
      if (options.amsgrad()) {
        auto it = state_map.find(optimizer_state_key<Map>(p));
        if (it != state_map.end() && !static_cast<State&>(*it->second).max_exp_avg_sq().defined()) return false;
      }
    }
  }

  const bool allow_fused = optimizer_step_kernels() == StepPath::fused;
  bool any_fused = false;
  bool any_foreach = false;  // a bucket the fused kernel could not take (another dtype or device)
  std::vector<AdamBucket> buckets;
  for (auto& group : optimizer.param_groups()) {
    auto& options = static_cast<Options&>(group.options());
    const double lr = options.lr();
    const double beta1 = std::get<0>(options.betas());
    const double beta2 = std::get<1>(options.betas());
    const double weight_decay = options.weight_decay();
    const double eps = options.eps();
    const bool amsgrad = options.amsgrad();

    buckets.clear();
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto key = optimizer_state_key<Map>(p);
      auto it = state_map.find(key);
      if (it == state_map.end()) {
        // Lazy state initialization, as the own step does it.
        auto fresh = std::make_unique<State>();
        fresh->step(0);
        fresh->exp_avg(at::zeros_like(p, c10::MemoryFormat::Preserve));
        fresh->exp_avg_sq(at::zeros_like(p, c10::MemoryFormat::Preserve));
        if (amsgrad) fresh->max_exp_avg_sq(at::zeros_like(p, c10::MemoryFormat::Preserve));
        it = state_map.emplace(std::move(key), std::move(fresh)).first;
      }
      auto& state = static_cast<State&>(*it->second);
      state.step(state.step() + 1);

      AdamBucket* bucket = nullptr;
      for (auto& b : buckets) {
        if (b.device == p.device() && b.dtype == p.scalar_type() && b.step == state.step() &&
            !bucket_full(b.device, b.numel)) {
          bucket = &b;
        }
      }
      if (bucket == nullptr) bucket = &buckets.emplace_back(AdamBucket{p.device(), p.scalar_type(), state.step()});
      bucket->fusable = bucket->fusable && fused_layout_ok(p, p) && fused_layout_ok(p, p.grad()) &&
                        fused_layout_ok(p, state.exp_avg()) && fused_layout_ok(p, state.exp_avg_sq()) &&
                        (!amsgrad || fused_layout_ok(p, state.max_exp_avg_sq()));
      bucket->numel += p.numel();
      bucket->params.push_back(p);
      bucket->states.push_back(&state);
      bucket->grads.push_back(p.grad());
      bucket->exp_avgs.push_back(state.exp_avg());
      bucket->exp_avg_sqs.push_back(state.exp_avg_sq());
      if (amsgrad) bucket->max_exp_avg_sqs.push_back(state.max_exp_avg_sq());
    }

    for (auto& b : buckets) {
      const double bias_correction1 = 1 - std::pow(beta1, static_cast<double>(b.step));
      const double bias_correction2 = 1 - std::pow(beta2, static_cast<double>(b.step));
      const double step_size = lr / bias_correction1;
#if FABRIC_HAS_FUSED_ADAM
      if (allow_fused && b.fusable && fused_adam_supported(b.device, b.dtype)) {
        // NOTE: the fused kernels read a float32 step per tensor (already incremented); one shared
        // tensor serves the whole bucket.
        std::vector<at::Tensor> steps;
        if (auto* capturable = capturable_steps()) {
          for (void* state : b.states) {
            auto& t = capturable->steps[state];
            if (!t.defined() && capturable->recording) {
              raise(
                  "captured step: expected every parameter of the captured optimizer to have had a gradient in the "
                  "warm-up steps, found one whose first step is being recorded; raise warmup_steps, or pass "
                  "{{.fallback = true}}");
            }
            if (!t.defined()) {
              // NOTE: created while warming up (eager), never while recording: a graph would refill it.
              t = at::full(at::IntArrayRef{}, static_cast<double>(b.step),
                           at::TensorOptions().dtype(at::kFloat).device(b.device));
              capturable->advance.push_back([s = static_cast<State*>(state)] { s->step(s->step() + 1); });
            } else if (!capturable->recording) {
              t.fill_(static_cast<double>(b.step));
            }
            steps.push_back(t);
          }
          if (capturable->recording) at::_foreach_add_(steps, 1);
        } else {
          const at::Tensor step = at::full(at::IntArrayRef{}, static_cast<double>(b.step),
                                           at::TensorOptions().dtype(at::kFloat).device(b.device));
          steps.assign(b.params.size(), step);
        }
        if constexpr (Decoupled) {
          at::_fused_adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, steps, lr, beta1, beta2,
                            weight_decay, eps, amsgrad, /*maximize=*/false);
        } else {
          at::_fused_adam_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, steps, lr, beta1, beta2,
                           weight_decay, eps, amsgrad, /*maximize=*/false);
        }
        any_fused = true;
        continue;
      }
#endif
      any_foreach = true;
      std::vector<at::Tensor> grads = b.grads;
      if constexpr (Decoupled) {
        if (weight_decay != 0) at::_foreach_mul_(b.params, 1 - lr * weight_decay);
      } else {
        if (weight_decay != 0) grads = at::_foreach_add(grads, b.params, weight_decay);
      }
      at::_foreach_mul_(b.exp_avgs, beta1);
      at::_foreach_add_(b.exp_avgs, grads, 1 - beta1);
      at::_foreach_mul_(b.exp_avg_sqs, beta2);
      at::_foreach_addcmul_(b.exp_avg_sqs, grads, grads, 1 - beta2);
      std::vector<at::Tensor> denoms;
      if (amsgrad) {
        for (std::size_t i = 0; i < b.exp_avg_sqs.size(); ++i) {
          at::max_out(b.max_exp_avg_sqs[i], b.exp_avg_sqs[i], b.max_exp_avg_sqs[i]);
        }
        denoms = at::_foreach_sqrt(b.max_exp_avg_sqs);
      } else {
        denoms = at::_foreach_sqrt(b.exp_avg_sqs);
      }
      at::_foreach_div_(denoms, std::sqrt(bias_correction2));
      at::_foreach_add_(denoms, eps);
      at::_foreach_addcdiv_(b.params, b.exp_avgs, denoms, -step_size);
    }
  }
  // NOTE: fused only when every bucket was: a captured step replays a foreach bucket's host-side bias
  // corrections forever, so a mixed step must not pass for a fused one.
  last_optimizer_step_path() = any_fused && !any_foreach ? StepPath::fused : StepPath::foreach;
  return true;
}

/// Steps SGD (momentum, dampening, nesterov, weight decay) with multi-tensor kernels; returns false,
/// having changed nothing, when something needs the optimizer's own step.
template <class Opt>
bool sgd_foreach_step(Opt& optimizer) {
  using Map = std::remove_cvref_t<decltype(optimizer.state())>;
  auto& state_map = optimizer.state();
  for (auto& group : optimizer.param_groups()) {
    for (auto& p : group.params()) {
      if (p.grad().defined() && !foreach_grad_ok(p)) return false;
    }
  }

  struct Bucket {
    c10::Device device;
    c10::ScalarType dtype;
    std::int64_t numel;
    std::vector<at::Tensor> params, grads, bufs;
  };
  std::vector<Bucket> buckets;
  for (auto& group : optimizer.param_groups()) {
    auto& options = static_cast<torch::optim::SGDOptions&>(group.options());
    const double lr = options.lr();
    const double momentum = options.momentum();
    const double dampening = options.dampening();
    const double weight_decay = options.weight_decay();
    const bool nesterov = options.nesterov();

    buckets.clear();
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      Bucket* bucket = nullptr;
      for (auto& b : buckets) {
        if (b.device == p.device() && b.dtype == p.scalar_type() && !bucket_full(b.device, b.numel)) bucket = &b;
      }
      if (bucket == nullptr) bucket = &buckets.emplace_back(Bucket{p.device(), p.scalar_type(), 0, {}, {}, {}});
      bucket->numel += p.numel();
      bucket->params.push_back(p);
      bucket->grads.push_back(p.grad());
    }

    for (auto& b : buckets) {
      std::vector<at::Tensor> d_p = b.grads;
      if (weight_decay != 0) d_p = at::_foreach_add(d_p, b.params, weight_decay);
      if (momentum != 0) {
        // Buffers that exist are updated in one go; new ones start as a copy of d_p (as in the own step).
        std::vector<at::Tensor> old_bufs, old_d_p;
        b.bufs.resize(b.params.size());
        for (std::size_t i = 0; i < b.params.size(); ++i) {
          auto key = optimizer_state_key<Map>(b.params[i]);
          auto it = state_map.find(key);
          if (it == state_map.end()) {
            b.bufs[i] = at::clone(d_p[i]).detach();
            auto fresh = std::make_unique<torch::optim::SGDParamState>();
            fresh->momentum_buffer(b.bufs[i]);
            state_map.emplace(std::move(key), std::move(fresh));
          } else {
            b.bufs[i] = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
            old_bufs.push_back(b.bufs[i]);
            old_d_p.push_back(d_p[i]);
          }
        }
        if (!old_bufs.empty()) {
          at::_foreach_mul_(old_bufs, momentum);
          at::_foreach_add_(old_bufs, old_d_p, 1 - dampening);
        }
        if (nesterov) {
          d_p = at::_foreach_add(d_p, b.bufs, momentum);
        } else {
          d_p = b.bufs;
        }
      }
      at::_foreach_add_(b.params, d_p, -1 * lr);
    }
  }
  last_optimizer_step_path() = StepPath::foreach;
  return true;
}

/// One optimizer step as fabric::CapturedStep sees it: the optimizer's dynamic type and its kernels.
struct LoggedStep {
  const std::type_info* type;
  StepPath path;
  torch::optim::Optimizer* optimizer;  ///< the optimizer that stepped (its learning rates are checked)
};

/// The optimizer steps of this thread while a captured step warms up (fabric::CapturedStep); null when
/// nothing listens.
inline std::vector<LoggedStep>*& optimizer_step_log() noexcept {
  thread_local std::vector<LoggedStep>* log = nullptr;
  return log;
}

template <class O>
at::Tensor optimizer_step_impl(O& optimizer, torch::optim::Optimizer::LossClosure closure) {
  constexpr bool maybe_adam = std::is_base_of_v<O, torch::optim::Adam>;
  constexpr bool maybe_adamw = std::is_base_of_v<O, torch::optim::AdamW>;
  constexpr bool maybe_sgd = std::is_base_of_v<O, torch::optim::SGD>;
  if constexpr (maybe_adam || maybe_adamw || maybe_sgd) {
    if (closure == nullptr && optimizer_step_kernels() != StepPath::own) {
      // NOTE: exact dynamic types only: a subclass may override step().
      const std::type_info& type = typeid(optimizer);
      c10::NoGradGuard no_grad;
      if constexpr (maybe_adam) {
        if (type == typeid(torch::optim::Adam) &&
            adam_foreach_step<false>(static_cast<torch::optim::Adam&>(optimizer))) {
          return {};
        }
      }
      if constexpr (maybe_adamw) {
        if (type == typeid(torch::optim::AdamW) &&
            adam_foreach_step<true>(static_cast<torch::optim::AdamW&>(optimizer))) {
          return {};
        }
      }
      if constexpr (maybe_sgd) {
        if (type == typeid(torch::optim::SGD) && sgd_foreach_step(static_cast<torch::optim::SGD&>(optimizer))) {
          return {};
        }
      }
    }
  }
  last_optimizer_step_path() = StepPath::own;
  return optimizer.step(std::move(closure));
}

/// Steps the optimizer: LibTorch's Adam, AdamW and SGD (exactly these types, no closure) with
/// multi-tensor kernels, everything else with the optimizer's own step(closure). O may be the
/// optimizer's own type (decided at compile time) or a base such as torch::optim::Optimizer
/// (decided from the dynamic type). Set FABRIC_FOREACH_STEP=0 to always use the own step.
///
///     fabric::detail::optimizer_step(adamw, nullptr);   // same result and state as adamw.step()
template <class O>
at::Tensor optimizer_step(O& optimizer, torch::optim::Optimizer::LossClosure closure) {
  at::Tensor loss = optimizer_step_impl(optimizer, std::move(closure));
  if (auto* log = optimizer_step_log()) {
    log->push_back({&typeid(optimizer), last_optimizer_step_path(), static_cast<torch::optim::Optimizer*>(&optimizer)});
  }
  return loss;
}

}  // namespace fabric::detail
