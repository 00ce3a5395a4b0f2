#pragma once
// What the checkpoint formats share about LibTorch's modules and optimizers: a module's tensors under
// their dotted names, an optimizer's C++ type and parameters, and the checks and restore of an
// optimizer's LibTorch archive (Optimizer::save), which both fabric's checkpoints and torch::save
// files carry.

#include "fabric/core/error.hpp"
#include "fabric/detail/zip_check.hpp"
#include "fabric/utils/apply.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#if __has_include(<cxxabi.h>)
#include <cxxabi.h>
#define FABRIC_HAS_CXXABI 1
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric::detail {

/// The tensors that checkpoints of this thread read and write in place of module parameters (by the
/// parameter's TensorImpl) while a precision with master weights saves or loads (fabric::BF16Master's
/// float32 masters); null otherwise.
inline const std::unordered_map<const void*, at::Tensor>*& checkpoint_substitutes() noexcept {
  thread_local const std::unordered_map<const void*, at::Tensor>* substitutes = nullptr;
  return substitutes;
}

/// A module's parameters and buffers under their dotted names (undefined tensors are left out, as
/// torch::save leaves them out); a parameter with a checkpoint substitute is that tensor.
inline std::vector<std::pair<std::string, at::Tensor>> module_tensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto* substitutes = checkpoint_substitutes();
  for (const auto& p : module.named_parameters(true)) {
    if (!p.value().defined()) continue;
    if (substitutes != nullptr) {
      if (const auto it = substitutes->find(p.value().unsafeGetTensorImpl()); it != substitutes->end()) {
        out.emplace_back(p.key(), it->second);
        continue;
      }
    }
    out.emplace_back(p.key(), p.value());
  }
  for (const auto& b : module.named_buffers(true)) {
    if (b.value().defined()) out.emplace_back(b.key(), b.value());
  }
  return out;
}

/// The dynamic type of an optimizer as written in C++, e.g. "torch::optim::AdamW".
inline std::string optimizer_type(const torch::optim::Optimizer& optimizer) {
  const char* mangled = typeid(optimizer).name();
#ifdef FABRIC_HAS_CXXABI
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  if (status == 0 && demangled) return demangled.get();
#endif
  return mangled;
}

inline std::vector<at::Tensor> optimizer_params(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> out;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) out.push_back(p);
  }
  return out;
}

/// Names the kind of a value for messages ("a tensor", "a dictionary", ...).
inline std::string describe(const c10::IValue& v) {
  if (v.isNone()) return "nothing (None)";
  if (v.isBool()) return "a boolean";
  if (v.isInt()) return "an integer";
  if (v.isDouble()) return "a floating-point number";
  if (v.isString()) return "a string";
  if (v.isTensor()) return "a tensor";
  if (v.isGenericDict()) return "a dictionary";
  if (v.isList()) return "a list";
  if (v.isTuple()) return "a tuple";
  if (v.isObject()) return "an object";
  return std::string("a value of kind ") + v.tagKind();
}

// ---- optimizers ---------------------------------------------------------------------------------
//
// An optimizer's state travels as its LibTorch archive (Optimizer::save): "pytorch_version", "state"
// (per-parameter states under the TensorImpl keys of the saving process) and "param_groups" (their
// sizes, those keys, and each group's options).

inline std::string with_label(const std::string& label, const std::string& text) {
  return label.empty() ? text : label + ": " + text;
}

/// Loads an archive from bytes held in a checkpoint (an optimizer's or a sampler's LibTorch archive),
/// validating them first: LibTorch's in-memory zip reader trusts the offsets it finds.
inline void load_archive_bytes(torch::serialize::InputArchive& archive, const char* data, std::size_t size,
                               std::string_view what) {
  (void)check_torch_zip(data, size, what);
  archive.load_from(data, size);
}

/// The names of an optimizer's options (lr, betas, ...): they tell optimizer types apart in archives.
inline std::vector<std::string> option_names(const torch::optim::OptimizerOptions& options) {
  torch::serialize::OutputArchive out;
  options.serialize(out);
  std::vector<char> bytes;
  out.save_to([&](const void* data, std::size_t n) {
    bytes.insert(bytes.end(), static_cast<const char*>(data), static_cast<const char*>(data) + n);
    return n;
  });
  torch::serialize::InputArchive in;
  in.load_from(bytes.data(), bytes.size());
  auto names = in.keys();
  std::sort(names.begin(), names.end());
  return names;
}

inline std::int64_t archive_int(torch::serialize::InputArchive& archive, const std::string& key) {
  c10::IValue v;
  archive.read(key, v);
  if (v.isTensor()) return v.toTensor().item<std::int64_t>();
  return v.toInt();
}

/// Checks an optimizer archive against an optimizer before anything is loaded: the parameter groups
/// and their sizes, the option names (the optimizer type) and the shapes of per-parameter state
/// tensors. Appends every problem to errors; `where` names the source ("the file", "the checkpoint").
inline void check_optimizer_archive(const std::string& label, torch::serialize::InputArchive& archive,
                                    const torch::optim::Optimizer& optimizer, const char* where,
                                    std::vector<std::string>& errors) {
  try {
    c10::IValue version_value;
    torch::serialize::InputArchive groups_archive;
    if (!archive.try_read("pytorch_version", version_value) || !archive.try_read("param_groups", groups_archive)) {
      errors.push_back(with_label(
          label,
          fmt::format("expected an optimizer's state as torch::save(optimizer, path) writes it, found an archive "
                      "without \"pytorch_version\" and \"param_groups\" in {} (a module's archive, or one "
                      "from LibTorch before 1.5)",
                      where)));
      return;
    }
    const auto& groups = optimizer.param_groups();
    const std::int64_t group_count = archive_int(groups_archive, "param_groups/size");
    if (group_count != static_cast<std::int64_t>(groups.size())) {
      errors.push_back(with_label(label, fmt::format("expected {} parameter group{}, found {} in {}", groups.size(),
                                                     groups.size() == 1 ? "" : "s", group_count, where)));
      return;
    }
    torch::serialize::InputArchive state_archive;
    const bool has_state = archive.try_read("state", state_archive);
    // LBFGS keeps whole-model state (flat gradients, histories) under its first parameter.
    const bool per_parameter_state = dynamic_cast<const torch::optim::LBFGS*>(&optimizer) == nullptr;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      torch::serialize::InputArchive group_archive;
      groups_archive.read("param_groups/" + std::to_string(g), group_archive);
      const auto& params = groups[g].params();
      const std::int64_t count = archive_int(group_archive, "params/size");
      if (count != static_cast<std::int64_t>(params.size())) {
        errors.push_back(with_label(label, fmt::format("parameter group {}: expected {} parameters, found {} in {}", g,
                                                       params.size(), count, where)));
        continue;
      }
      torch::serialize::InputArchive options_archive;
      group_archive.read("options", options_archive);
      auto found_names = options_archive.keys();
      std::sort(found_names.begin(), found_names.end());
      const auto expected_names = option_names(groups[g].options());
      if (found_names != expected_names) {
        errors.push_back(with_label(
            label, fmt::format("parameter group {}: expected the options of a {} ({}), found options named {} in {}; "
                               "the state was saved from another type of optimizer",
                               g, optimizer_type(optimizer), fmt::join(expected_names, ", "),
                               fmt::join(found_names, ", "), where)));
        continue;
      }
      if (!has_state || !per_parameter_state) continue;
      for (std::size_t j = 0; j < params.size(); ++j) {
        c10::IValue old_key;
        group_archive.read("params/" + std::to_string(j), old_key);
        torch::serialize::InputArchive param_state;
        if (!old_key.isString() || !state_archive.try_read(old_key.toStringRef(), param_state)) continue;
        for (const auto& name : param_state.keys()) {
          c10::IValue v;
          param_state.read(name, v);
          if (!v.isTensor() || !v.toTensor().defined() || v.toTensor().dim() == 0) continue;
          if (v.toTensor().sizes() != params[j].sizes()) {
            errors.push_back(with_label(
                label,
                fmt::format("parameter {} of group {}: expected state of shape {}, found \"{}\" of shape {} in {}", j,
                            g, shape_str(params[j].sizes()), name, shape_str(v.toTensor().sizes()), where)));
          }
        }
      }
    }
  } catch (const c10::Error& e) {
    errors.push_back(with_label(label, fmt::format("the optimizer state in {} is malformed ({})", where,
                                                   first_line(e.what_without_backtrace()))));
  }
}

/// What an optimizer held before a load, to put back if a later step fails.
struct OptimizerBackup {
  using StateMap = std::remove_reference_t<decltype(std::declval<torch::optim::Optimizer&>().state())>;
  torch::optim::Optimizer* optimizer = nullptr;
  StateMap state{};
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options{};

  void restore() {
    optimizer->state() = std::move(state);
    for (std::size_t g = 0; g < options.size(); ++g) optimizer->param_groups()[g].set_options(std::move(options[g]));
  }
};

/// Loads a checked optimizer archive like PyTorch's load_state_dict: the state is replaced (a
/// parameter without saved state has none afterwards) and so are every group's options (lr, ...).
/// On failure the optimizer is put back as it was and the exception propagates.
inline OptimizerBackup load_optimizer_archive(torch::serialize::InputArchive& archive,
                                              torch::optim::Optimizer& optimizer) {
  OptimizerBackup backup;
  backup.optimizer = &optimizer;
  backup.state = std::move(optimizer.state());
  optimizer.state().clear();
  for (auto& group : optimizer.param_groups()) backup.options.push_back(group.options().clone());
  try {
    optimizer.load(archive);
    torch::serialize::InputArchive groups_archive;
    archive.read("param_groups", groups_archive);
    for (std::size_t g = 0; g < optimizer.param_groups().size(); ++g) {
      torch::serialize::InputArchive group_archive;
      groups_archive.read("param_groups/" + std::to_string(g), group_archive);
      torch::serialize::InputArchive options_archive;
      group_archive.read("options", options_archive);
      optimizer.param_groups()[g].options().serialize(options_archive);
    }
  } catch (...) {
    backup.restore();
    throw;
  }
  return backup;
}

/// Ends loading tensors into a module (load_raw of every format): with problems, one fabric::Error that lists
/// them all and changes nothing; otherwise every loaded tensor is copied into its target. `must_match` is what
/// strict = false still checks ("shapes", "shapes and dtypes").
inline void finish_module_load(const std::filesystem::path& path, const std::vector<std::string>& errors,
                               const std::vector<std::pair<at::Tensor, at::Tensor>>& copies, bool strict,
                               std::string_view must_match = "shapes") {
  if (!errors.empty()) {
    std::string rule = fmt::format("{} must match.", must_match);
    if (!strict) rule[0] = static_cast<char>(rule[0] - 'a' + 'A');
    raise("cannot load {} into the module ({} problem{}; nothing was changed):\n  {}\n{}{}", path.string(),
          errors.size(), errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "),
          strict ? "Pass strict = false to skip missing and unexpected tensors; " : "", rule);
  }
  at::NoGradGuard no_grad;
  for (const auto& [target, loaded] : copies) target.copy_(loaded);
}

}  // namespace fabric::detail
