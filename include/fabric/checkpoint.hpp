#pragma once
// Checkpoints: fabric::State (what save/load take), atomic writes, strict and non-strict loading.
//
// A checkpoint is a torch pickle (torch::pickle_save, readable by Python's torch.load with
// weights_only=False) of a dictionary: "__fabric__" holds the format and the kind of every entry;
// a module is a flat dictionary of its parameters and buffers under their dotted names (the keys of
// a PyTorch state_dict); an optimizer is its LibTorch archive plus the shapes of its parameters
// and its C++ type; plain values (integers, floating point, booleans, strings, tensors) are stored
// as they are.
//
// Loading checks everything first (names, shapes, types, optimizer groups and options) and reports
// all problems in one fabric::Error; only then are optimizers restored (undone if one fails),
// followed by modules and values, so a failed load changes nothing.

#include "fabric/device.hpp"
#include "fabric/error.hpp"
#include "fabric/module.hpp"
#include "fabric/optimizer.hpp"
#include "fabric/precision/grad_scaler.hpp"
#include "fabric/version.hpp"

#include <fmt/ranges.h>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/nn/module.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <fcntl.h>
#include <unistd.h>
#if __has_include(<cxxabi.h>)
#include <cxxabi.h>
#define FABRIC_HAS_CXXABI 1
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <typeinfo>
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

/// Writes bytes to path atomically: a temporary file beside it is written, flushed to disk and
/// renamed over the target, so a crash leaves either the old file or the new one, never a mix.
inline void write_atomically(const std::filesystem::path& path, const char* data, std::size_t size) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    raise("expected a file path for the checkpoint, found the directory {}; add a file name", path.string());
  }
  const auto parent = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::filesystem::create_directories(parent, ec);
  if (ec) raise("could not create the directory {} for the checkpoint: {}", parent.string(), ec.message());
  static std::atomic<unsigned> counter{0};
  const auto tmp = std::filesystem::path(
      fmt::format("{}.tmp-{}-{}", path.string(), static_cast<long>(::getpid()), counter.fetch_add(1)));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    raise("could not create {}: {}; check that the directory is writable", tmp.string(), std::strerror(errno));
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    raise("could not {} {}: {}; the previous checkpoint at {} is untouched", what, tmp.string(), std::strerror(err),
          path.string());
  };
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("write");
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("flush");
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    raise("could not close {}: {}", tmp.string(), std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    raise("could not move {} to {}: {}", tmp.string(), path.string(), std::strerror(err));
  }
  const int dir = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

inline std::vector<char> read_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    raise("expected a checkpoint file at {}, found {}; check the path", path.string(),
          std::filesystem::exists(path, ec) ? "something that is not a regular file" : "nothing");
  }
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.eof() && in.fail()) raise("could not read {}", path.string());
  if (bytes.empty()) {
    raise(
        "expected a checkpoint at {}, found an empty file; it was not written by fabric's save (which never "
        "leaves an empty file)",
        path.string());
  }
  return bytes;
}

/// A module's parameters and buffers under their dotted names (undefined tensors are left out, as
/// torch::save leaves them out).
inline std::vector<std::pair<std::string, at::Tensor>> module_tensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters(true)) {
    if (p.value().defined()) out.emplace_back(p.key(), p.value());
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

inline c10::IValue module_to_ivalue(const torch::nn::Module& module) {
  c10::Dict<std::string, at::Tensor> dict;
  for (auto& [name, tensor] : module_tensors(module)) dict.insert(name, tensor.detach());
  return dict;
}

inline std::vector<at::Tensor> optimizer_params(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> out;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) out.push_back(p);
  }
  return out;
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

inline std::vector<char> serialize_state(const State& state) {
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
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
  try {
    return torch::jit::pickle_save(root);
  } catch (const c10::Error& e) {
    raise(
        "could not serialize the state ({}); expected modules, optimizers, integers, floating point, booleans, "
        "strings and dense tensors",
        first_line(e.what_without_backtrace()));
  }
}

/// A parsed checkpoint: the top-level dictionary and the kind of each entry.
struct Checkpoint {
  c10::impl::GenericDict root{c10::StringType::get(), c10::AnyType::get()};
  std::map<std::string, std::string> kinds;
};

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

[[noreturn]] inline void malformed_marker(const std::filesystem::path& path, const std::string& why) {
  raise("the checkpoint {} has a malformed \"{}\" entry ({}); expected a file written by fabric's save, unaltered",
        path.string(), marker_key, why);
}

inline Checkpoint parse_checkpoint(const std::filesystem::path& path) {
  const std::vector<char> bytes = read_file(path);
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    raise(
        "could not read a checkpoint from {}: the file is truncated, corrupt or of another format ({}); "
        "expected a file written by fabric's save (use load_raw for files of torch::save)",
        path.string(), first_line(e.what()));
  }
  if (!value.isGenericDict()) {
    raise(
        "expected a fabric checkpoint at {}, found a torch pickle of {} instead of fabric's dictionary; read it "
        "with torch::pickle_load (or use load_raw for files written by torch::save)",
        path.string(), describe(value));
  }
  Checkpoint ckpt;
  bool marked = false;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString()) {
      raise(
          "expected a fabric checkpoint at {}, found a dictionary with a key that is {}, not a string; it was not "
          "written by fabric's save",
          path.string(), describe(item.key()));
    }
    marked |= item.key().toStringRef() == marker_key;
    ckpt.root.insert(item.key().toStringRef(), item.value());
  }
  if (!marked) {
    raise(
        "expected a fabric checkpoint at {}, found a dictionary without fabric's \"{}\" entry; it was not written "
        "by fabric's save (use load_raw for files written by torch::save)",
        path.string(), marker_key);
  }
  const c10::IValue marker = ckpt.root.at(marker_key);
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
      ckpt.kinds[k.key().toStringRef()] = kind;
    }
  }
  (void)ckpt.root.erase(marker_key);
  return ckpt;
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

// ---- optimizers ---------------------------------------------------------------------------------
//
// An optimizer's state travels as its LibTorch archive (Optimizer::save): "pytorch_version", "state"
// (per-parameter states under the TensorImpl keys of the saving process) and "param_groups" (their
// sizes, those keys, and each group's options).

inline std::string with_label(const std::string& label, const std::string& text) {
  return label.empty() ? text : label + ": " + text;
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

/// Loads a checkpoint into state; see Fabric::load.
inline State load_state(const std::filesystem::path& path, State& state, bool strict) {
  Checkpoint ckpt = parse_checkpoint(path);
  std::vector<std::string> errors;
  std::map<std::string, torch::serialize::InputArchive> archives;
  try {
    for (auto& [key, entry] : state) {
      if (!ckpt.root.contains(key)) {
        if (strict) errors.push_back(fmt::format("\"{}\": missing from the checkpoint", key));
        continue;
      }
      const c10::IValue stored = ckpt.root.at(key);
      const auto kind_it = ckpt.kinds.find(key);
      const std::string stored_kind = kind_it != ckpt.kinds.end() ? kind_it->second : "value";
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
    if (!ckpt.root.contains(key)) continue;
    const c10::IValue stored = ckpt.root.at(key);
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
  for (const auto& item : ckpt.root) {
    const std::string& key = item.key().toStringRef();
    if (!state.contains(key)) rest.emplace(key, StateEntry(item.value()));
  }
  return rest;
}

// ---- load_raw: archives of torch::save ----------------------------------------------------------

/// Appends the dotted names of every tensor in an archive (recursively) to out.
inline void archive_tensor_names(torch::serialize::InputArchive& archive, const std::string& prefix,
                                 std::vector<std::string>& out) {
  for (const auto& key : archive.keys()) {
    torch::serialize::InputArchive sub;
    if (archive.try_read(key, sub)) {
      archive_tensor_names(sub, prefix + key + ".", out);
    } else {
      out.push_back(prefix + key);
    }
  }
}

/// Reads the tensors of a torch::save module archive, recursively, under dotted names.
inline void read_archive_tensors(torch::serialize::InputArchive& archive, const torch::nn::Module& module,
                                 const std::string& prefix, bool strict, std::vector<std::string>& errors,
                                 std::vector<std::pair<at::Tensor, at::Tensor>>& copies) {
  std::set<std::string> known;
  auto read = [&](const std::string& name, const at::Tensor& target, bool is_buffer) {
    known.insert(name);
    if (!target.defined()) return;  // torch::save leaves undefined tensors out
    at::Tensor loaded;
    if (!archive.try_read(name, loaded, is_buffer) || !loaded.defined()) {
      if (strict) errors.push_back(fmt::format("\"{}{}\": missing from the file", prefix, name));
      return;
    }
    if (loaded.sizes() != target.sizes()) {
      errors.push_back(fmt::format("\"{}{}\": expected shape {}, found shape {} in the file", prefix, name,
                                   shape_str(target.sizes()), shape_str(loaded.sizes())));
      return;
    }
    copies.emplace_back(target, loaded);
  };
  for (const auto& p : module.named_parameters(false)) read(p.key(), p.value(), false);
  for (const auto& b : module.named_buffers(false)) read(b.key(), b.value(), true);
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;  // torch::save skips these (e.g. Functional)
    known.insert(child.key());
    torch::serialize::InputArchive sub;
    if (!archive.try_read(child.key(), sub)) {
      if (strict) {
        for (const auto& [name, tensor] : module_tensors(*child.value())) {
          errors.push_back(fmt::format("\"{}{}.{}\": missing from the file", prefix, child.key(), name));
        }
      }
      continue;
    }
    read_archive_tensors(sub, *child.value(), prefix + child.key() + ".", strict, errors, copies);
  }
  if (strict) {
    for (const auto& key : archive.keys()) {
      if (known.contains(key)) continue;
      std::vector<std::string> names;
      torch::serialize::InputArchive sub;
      if (archive.try_read(key, sub)) {
        archive_tensor_names(sub, prefix + key + ".", names);
      } else {
        names.push_back(prefix + key);
      }
      for (const auto& name : names) errors.push_back(fmt::format("\"{}\": in the file but not in the module", name));
    }
  }
}

inline torch::serialize::InputArchive open_archive(const std::filesystem::path& path) {
  (void)read_file(path);  // existence and emptiness checks with fabric's messages
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path.string());
  } catch (const c10::Error& e) {
    raise(
        "could not read {} as a torch::save archive ({}); expected a file written by torch::save (use load for "
        "fabric checkpoints)",
        path.string(), first_line(e.what_without_backtrace()));
  }
  return archive;
}

/// Loads a module from a torch::save file, checking names and shapes before changing anything.
inline void load_raw_module(const std::filesystem::path& path, torch::nn::Module& module, bool strict) {
  auto archive = open_archive(path);
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  try {
    read_archive_tensors(archive, module, "", strict, errors, copies);
  } catch (const c10::Error& e) {
    raise("could not read the module in {} ({}); expected a file written by torch::save(module, path)", path.string(),
          first_line(e.what_without_backtrace()));
  }
  if (!errors.empty()) {
    raise("cannot load {} into the module ({} problem{}; nothing was changed):\n  {}\n{}", path.string(), errors.size(),
          errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "),
          strict ? "Pass strict = false to skip missing and unexpected tensors; shapes must match."
                 : "Shapes must match.");
  }
  at::NoGradGuard no_grad;
  for (auto& [target, loaded] : copies) target.copy_(loaded);
}

/// Loads an optimizer from a torch::save file, checking its groups, type and state shapes first.
inline void load_raw_optimizer(const std::filesystem::path& path, torch::optim::Optimizer& optimizer) {
  auto archive = open_archive(path);
  std::vector<std::string> errors;
  check_optimizer_archive("", archive, optimizer, "the file", errors);
  if (!errors.empty()) {
    raise(
        "cannot load {} into the optimizer ({} problem{}; nothing was changed):\n  {}\nExpected a file written by "
        "torch::save(optimizer, path) for the same type of optimizer over parameters of the same shapes.",
        path.string(), errors.size(), errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "));
  }
  try {
    (void)load_optimizer_archive(archive, optimizer);
  } catch (const c10::Error& e) {
    raise(
        "could not load the optimizer state in {} ({}); nothing was changed; expected a file written by "
        "torch::save(optimizer, path) for an optimizer built the same way",
        path.string(), first_line(e.what_without_backtrace()));
  }
}

}  // namespace detail
}  // namespace fabric
