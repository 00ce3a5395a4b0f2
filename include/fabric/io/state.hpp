#pragma once
// Checkpoint state: fabric::State (what save and load take), its conversion into the dictionary a
// CheckpointIO writes, and its strict or non-strict restore from one.
//
// In the dictionary, "__fabric__" holds the format and the kind of every entry; a module is a flat
// dictionary of its parameters and buffers under their dotted names (the keys of a PyTorch
// state_dict); an optimizer is its LibTorch archive plus the shapes of its parameters and its C++
// type; plain values (integers, floating point, booleans, strings, tensors) are stored as they are.
//
// Loading checks everything first (names, shapes, types, optimizer groups and options) and reports
// all problems in one fabric::Error; only then are optimizers restored (undone if one fails),
// followed by modules and values, so a failed load changes nothing.

#include "fabric/core/error.hpp"
#include "fabric/core/version.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/precision/grad_scaler.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/wrappers/module.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

/// One entry of a checkpoint state: a module, an optimizer or a plain value.
///
/// Modules and optimizers are restored in place. Plain values are replaced in the entry (read them
/// with get<T>()); an entry made from std::ref(variable) also writes the loaded value back into it.
class StateEntry {
 public:
  /// What an entry holds.
  enum class Kind { module, optimizer, value };

  /// Refers to a module: a TORCH_MODULE holder, a shared_ptr or a module object (not copied).
  template <ModuleLike M>
  StateEntry(M& module)
      : kind_(Kind::module), module_(module_pointer(module)) {}  // NOLINT(google-explicit-constructor)
  /// Refers to the module of a set-up wrapper.
  template <class M, class F>
  StateEntry(const Module<M, F>& module) : kind_(Kind::module), module_(module.ptr()) {}  // NOLINT
  /// Refers to an optimizer (not copied).
  template <class O>
  requires std::derived_from<O, torch::optim::Optimizer> StateEntry(O& optimizer)
      : kind_(Kind::optimizer), optimizer_(&optimizer) {}  // NOLINT
  /// Refers to the optimizer of a set-up wrapper.
  template <class O, class F>
  StateEntry(const Optimizer<O, F>& optimizer)
      : kind_(Kind::optimizer), optimizer_(&optimizer.optimizer()) {}  // NOLINT
  /// Refers to an optimizer held by a std::shared_ptr (not copied; the pointer must outlive the entry).
  template <class O>
  requires std::derived_from<O, torch::optim::Optimizer> StateEntry(const std::shared_ptr<O>& optimizer)
      : StateEntry(optimizer.get(), "std::shared_ptr") {}  // NOLINT
  /// Refers to an optimizer held by a std::unique_ptr (not copied; the pointer must outlive the entry).
  template <class O, class D>
  requires std::derived_from<O, torch::optim::Optimizer> StateEntry(const std::unique_ptr<O, D>& optimizer)
      : StateEntry(optimizer.get(), "std::unique_ptr") {}  // NOLINT
  /// Holds a tensor.
  StateEntry(at::Tensor value) : value_(std::move(value)) {}  // NOLINT
  /// Holds a boolean.
  StateEntry(bool value) : value_(value) {}  // NOLINT
  /// Holds an integer (stored as int64).
  template <std::integral T>
  requires(!std::same_as<T, bool>) StateEntry(T value) : value_(static_cast<std::int64_t>(value)) {}  // NOLINT
  /// Holds a floating-point number (stored as double).
  template <std::floating_point T>
  StateEntry(T value) : value_(static_cast<double>(value)) {}  // NOLINT
  /// Holds a string.
  StateEntry(std::string value) : value_(std::move(value)) {}  // NOLINT
  /// Holds a string.
  StateEntry(const char* value) : value_(std::string(value)) {}  // NOLINT
  /// Holds a value read from a file.
  explicit StateEntry(c10::IValue value) : value_(std::move(value)) {}
  /// Refers to a variable: saves its value, and load writes the loaded value back into it
  /// (std::cref: saved only, never written back).
  template <class T>
  requires(std::is_arithmetic_v<T> || std::same_as<std::remove_const_t<T>, std::string> ||
           std::same_as<std::remove_const_t<T>, at::Tensor>) StateEntry(std::reference_wrapper<T> ref)
      : StateEntry(std::remove_const_t<T>(ref.get())) {  // NOLINT
    if constexpr (!std::is_const_v<T>) {
      write_back_ = [p = &ref.get()](const c10::IValue& v) { *p = StateEntry(v).get<T>(); };
    }
  }

  /// Refers to a gradient scaler: saves its state under PyTorch's keys, and load restores it.
  StateEntry(GradScaler& scaler) : value_(scaler.state_dict()) {  // NOLINT
    write_back_ = [p = &scaler](const c10::IValue& v) { p->load_state_dict(v.toGenericDict()); };
  }

  /// Returns what the entry holds.
  Kind kind() const noexcept { return kind_; }
  /// Returns the plain value (for entries that hold one).
  const c10::IValue& value() const noexcept { return value_; }
  /// Returns the module an entry refers to.
  const std::shared_ptr<torch::nn::Module>& module() const noexcept { return module_; }
  /// Returns the optimizer an entry refers to.
  torch::optim::Optimizer* optimizer() const noexcept { return optimizer_; }

  /// Returns the plain value as T (integer, floating point, bool, std::string or at::Tensor).
  template <class T>
  T get() const {
    if constexpr (std::same_as<T, bool>) {
      if (value_.isBool()) return value_.toBool();
    } else if constexpr (std::integral<T>) {
      if (value_.isInt()) return static_cast<T>(value_.toInt());
    } else if constexpr (std::floating_point<T>) {
      if (value_.isDouble()) return static_cast<T>(value_.toDouble());
      if (value_.isInt()) return static_cast<T>(value_.toInt());
    } else if constexpr (std::same_as<T, std::string>) {
      if (value_.isString()) return value_.toStringRef();
    } else if constexpr (std::same_as<T, at::Tensor>) {
      if (value_.isTensor()) return value_.toTensor();
    } else {
      static_assert(sizeof(T) == 0,
                    "fabric: StateEntry::get<T> supports integers, floating point, bool, "
                    "std::string and at::Tensor; read other values through value()");
    }
    detail::raise(
        "state entry: expected a value of the requested type, found {}; read it with the type it was "
        "saved with",
        value_.tagKind());
  }

 private:
  template <class M>
  static std::shared_ptr<torch::nn::Module> module_pointer(M& m) {
    using U = std::remove_cv_t<M>;
    if constexpr (detail::is_module_holder_v<U>) {
      return m.ptr();
    } else if constexpr (detail::is_module_ptr_v<U>) {
      return m;
    } else {
      return std::shared_ptr<torch::nn::Module>(std::shared_ptr<void>{}, &m);  // non-owning
    }
  }

  StateEntry(torch::optim::Optimizer* optimizer, const char* holder) : kind_(Kind::optimizer), optimizer_(optimizer) {
    if (optimizer == nullptr) {
      detail::raise("state entry: expected an optimizer, found an empty {}; pass the optimizer itself", holder);
    }
  }

  Kind kind_ = Kind::value;
  std::shared_ptr<torch::nn::Module> module_{};
  torch::optim::Optimizer* optimizer_ = nullptr;
  c10::IValue value_{};
  std::function<void(const c10::IValue&)> write_back_{};

 public:
  /// Replaces the plain value (and writes it back to a referenced variable).
  void assign(c10::IValue v) {
    if (write_back_) write_back_(v);
    value_ = std::move(v);
  }
};

/// What save and load take: names to modules, optimizers and plain values.
///
///     fabric::State state{{"model", model}, {"optimizer", optimizer}, {"epoch", epoch}};
using State = std::map<std::string, StateEntry>;

namespace detail {

inline constexpr std::int64_t checkpoint_format = 1;
inline constexpr const char* marker_key = "__fabric__";

inline const char* kind_name(StateEntry::Kind k) {
  switch (k) {
    case StateEntry::Kind::module:
      return "module";
    case StateEntry::Kind::optimizer:
      return "optimizer";
    default:
      return "value";
  }
}

inline c10::IValue module_to_ivalue(const torch::nn::Module& module) {
  c10::Dict<std::string, at::Tensor> dict;
  for (auto& [name, tensor] : module_tensors(module)) dict.insert(name, tensor.detach());
  return dict;
}

inline c10::IValue optimizer_to_ivalue(const std::string& key, const torch::optim::Optimizer& optimizer) {
  std::vector<char> bytes;
  try {
    torch::serialize::OutputArchive archive;
    optimizer.save(archive);
    archive.save_to([&](const void* data, std::size_t n) {
      bytes.insert(bytes.end(), static_cast<const char*>(data), static_cast<const char*>(data) + n);
      return n;
    });
  } catch (const c10::Error& e) {
    raise("state entry \"{}\": LibTorch could not serialize this {} ({}); nothing was written", key,
          optimizer_type(optimizer), first_line(e.what_without_backtrace()));
  }
  at::Tensor blob = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  std::memcpy(blob.data_ptr(), bytes.data(), bytes.size());
  c10::impl::GenericList shapes(c10::ListType::ofInts());
  for (const auto& p : optimizer_params(optimizer)) shapes.push_back(c10::List<std::int64_t>(p.sizes().vec()));
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  dict.insert("archive", blob);
  dict.insert("shapes", shapes);
  dict.insert("type", optimizer_type(optimizer));
  return dict;
}

/// Converts a state into the dictionary a CheckpointIO writes: modules as {dotted name: tensor},
/// optimizers as their archive, values as they are, and the "__fabric__" entry with the kinds.
inline Checkpoint to_checkpoint(const State& state) {
  Checkpoint root(c10::StringType::get(), c10::AnyType::get());
  c10::Dict<std::string, std::string> kinds;
  for (const auto& [key, entry] : state) {
    if (key == marker_key) raise("the state key \"{}\" is reserved; rename that entry", key);
    switch (entry.kind()) {
      case StateEntry::Kind::module:
        root.insert(key, module_to_ivalue(*entry.module()));
        break;
      case StateEntry::Kind::optimizer:
        root.insert(key, optimizer_to_ivalue(key, *entry.optimizer()));
        break;
      case StateEntry::Kind::value:
        if (entry.value().isNone()) raise("state entry \"{}\" holds no value; give it one or remove it", key);
        if (entry.value().isTensor() && !entry.value().toTensor().defined()) {
          raise("state entry \"{}\" holds an undefined tensor; expected a defined tensor, give it one or remove it",
                key);
        }
        root.insert(key, entry.value());
        break;
    }
    kinds.insert(key, kind_name(entry.kind()));
  }
  c10::impl::GenericDict marker(c10::StringType::get(), c10::AnyType::get());
  marker.insert("format", checkpoint_format);
  marker.insert("version", std::string(version()));
  marker.insert("kinds", kinds);
  root.insert(marker_key, marker);
  return root;
}

[[noreturn]] inline void malformed_marker(const std::filesystem::path& path, const std::string& why) {
  raise("the checkpoint {} has a malformed \"{}\" entry ({}); expected a file written by fabric's save, unaltered",
        path.string(), marker_key, why);
}

/// Checks the "__fabric__" entry of a checkpoint read from path, removes it from root and returns the
/// kind of every entry ("module", "optimizer", "value").
inline std::map<std::string, std::string> take_marker(Checkpoint& root, const std::filesystem::path& path) {
  if (!root.contains(marker_key)) {
    raise(
        "expected a fabric checkpoint at {}, found a dictionary without fabric's \"{}\" entry; it was not written "
        "by fabric's save (use load_raw for files written by torch::save)",
        path.string(), marker_key);
  }
  std::map<std::string, std::string> result;
  const c10::IValue marker = root.at(marker_key);
  if (!marker.isGenericDict()) malformed_marker(path, fmt::format("expected a dictionary, found {}", describe(marker)));
  const auto m = marker.toGenericDict();
  if (!m.contains("format") || !m.at("format").isInt()) malformed_marker(path, "no integer \"format\"");
  if (m.at("format").toInt() > checkpoint_format) {
    raise(
        "the checkpoint {} has format {}, which this fabric ({}) cannot read; expected format <= {}; load it with a "
        "newer fabric",
        path.string(), m.at("format").toInt(), version(), checkpoint_format);
  }
  if (m.contains("kinds")) {
    const c10::IValue kinds = m.at("kinds");
    if (!kinds.isGenericDict())
      malformed_marker(path, fmt::format("\"kinds\" is {}, not a dictionary", describe(kinds)));
    for (const auto& k : kinds.toGenericDict()) {
      if (!k.key().isString() || !k.value().isString()) {
        malformed_marker(path, fmt::format("a kind is {}, not a string", describe(k.value())));
      }
      const std::string& kind = k.value().toStringRef();
      if (kind != "module" && kind != "optimizer" && kind != "value") {
        malformed_marker(path, fmt::format("unknown kind \"{}\" of \"{}\"", kind, k.key().toStringRef()));
      }
      result[k.key().toStringRef()] = kind;
    }
  }
  (void)root.erase(marker_key);
  return result;
}

inline bool same_value_type(const c10::IValue& expected, const c10::IValue& found) {
  if (expected.isDouble()) return found.isDouble() || found.isInt();
  if (expected.isInt()) return found.isInt();
  if (expected.isBool()) return found.isBool();
  if (expected.isString()) return found.isString();
  if (expected.isTensor()) return found.isTensor();
  if (expected.isGenericDict()) {
    if (!found.isGenericDict()) return false;
    // A dictionary entry (e.g. a GradScaler's state) needs the same keys.
    for (const auto& item : expected.toGenericDict()) {
      if (!found.toGenericDict().contains(item.key())) return false;
    }
  }
  return true;
}

/// Checks a module entry against a module; appends every problem to errors.
inline void check_module(const std::string& key, const torch::nn::Module& module, const c10::IValue& stored,
                         bool strict, std::vector<std::string>& errors) {
  if (!stored.isGenericDict()) {
    errors.push_back(fmt::format("\"{}\": expected a module's tensors, found {}", key, describe(stored)));
    return;
  }
  const auto dict = stored.toGenericDict();
  std::set<std::string> seen;
  for (const auto& [name, tensor] : module_tensors(module)) {
    seen.insert(name);
    if (!dict.contains(name)) {
      if (strict) errors.push_back(fmt::format("\"{}.{}\": missing from the checkpoint", key, name));
      continue;
    }
    const c10::IValue& v = dict.at(name);
    if (!v.isTensor() || !v.toTensor().defined()) {
      errors.push_back(fmt::format("\"{}.{}\": expected a tensor, found {}", key, name, describe(v)));
    } else if (v.toTensor().sizes() != tensor.sizes()) {
      errors.push_back(fmt::format("\"{}.{}\": expected shape {}, found shape {} in the checkpoint", key, name,
                                   shape_str(tensor.sizes()), shape_str(v.toTensor().sizes())));
    }
  }
  if (strict) {
    for (const auto& item : dict) {
      if (!item.key().isString()) {
        errors.push_back(
            fmt::format("\"{}\": found a tensor name that is {}, not a string", key, describe(item.key())));
      } else if (!seen.contains(item.key().toStringRef())) {
        errors.push_back(
            fmt::format("\"{}.{}\": in the checkpoint but not in the module", key, item.key().toStringRef()));
      }
    }
  }
}

inline void restore_module(torch::nn::Module& module, const c10::IValue& stored) {
  const auto dict = stored.toGenericDict();
  at::NoGradGuard no_grad;
  for (auto& [name, tensor] : module_tensors(module)) {
    if (dict.contains(name)) tensor.copy_(dict.at(name).toTensor());
  }
}

/// Checks an optimizer entry of a checkpoint; on success its parsed archive goes into archives.
inline void check_optimizer(const std::string& key, const torch::optim::Optimizer& optimizer, const c10::IValue& stored,
                            std::vector<std::string>& errors,
                            std::map<std::string, torch::serialize::InputArchive>& archives) {
  const std::string label = fmt::format("\"{}\"", key);
  if (!stored.isGenericDict()) {
    errors.push_back(fmt::format("{}: expected an optimizer's state, found {}", label, describe(stored)));
    return;
  }
  const auto dict = stored.toGenericDict();
  if (!dict.contains("archive") || !dict.at("archive").isTensor() || !dict.contains("shapes") ||
      !dict.at("shapes").isList()) {
    errors.push_back(fmt::format("{}: expected an optimizer's state, found a dictionary without its archive", label));
    return;
  }
  if (dict.contains("type") && dict.at("type").isString()) {
    const std::string saved = dict.at("type").toStringRef();
    const std::string wanted = optimizer_type(optimizer);
    if (saved != wanted) {
      errors.push_back(
          fmt::format("{}: expected the state of a {}, found the state of a {} in the checkpoint; build "
                      "the optimizer the same way as when it was saved",
                      label, wanted, saved));
      return;
    }
  }
  const auto params = optimizer_params(optimizer);
  const auto shapes = dict.at("shapes").toList();
  if (shapes.size() != params.size()) {
    errors.push_back(fmt::format("{}: expected state for {} parameters, found {} in the checkpoint", label,
                                 params.size(), shapes.size()));
    return;
  }
  const std::size_t before = errors.size();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const c10::IValue shape_value = shapes.get(i);
    if (!shape_value.isIntList()) {
      errors.push_back(fmt::format("{}: parameter {}: the saved shape is {}, not a list of integers", label, i,
                                   describe(shape_value)));
      continue;
    }
    const auto shape = shape_value.toIntVector();
    if (at::IntArrayRef(shape) != params[i].sizes()) {
      errors.push_back(fmt::format("{}: parameter {}: expected shape {}, found shape {} in the checkpoint", label, i,
                                   shape_str(params[i].sizes()), shape_str(shape)));
    }
  }
  if (errors.size() != before) return;
  const at::Tensor blob = dict.at("archive").toTensor().contiguous();
  torch::serialize::InputArchive archive;
  try {
    if (blob.scalar_type() != at::kByte) throw std::runtime_error("the archive is not a byte tensor");
    archive.load_from(static_cast<const char*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel()));
  } catch (const std::exception& e) {
    errors.push_back(
        fmt::format("{}: the optimizer state in the checkpoint is corrupt ({})", label, first_line(e.what())));
    return;
  }
  check_optimizer_archive(label, archive, optimizer, "the checkpoint", errors);
  if (errors.size() == before) archives.emplace(key, std::move(archive));
}

/// Restores state in place from a checkpoint read from path (see Fabric::load): everything is checked
/// first, then optimizers, modules and values are restored; returns the entries state did not ask for.
inline State load_state(Checkpoint root, const std::filesystem::path& path, State& state, bool strict) {
  const auto kinds = take_marker(root, path);
  std::vector<std::string> errors;
  std::map<std::string, torch::serialize::InputArchive> archives;
  try {
    for (auto& [key, entry] : state) {
      if (!root.contains(key)) {
        if (strict) errors.push_back(fmt::format("\"{}\": missing from the checkpoint", key));
        continue;
      }
      const c10::IValue stored = root.at(key);
      const auto kind_it = kinds.find(key);
      const std::string stored_kind = kind_it != kinds.end() ? kind_it->second : "value";
      if (stored_kind != kind_name(entry.kind())) {
        errors.push_back(fmt::format("\"{}\": expected a {}, found a {} in the checkpoint", key,
                                     kind_name(entry.kind()), stored_kind));
        continue;
      }
      switch (entry.kind()) {
        case StateEntry::Kind::module:
          check_module(key, *entry.module(), stored, strict, errors);
          break;
        case StateEntry::Kind::optimizer:
          check_optimizer(key, *entry.optimizer(), stored, errors, archives);
          break;
        case StateEntry::Kind::value:
          if (!same_value_type(entry.value(), stored)) {
            errors.push_back(
                fmt::format("\"{}\": expected {}, found {}", key, describe(entry.value()), describe(stored)));
          }
          break;
      }
    }
  } catch (const c10::Error& e) {
    raise("cannot load {}: the checkpoint is malformed ({}); nothing was changed", path.string(),
          first_line(e.what_without_backtrace()));
  }
  if (!errors.empty()) {
    raise("cannot load {} ({} problem{}; nothing was changed):\n  {}\n{}", path.string(), errors.size(),
          errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "),
          strict ? "Pass strict = false to skip missing and unexpected keys; shapes and types must match."
                 : "Shapes and types must match.");
  }
  // Optimizers first: theirs is the only restore that can still fail, and it is undone if it does.
  std::vector<OptimizerBackup> backups;
  for (auto& [key, entry] : state) {
    const auto archive = archives.find(key);
    if (entry.kind() != StateEntry::Kind::optimizer || archive == archives.end()) continue;
    try {
      backups.push_back(load_optimizer_archive(archive->second, *entry.optimizer()));
    } catch (const c10::Error& e) {
      for (auto it = backups.rbegin(); it != backups.rend(); ++it) it->restore();
      raise(
          "cannot load {}: \"{}\": the optimizer state does not fit this optimizer ({}); nothing was changed; build "
          "the optimizer the same way as when it was saved",
          path.string(), key, first_line(e.what_without_backtrace()));
    }
  }
  for (auto& [key, entry] : state) {
    if (!root.contains(key)) continue;
    const c10::IValue stored = root.at(key);
    switch (entry.kind()) {
      case StateEntry::Kind::module:
        restore_module(*entry.module(), stored);
        break;
      case StateEntry::Kind::optimizer:
        break;
      case StateEntry::Kind::value:
        entry.assign(stored);
        break;
    }
  }
  State rest;
  for (const auto& item : root) {
    const std::string& key = item.key().toStringRef();
    if (!state.contains(key)) rest.emplace(key, StateEntry(item.value()));
  }
  return rest;
}

}  // namespace detail
}  // namespace fabric
