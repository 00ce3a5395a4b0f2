#pragma once
// fabric::BF16Master ("bf16-master"): bfloat16 weights and compute, float32 master weights held by the
// optimizer. The module runs as under BF16True (no autocast, no per-step weight casts); each set-up
// optimizer steps float32 masters of the module's parameters and writes their bfloat16 copies back;
// checkpoints hold the masters.

#include "fabric/core/error.hpp"
#include "fabric/core/options.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/torch_version.hpp"
#include "fabric/detail/zero_grad.hpp"
#include "fabric/optim/foreach_step.hpp"
#include "fabric/precision/half.hpp"
#include "fabric/precision/precision.hpp"
#include "fabric/utils/clip.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/Device.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#if FABRIC_TORCH_FOREACH_COPY
#include <ATen/ops/_foreach_copy.h>
#endif

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {
namespace detail {

/// Copies src[i] into dst[i] for every i, converting the dtype: one multi-tensor kernel where this
/// LibTorch has `_foreach_copy_` (2.1; on CUDA it converts bfloat16 <-> float32 in its fast path), one
/// copy per tensor before.
inline void copy_all(std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  if (dst.empty()) return;
#if FABRIC_TORCH_FOREACH_COPY
  at::_foreach_copy_(dst, src);
#else
  for (std::size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
#endif
}

/// Installs, while it lives, the float32 masters in place of the module parameters they stand for in every
/// checkpoint read or write of this thread (detail::module_tensors).
class CheckpointSubstitutesGuard {
 public:
  explicit CheckpointSubstitutesGuard(const std::unordered_map<const void*, at::Tensor>& substitutes) noexcept
      : previous_(std::exchange(checkpoint_substitutes(), &substitutes)) {}
  ~CheckpointSubstitutesGuard() { checkpoint_substitutes() = previous_; }
  CheckpointSubstitutesGuard(const CheckpointSubstitutesGuard&) = delete;
  CheckpointSubstitutesGuard& operator=(const CheckpointSubstitutesGuard&) = delete;

 private:
  const std::unordered_map<const void*, at::Tensor>* previous_;
};

}  // namespace detail

/// bfloat16 weights and compute with float32 master weights in the optimizer ("bf16-master"), what
/// llm.c and Megatron train with: the module's floating parameters and buffers live in bfloat16, forward
/// runs on them directly (as BF16True: no autocast, no weight casts per step), backward leaves bfloat16
/// gradients on them; each set-up optimizer steps float32 masters instead (its param groups are
/// rewritten to them at setup), with the gradient upcast for the step only, and writes the rounded
/// bfloat16 copies back. Updates smaller than bfloat16's resolution accumulate in the masters, which
/// BF16True loses. Checkpoints hold the masters, so they load into a float32 or bf16-mixed run.
///
/// Memory per parameter with Adam: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (master) + 8 (Adam's moments)
/// = 16 bytes, against bf16-mixed's 4 + 4 + 8 = 16 and bf16-true's 2 + 2 + 4 = 8; the float32 gradient
/// exists only during the step (4 more bytes at its peak).
///
///     fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Master> fabric;
///     auto [model, optimizer] = fabric.setup(net, adamw);   // net: bf16 weights, adamw: fp32 masters
struct BF16Master : TruePrecision<c10::ScalarType::BFloat16> {
  static constexpr std::string_view name = "bf16-master";
  using TruePrecision::TruePrecision;

  /// Returns float32: `init_module` creates the float32 weights that become the masters at setup.
  static constexpr c10::ScalarType param_dtype() noexcept { return c10::ScalarType::Float; }
  /// Returns bfloat16, the dtype forward computes in (what ThroughputMonitor takes the peak FLOP/s of).
  static constexpr c10::ScalarType compute_dtype() noexcept { return c10::ScalarType::BFloat16; }

  /// Refuses at compile time the strategies whose optimizers cannot step masters: FSDP (its optimizer
  /// steps shards of the flat parameters) and DP (replicas per forward). DDP works: its Reducer all-reduces
  /// the bfloat16 gradients (half the bytes of bf16-mixed's float32 ones; each rank upcasts the same sum).
  template <class S>
  static constexpr void check_strategy() noexcept {
    static_assert(S::name != std::string_view("fsdp"),
                  "fabric: bf16-master keeps whole float32 masters in the optimizer, which FSDP shards; use "
                  "BF16Mixed with FSDP (its float32 shards are the masters), or DDP with BF16Master");
    static_assert(S::name != std::string_view("dp"),
                  "fabric: bf16-master is not supported with DP (replicas are made per forward); use DDP or "
                  "SingleDevice with BF16Master");
  }

  /// Converts the module's floating parameters and buffers to bfloat16 in place (parameters keep their
  /// identity) and keeps each parameter's float32 value as its master: the float32 storage itself, no copy.
  template <class M>
  void convert_module(M& module) {
    c10::NoGradGuard no_grad;
    for (const auto& p : module.parameters(/*recurse=*/true)) {
      if (!p.defined() || !p.is_floating_point() || by_param_.count(p.unsafeGetTensorImpl()) != 0) continue;
      at::Tensor master = p.scalar_type() == c10::ScalarType::Float ? p.data() : p.data().to(c10::ScalarType::Float);
      p.set_data(p.data().to(c10::ScalarType::BFloat16));
      add(p, std::move(master));
    }
    for (const auto& b : module.buffers(/*recurse=*/true)) {
      if (b.defined() && b.is_floating_point() && b.scalar_type() != c10::ScalarType::BFloat16) {
        b.set_data(b.to(c10::ScalarType::BFloat16));
      }
    }
  }

  /// Rewrites the optimizer's param groups to the float32 masters of the module parameters they hold
  /// (on the parameters' devices). Refuses an optimizer that has stepped already, or that holds a tensor
  /// that is no parameter of a module this fabric converted, or whose parameter changed since conversion.
  template <class O>
  void setup_optimizer(O& optimizer) {
    torch::optim::Optimizer& opt = optimizer;
    if (!opt.state().empty()) {
      detail::raise(
          "bf16-master: expected an optimizer that has not stepped yet, found one with state for {} parameters; its "
          "state would belong to the bfloat16 parameters, not to the float32 masters: set up the optimizer before "
          "its first step",
          opt.state().size());
    }
    c10::NoGradGuard no_grad;
    std::size_t index = 0;
    std::vector<std::pair<at::Tensor*, std::size_t>> remap;
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        const auto it = by_param_.find(p.unsafeGetTensorImpl());
        if (it == by_param_.end()) {
          detail::raise(
              "bf16-master: the optimizer's parameter {} (shape {}, {}) is not a parameter of a module set up by "
              "this fabric, so it has no float32 master; create the optimizer over the set-up module's parameters "
              "and set up the module first, or together: fabric.setup(model, optimizer)",
              index, detail::shape_str(p.sizes()), c10::toString(p.scalar_type()));
        }
        Entry& e = entries_[it->second];
        if (e.master.device() != e.param.device()) move_master(it->second, e.param.device());
        if (!e.master.to(c10::ScalarType::BFloat16).equal(e.param.data())) {
          detail::raise(
              "bf16-master: the optimizer's parameter {} (shape {}) changed since setup converted it: expected its "
              "bfloat16 weights to be the rounding of the float32 master kept then, found other values; under DDP "
              "rank 0's weights were broadcast and differ from this process's (seed every process the same, "
              "fabric.seed_everything, before building the model); else load weights before setup, or through "
              "fabric.load",
              index, detail::shape_str(p.sizes()));
        }
        remap.emplace_back(&p, it->second);
        ++index;
      }
    }
    for (auto& [p, i] : remap) *p = entries_[i].master;
  }

  /// Resets the gradients of the module parameters behind the optimizer's masters (and any a master
  /// holds): to undefined tensors with set_to_none, else to zeros in place.
  template <class O>
  void zero_grad(O& optimizer, bool set_to_none) {
    torch::optim::Optimizer& opt = optimizer;
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        if (Entry* e = entry_of_master(p)) detail::zero_grad(e->param, set_to_none);
        detail::zero_grad(p, set_to_none);
      }
    }
  }

  /// Clips the bfloat16 gradients of the parameters behind the optimizer's masters before the step, by
  /// value or by total norm (each norm and the total accumulated in float32); returns the float32 total
  /// norm before clipping for max_norm.
  template <class O>
  std::optional<at::Tensor> clip_gradients(O& optimizer, const ClipOptions& options, const c10::Device& device) {
    std::vector<at::Tensor> grads;
    torch::optim::Optimizer& opt = optimizer;
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        const Entry* e = entry_of_master(p);
        const at::Tensor& g = e != nullptr ? e->param.grad() : p.grad();
        if (g.defined()) grads.push_back(g);
      }
    }
    if (options.clip_val) {
      clip_gradients_value(grads, *options.clip_val);
      return std::nullopt;
    }
    return clip_gradients_norm(grads, *options.max_norm, options.norm_type, options.error_if_nonfinite, device,
                               c10::ScalarType::Float);
  }

  /// Steps the masters: gives each the float32 upcast of its parameter's bfloat16 gradient, runs the
  /// optimizer's step on them (fabric's fused or multi-tensor step for Adam, AdamW and SGD), writes the
  /// bfloat16 copies back and drops the float32 gradients. A closure (LBFGS) evaluates the loss on the
  /// copies of the masters it is at, and its gradients are upcast after each evaluation.
  template <class O, class Closure>
  at::Tensor optimizer_step(O& optimizer, Closure&& closure) {
    // NOTE: "in the same pass" would be one kernel reading the bf16 gradient and writing the bf16 copy
    // beside the AdamW update: 28 bytes of traffic per parameter instead of 40 here (upcast: 2 read + 4
    // written; fused AdamW: 16 + 12; copy back: 4 + 2). On an H200 the two copies of GPT-2's 124.5M
    // parameters take 1.08 ms of the 2.14 ms step (fused AdamW on float32 alone: 1.14 ms), 4.6% of the
    // 23.6 ms training step: the most such a kernel could save, against an AdamW of fabric's own to
    // compile (NVRTC or nvcc) and keep identical to LibTorch's. Not worth it yet (README, Precision).
    torch::optim::Optimizer& opt = optimizer;
    std::vector<at::Tensor> params, masters;
    c10::NoGradGuard no_grad;
    upcast_gradients(opt, params, masters);
    at::Tensor loss;
    if constexpr (std::is_same_v<std::decay_t<Closure>, std::nullptr_t>) {
      loss = detail::optimizer_step(optimizer, nullptr);
    } else {
      if (closure == nullptr) {
        loss = detail::optimizer_step(optimizer, nullptr);
      } else {
        torch::optim::Optimizer::LossClosure wrapped = [&]() -> at::Tensor {
          {
            c10::NoGradGuard off;
            write_copies(opt);
          }
          at::Tensor l;
          {
            c10::AutoGradMode grad(true);
            l = closure();
          }
          c10::NoGradGuard off;
          std::vector<at::Tensor> ps, ms;
          upcast_gradients(opt, ps, ms);
          return l;
        };
        loss = detail::optimizer_step(optimizer, std::move(wrapped));
        params.clear();
        masters.clear();
        collect(opt, params, masters, /*with_grad_only=*/false);
      }
    }
    detail::copy_all(params, masters);
    for (auto& m : masters) m.mutable_grad() = at::Tensor();
    return loss;
  }

  /// Runs fn (a save or a load) with the masters standing for their parameters in the checkpoint, so that
  /// a save writes float32 masters and a load restores them; after a load the bfloat16 copies are rewritten
  /// from the masters.
  template <class Fn>
  decltype(auto) checkpoint_scope(bool loads, Fn&& fn) {
    std::unordered_map<const void*, at::Tensor> substitutes;
    substitutes.reserve(entries_.size());
    for (const auto& e : entries_) substitutes.emplace(e.param.unsafeGetTensorImpl(), e.master);
    detail::CheckpointSubstitutesGuard guard(substitutes);
    if constexpr (std::is_void_v<std::invoke_result_t<Fn&>>) {
      fn();
      if (loads) write_all_copies();
    } else {
      auto result = fn();
      if (loads) write_all_copies();
      return result;
    }
  }

  /// Returns the float32 master of a module parameter (undefined when it has none).
  at::Tensor master_of(const at::Tensor& param) const {
    const auto it = by_param_.find(param.unsafeGetTensorImpl());
    return it == by_param_.end() ? at::Tensor() : entries_[it->second].master;
  }

 private:
  struct Entry {
    at::Tensor param;   // the module's bfloat16 parameter
    at::Tensor master;  // its float32 master
  };

  void add(const at::Tensor& param, at::Tensor master) {
    by_master_.emplace(master.unsafeGetTensorImpl(), entries_.size());
    by_param_.emplace(param.unsafeGetTensorImpl(), entries_.size());
    entries_.push_back({param, std::move(master)});
  }
  void move_master(std::size_t i, const c10::Device& device) {
    Entry& e = entries_[i];
    by_master_.erase(e.master.unsafeGetTensorImpl());
    e.master = e.master.to(device);
    by_master_.emplace(e.master.unsafeGetTensorImpl(), i);
  }
  Entry* entry_of_master(const at::Tensor& t) {
    const auto it = by_master_.find(t.unsafeGetTensorImpl());
    return it == by_master_.end() ? nullptr : &entries_[it->second];
  }
  /// Collects the (parameter, master) pairs of the optimizer's masters (those whose parameter has a
  /// gradient, with with_grad_only).
  void collect(torch::optim::Optimizer& opt, std::vector<at::Tensor>& params, std::vector<at::Tensor>& masters,
               bool with_grad_only) {
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        Entry* e = entry_of_master(p);
        if (e == nullptr || (with_grad_only && !e->param.grad().defined())) continue;
        params.push_back(e->param);
        masters.push_back(p);
      }
    }
  }
  /// Gives each master whose parameter has a gradient a float32 copy of it (one multi-tensor copy); the
  /// others lose theirs, so that the step skips them.
  void upcast_gradients(torch::optim::Optimizer& opt, std::vector<at::Tensor>& params,
                        std::vector<at::Tensor>& masters) {
    collect(opt, params, masters, /*with_grad_only=*/true);
    std::vector<at::Tensor> dst, src;
    dst.reserve(masters.size());
    src.reserve(masters.size());
    for (std::size_t i = 0; i < masters.size(); ++i) {
      const at::Tensor& g = params[i].grad();
      if (g.layout() != c10::kStrided || g.is_sparse()) {
        detail::raise(
            "bf16-master: expected dense gradients, found a {} gradient on a parameter of shape {}; use dense "
            "gradients (e.g. Embedding without sparse) with bf16-master",
            g.is_sparse() ? "sparse" : "non-strided", detail::shape_str(params[i].sizes()));
      }
      dst.push_back(at::empty_like(masters[i], c10::MemoryFormat::Preserve));
      src.push_back(g);
    }
    detail::copy_all(dst, src);
    for (auto& group : opt.param_groups()) {
      for (auto& p : group.params()) {
        if (entry_of_master(p) != nullptr) p.mutable_grad() = at::Tensor();
      }
    }
    for (std::size_t i = 0; i < masters.size(); ++i) masters[i].mutable_grad() = dst[i];
  }
  /// Writes the bfloat16 copies of all the optimizer's masters.
  void write_copies(torch::optim::Optimizer& opt) {
    std::vector<at::Tensor> params, masters;
    collect(opt, params, masters, /*with_grad_only=*/false);
    detail::copy_all(params, masters);
  }
  /// Writes the bfloat16 copies of every master (after a load).
  void write_all_copies() {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> params, masters;
    for (const auto& e : entries_) {
      params.push_back(e.param);
      masters.push_back(e.master);
    }
    detail::copy_all(params, masters);
  }

  std::vector<Entry> entries_{};
  std::unordered_map<const void*, std::size_t> by_param_{};
  std::unordered_map<const void*, std::size_t> by_master_{};
};

}  // namespace fabric
