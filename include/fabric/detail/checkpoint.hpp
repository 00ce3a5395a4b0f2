#pragma once
// The autograd Function behind activation checkpointing (fabric::activation_checkpoint, units with
// apply_activation_checkpointing): the forward runs without building a graph; the backward recomputes it
// with the random number generators and autocast as they were, then differentiates the recomputation.
// The tensors the function reads that need gradients (its tensor arguments and a module's parameters) are
// inputs of the Function, so their gradients leave through the outer graph's edges (a parameter's
// AccumulateGrad, where DDP's Reducer hooks wait) and never through a backward of their own.

#include "fabric/core/error.hpp"
#include "fabric/precision/autocast.hpp"
#include "fabric/utils/apply.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/DeviceType.h>
#include <c10/core/GradMode.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <fmt/ranges.h>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fabric::detail {

/// The flag detail::in_recompute() reads (set by activation checkpointing on the thread that recomputes).
inline thread_local bool recompute_flag = false;

/// True on the thread while activation checkpointing recomputes a unit's forward in backward.
inline bool in_recompute() noexcept { return recompute_flag; }

/// Sets detail::in_recompute() while it lives.
class RecomputeGuard {
 public:
  RecomputeGuard() noexcept : prev_(recompute_flag) { recompute_flag = true; }
  ~RecomputeGuard() { recompute_flag = prev_; }
  RecomputeGuard(const RecomputeGuard&) = delete;
  RecomputeGuard& operator=(const RecomputeGuard&) = delete;

 private:
  bool prev_;
};

/// The states of the CPU generator and of the default generators of some devices (CUDA), and putting them
/// back: what makes the recomputation draw the same dropout masks as the forward.
struct RngState {
  at::Tensor cpu;
  std::vector<std::pair<c10::Device, at::Tensor>> devices;

  /// Returns the states now, of the CPU and of the given devices.
  static RngState capture(const std::vector<c10::Device>& devices) {
    RngState s;
    s.cpu = get(at::detail::getDefaultCPUGenerator());
    for (const auto& d : devices) s.devices.emplace_back(d, get(at::globalContext().defaultGenerator(d)));
    return s;
  }
  /// Puts the states back.
  void restore() const {
    set(at::detail::getDefaultCPUGenerator(), cpu);
    for (const auto& [d, state] : devices) set(at::globalContext().defaultGenerator(d), state);
  }
  /// The devices of the generators held.
  std::vector<c10::Device> device_list() const {
    std::vector<c10::Device> out;
    for (const auto& entry : devices) out.push_back(entry.first);
    return out;
  }

 private:
  static at::Tensor get(at::Generator g) {
    std::lock_guard<std::mutex> lock(g.mutex());
    return g.get_state();
  }
  static void set(at::Generator g, const at::Tensor& state) {
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(state);
  }
};

/// The autocast state of the CPU and CUDA at a point (the recomputation runs under it).
struct AutocastState {
  bool cpu = false;
  bool cuda = false;
  c10::ScalarType cpu_dtype = c10::ScalarType::BFloat16;
  c10::ScalarType cuda_dtype = c10::ScalarType::Half;

  static AutocastState capture() {
    return {autocast_enabled(c10::DeviceType::CPU), autocast_enabled(c10::DeviceType::CUDA),
            autocast_dtype(c10::DeviceType::CPU), autocast_dtype(c10::DeviceType::CUDA)};
  }
};

/// What the backward of one checkpointed call needs.
struct CheckpointState : torch::CustomClassHolder {
  /// From the tensor arguments (detached copies) to the output tensors, recomputed with a graph.
  std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)> recompute;
  /// The Function's inputs [0, num_args) are the function's tensor arguments; the rest are parameters.
  std::size_t num_args = 0;
  RngState rng;
  AutocastState autocast;
};

/// Refuses a recomputed graph that reaches a tensor needing a gradient which is not an input (a tensor the
/// function captured): its gradient would be lost without a word.
inline void check_no_captured_tensors(const std::vector<at::Tensor>& roots, const std::vector<at::Tensor>& inputs) {
  using torch::autograd::Node;
  std::unordered_set<const Node*> ours;
  for (const auto& t : inputs) {
    if (auto acc = torch::autograd::impl::try_get_grad_accumulator(t)) ours.insert(acc.get());
  }
  std::unordered_set<const Node*> seen;
  std::vector<Node*> stack;
  for (const auto& r : roots) {
    if (auto fn = r.grad_fn()) stack.push_back(fn.get());
  }
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) continue;
    for (const auto& edge : node->next_edges()) {
      if (!edge.is_valid() || ours.count(edge.function.get()) != 0) continue;
      if (const auto* acc = dynamic_cast<const torch::autograd::AccumulateGrad*>(edge.function.get())) {
        raise(
            "activation checkpointing: the checkpointed function used a tensor of sizes {} that requires grad "
            "and is not among its arguments (a captured tensor, or the parameter of a module it calls), so its "
            "gradient would be lost; pass it as an argument, or checkpoint the module itself "
            "(fabric::activation_checkpoint(module, args...) passes its parameters)",
            acc->variable.sizes());
      }
      stack.push_back(edge.function.get());
    }
  }
}

/// The autograd Function: forward without a graph, backward by recomputation.
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                                                c10::intrusive_ptr<CheckpointState> state,
                                                const std::function<std::vector<at::Tensor>()>& first) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(inputs.vec());
    std::vector<at::Tensor> outputs = first();
    std::vector<at::Tensor> integral;
    for (const auto& o : outputs) {
      if (!at::isFloatingType(o.scalar_type()) && !at::isComplexType(o.scalar_type())) integral.push_back(o);
    }
    ctx->mark_non_differentiable(integral);
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto state = c10::static_intrusive_pointer_cast<CheckpointState>(ctx->saved_data["state"].toCapsule());
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    std::vector<at::Tensor> args(saved.begin(), saved.begin() + static_cast<std::ptrdiff_t>(state->num_args));
    for (auto& t : args) {
      const bool needs = t.requires_grad();
      t = t.detach();
      if (needs) t.requires_grad_(true);
    }
    std::vector<at::Tensor> outputs;
    {
      const RngState now = RngState::capture(state->rng.device_list());
      struct Restore {
        const RngState& s;
        ~Restore() { s.restore(); }
      } restore{now};
      state->rng.restore();
      AutocastGuard cpu(c10::DeviceType::CPU, state->autocast.cpu_dtype, state->autocast.cpu);
      AutocastGuard cuda(c10::DeviceType::CUDA, state->autocast.cuda_dtype, state->autocast.cuda);
      RecomputeGuard recompute;
      c10::AutoGradMode grad_mode(true);
      outputs = state->recompute(args);
    }
    if (outputs.size() != grads.size()) {
      raise(
          "activation checkpointing: the recomputed forward returned {} tensors, the forward {}; the "
          "checkpointed function must compute the same thing each time it runs",
          outputs.size(), grads.size());
    }
    std::vector<at::Tensor> roots, root_grads, wrt;
    std::vector<std::size_t> wrt_index;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (grads[i].defined() && outputs[i].requires_grad()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    for (std::size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor& t = i < args.size() ? args[i] : saved[i];
      if (t.defined() && t.requires_grad()) {
        wrt.push_back(t);
        wrt_index.push_back(i);
      }
    }
    // One gradient per input of forward: the tensors, then the state and the first run (no gradient).
    torch::autograd::variable_list result(saved.size() + 2);
    if (roots.empty() || wrt.empty()) return result;
    check_no_captured_tensors(roots, wrt);
    auto g = torch::autograd::grad(roots, wrt, root_grads, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true);
    for (std::size_t k = 0; k < g.size(); ++k) result[wrt_index[k]] = std::move(g[k]);
    return result;
  }
};

/// Returns the defined tensors of value, in map_tensors order.
template <class T>
std::vector<at::Tensor> defined_tensors_of(const T& value) {
  std::vector<at::Tensor> out;
  for_each_tensor(value, [&](const at::Tensor& t) {
    if (t.defined()) out.push_back(t);
  });
  return out;
}

/// Calls fn(args...) with activation checkpointing: the tensors among args (and inside standard containers of
/// them) and `parameters` are the inputs whose gradients the backward computes by recomputation. Without
/// grad mode, or when no input needs a gradient, it is a plain call.
template <class Fn, class... Args>
auto checkpoint_call(Fn fn, std::vector<at::Tensor> parameters, Args&&... args) {
  using R = std::remove_cvref_t<std::invoke_result_t<Fn&, std::remove_cvref_t<Args>&...>>;
  static_assert(!std::is_void_v<R>,
                "fabric: activation checkpointing needs a function that returns its result (tensors); "
                "return the output instead of writing it into an argument");
  static_assert(std::is_copy_constructible_v<Fn>,
                "fabric: activation checkpointing keeps the function for the backward; pass a copyable one");
  bool needs_grad = false;
  if (c10::GradMode::is_enabled()) {
    auto check = [&](const at::Tensor& t) { needs_grad = needs_grad || (t.defined() && t.requires_grad()); };
    (for_each_tensor(args, check), ...);
    for (const auto& p : parameters) check(p);
  }
  if (!needs_grad) return R(fn(args...));

  using Stored = std::tuple<std::remove_cvref_t<Args>...>;
  auto stored = std::make_shared<Stored>(std::forward<Args>(args)...);
  std::vector<at::Tensor> inputs;
  std::vector<char> defined;
  std::vector<c10::Device> devices;
  auto collect = [&](const at::Tensor& t) {
    defined.push_back(static_cast<char>(t.defined()));
    if (!t.defined()) return;
    inputs.push_back(t);
    if (!t.device().is_cpu() && std::find(devices.begin(), devices.end(), t.device()) == devices.end()) {
      devices.push_back(t.device());
    }
  };
  for_each_tensor(*stored, collect);
  const std::size_t num_args = inputs.size();
  for (auto& p : parameters) {
    if (!p.device().is_cpu() && std::find(devices.begin(), devices.end(), p.device()) == devices.end()) {
      devices.push_back(p.device());
    }
    inputs.push_back(std::move(p));
  }

  auto state = c10::make_intrusive<CheckpointState>();
  state->num_args = num_args;
  state->rng = RngState::capture(devices);
  state->autocast = AutocastState::capture();
  auto strip = [](at::Tensor) { return at::Tensor(); };
  state->recompute = [fn, stored, defined, strip](const std::vector<at::Tensor>& detached) mutable {
    std::size_t k = 0, i = 0;
    auto put = [&](at::Tensor) { return defined[k++] != 0 ? detached[i++] : at::Tensor(); };
    *stored = map_tensors(std::move(*stored), put);
    R r = std::apply(fn, *stored);
    *stored = map_tensors(std::move(*stored), strip);
    return defined_tensors_of(r);
  };
  std::optional<R> result;
  const std::function<std::vector<at::Tensor>()> first = [&] {
    result.emplace(std::apply(fn, *stored));
    return defined_tensors_of(*result);
  };
  const std::vector<at::Tensor> outputs = CheckpointFunction::apply(at::TensorList(inputs), state, first);
  // The tensors of the arguments stay with the saved inputs (which check their versions), not in the copy.
  *stored = map_tensors(std::move(*stored), strip);
  std::size_t i = 0;
  auto put = [&](at::Tensor t) { return t.defined() ? outputs[i++] : t; };
  return map_tensors(std::move(*result), put);
}

}  // namespace fabric::detail
