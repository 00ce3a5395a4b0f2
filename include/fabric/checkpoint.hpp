#pragma once
// Checkpoints: fabric::State (what save/load take), atomic writes, strict and non-strict loading.
//
// A checkpoint is a torch pickle (torch::pickle_save, readable by Python's torch.load with
// weights_only=False) of a dictionary: "__fabric__" holds the format and the kind of every entry;
// a module is a flat dictionary of its parameters and buffers under their dotted names (the keys of
// a PyTorch state_dict); an optimizer is its LibTorch archive plus the shapes of its parameters;
// plain values (integers, floating point, booleans, strings, tensors) are stored as they are.

#include "fabric/device.hpp"
#include "fabric/error.hpp"
#include "fabric/module.hpp"
#include "fabric/optimizer.hpp"
#include "fabric/version.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
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
  StateEntry(M& module) : kind_(Kind::module), module_(module_pointer(module)) {}  // NOLINT(google-explicit-constructor)
  /// Refers to the module of a set-up wrapper.
  template <class M, class F>
  StateEntry(const Module<M, F>& module) : kind_(Kind::module), module_(module.ptr()) {}  // NOLINT
  /// Refers to an optimizer (not copied).
  template <class O>
    requires std::derived_from<O, torch::optim::Optimizer>
  StateEntry(O& optimizer) : kind_(Kind::optimizer), optimizer_(&optimizer) {}  // NOLINT
  /// Refers to the optimizer of a set-up wrapper.
  template <class O, class F>
  StateEntry(const Optimizer<O, F>& optimizer) : kind_(Kind::optimizer), optimizer_(&optimizer.optimizer()) {}  // NOLINT
  /// Holds a tensor.
  StateEntry(at::Tensor value) : value_(std::move(value)) {}  // NOLINT
  /// Holds a boolean.
  StateEntry(bool value) : value_(value) {}  // NOLINT
  /// Holds an integer (stored as int64).
  template <std::integral T>
    requires(!std::same_as<T, bool>)
  StateEntry(T value) : value_(static_cast<std::int64_t>(value)) {}  // NOLINT
  /// Holds a floating-point number (stored as double).
  template <std::floating_point T>
  StateEntry(T value) : value_(static_cast<double>(value)) {}  // NOLINT
  /// Holds a string.
  StateEntry(std::string value) : value_(std::move(value)) {}  // NOLINT
  /// Holds a string.
  StateEntry(const char* value) : value_(std::string(value)) {}  // NOLINT
  /// Holds a value read from a file.
  explicit StateEntry(c10::IValue value) : value_(std::move(value)) {}
  /// Refers to a variable: saves its value, and load writes the loaded value back into it.
  template <class T>
    requires(std::is_arithmetic_v<T> || std::same_as<T, std::string> || std::same_as<T, at::Tensor>)
  StateEntry(std::reference_wrapper<T> ref) : StateEntry(ref.get()) {  // NOLINT
    write_back_ = [p = &ref.get()](const c10::IValue& v) { *p = StateEntry(v).get<T>(); };
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
      static_assert(sizeof(T) == 0, "fabric: StateEntry::get<T> supports integers, floating point, bool, "
                                    "std::string and at::Tensor; read other values through value()");
    }
    detail::raise("state entry: expected a value of the requested type, found {}; read it with the type it was "
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
    case StateEntry::Kind::module: return "module";
    case StateEntry::Kind::optimizer: return "optimizer";
    default: return "value";
  }
}

/// Writes bytes to path atomically: a temporary file beside it is written, flushed to disk and
/// renamed over the target, so a crash leaves either the old file or the new one, never a mix.
inline void write_atomically(const std::filesystem::path& path, const char* data, std::size_t size) {
  std::error_code ec;
  const auto parent = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::filesystem::create_directories(parent, ec);
  if (ec) raise("could not create the directory {} for the checkpoint: {}", parent.string(), ec.message());
  static std::atomic<unsigned> counter{0};
  const auto tmp = std::filesystem::path(
      fmt::format("{}.tmp-{}-{}", path.string(), static_cast<long>(::getpid()), counter.fetch_add(1)));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) raise("could not create {}: {}; check that the directory is writable", tmp.string(), std::strerror(errno));
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
    raise("expected a checkpoint at {}, found an empty file; it was not written by fabric's save (which never "
          "leaves an empty file)",
          path.string());
  }
  return bytes;
}

inline std::vector<std::pair<std::string, at::Tensor>> module_tensors(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters(true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(true)) out.emplace_back(b.key(), b.value());
  return out;
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

inline c10::IValue optimizer_to_ivalue(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::vector<char> bytes;
  archive.save_to([&](const void* data, std::size_t n) {
    bytes.insert(bytes.end(), static_cast<const char*>(data), static_cast<const char*>(data) + n);
    return n;
  });
  at::Tensor blob = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  std::memcpy(blob.data_ptr(), bytes.data(), bytes.size());
  c10::impl::GenericList shapes(c10::ListType::ofInts());
  for (const auto& p : optimizer_params(optimizer)) shapes.push_back(c10::List<std::int64_t>(p.sizes().vec()));
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  dict.insert("archive", blob);
  dict.insert("shapes", shapes);
  return dict;
}

inline std::vector<char> serialize_state(const State& state) {
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  c10::Dict<std::string, std::string> kinds;
  for (const auto& [key, entry] : state) {
    if (key == marker_key) raise("the state key \"{}\" is reserved; rename that entry", key);
    switch (entry.kind()) {
      case StateEntry::Kind::module: root.insert(key, module_to_ivalue(*entry.module())); break;
      case StateEntry::Kind::optimizer: root.insert(key, optimizer_to_ivalue(*entry.optimizer())); break;
      case StateEntry::Kind::value:
        if (entry.value().isNone()) raise("state entry \"{}\" holds no value; give it one or remove it", key);
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
  return torch::jit::pickle_save(root);
}

/// A parsed checkpoint: the top-level dictionary and the kind of each entry.
struct Checkpoint {
  c10::impl::GenericDict root{c10::StringType::get(), c10::AnyType::get()};
  std::map<std::string, std::string> kinds;
};

inline Checkpoint parse_checkpoint(const std::filesystem::path& path) {
  const std::vector<char> bytes = read_file(path);
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    std::string why = e.what();
    if (auto nl = why.find('\n'); nl != std::string::npos) why.resize(nl);
    raise("could not read a checkpoint from {}: the file is truncated, corrupt or of another format ({}); "
          "expected a file written by fabric's save (use load_raw for files of torch::save)",
          path.string(), why);
  }
  if (!value.isGenericDict() || !value.toGenericDict().contains(marker_key)) {
    raise("expected a fabric checkpoint at {}, found a torch file without fabric's \"{}\" entry; use load_raw for "
          "files written by torch::save",
          path.string(), marker_key);
  }
  Checkpoint ckpt;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString()) raise("the checkpoint {} has a non-string key; it was not written by fabric", path.string());
    ckpt.root.insert(item.key().toStringRef(), item.value());
  }
  const c10::IValue marker = ckpt.root.at(marker_key);
  if (!marker.isGenericDict()) raise("the checkpoint {} has a malformed \"{}\" entry", path.string(), marker_key);
  const auto m = marker.toGenericDict();
  if (!m.contains("format") || !m.at("format").isInt() || m.at("format").toInt() > checkpoint_format) {
    raise("the checkpoint {} has a format this fabric ({}) cannot read; expected format <= {}", path.string(),
          version(), checkpoint_format);
  }
  if (m.contains("kinds") && m.at("kinds").isGenericDict()) {
    for (const auto& k : m.at("kinds").toGenericDict()) {
      ckpt.kinds[k.key().toStringRef()] = k.value().toStringRef();
    }
  }
  (void)ckpt.root.erase(marker_key);
  return ckpt;
}

inline std::string describe(const c10::IValue& v) {
  if (v.isInt()) return "an integer";
  if (v.isDouble()) return "a floating-point number";
  if (v.isBool()) return "a boolean";
  if (v.isString()) return "a string";
  if (v.isTensor()) return "a tensor";
  if (v.isGenericDict()) return "a dictionary";
  return std::string("a value of kind ") + v.tagKind();
}

inline bool same_value_type(const c10::IValue& expected, const c10::IValue& found) {
  if (expected.isDouble()) return found.isDouble() || found.isInt();
  if (expected.isInt()) return found.isInt();
  if (expected.isBool()) return found.isBool();
  if (expected.isString()) return found.isString();
  if (expected.isTensor()) return found.isTensor();
  return true;
}

inline std::string shape_str(at::IntArrayRef s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

/// Checks a module entry against a module; appends every problem to errors.
inline void check_module(const std::string& key, const torch::nn::Module& module, const c10::IValue& stored,
                         bool strict, std::vector<std::string>& errors) {
  if (!stored.isGenericDict()) {
    errors.push_back(fmt::format("\"{}\": expected a module's tensors, found {}", key, describe(stored)));
    return;
  }
  const auto dict = stored.toGenericDict();
  std::vector<std::string> seen;
  for (const auto& [name, tensor] : module_tensors(module)) {
    seen.push_back(name);
    if (!dict.contains(name)) {
      if (strict) errors.push_back(fmt::format("\"{}.{}\": missing from the checkpoint", key, name));
      continue;
    }
    const c10::IValue& v = dict.at(name);
    if (!v.isTensor()) {
      errors.push_back(fmt::format("\"{}.{}\": expected a tensor, found {}", key, name, describe(v)));
    } else if (v.toTensor().sizes() != tensor.sizes()) {
      errors.push_back(fmt::format("\"{}.{}\": expected shape {}, found shape {} in the checkpoint", key, name,
                                   shape_str(tensor.sizes()), shape_str(v.toTensor().sizes())));
    }
  }
  if (strict) {
    for (const auto& item : dict) {
      const auto& name = item.key().toStringRef();
      if (std::find(seen.begin(), seen.end(), name) == seen.end()) {
        errors.push_back(fmt::format("\"{}.{}\": in the checkpoint but not in the module", key, name));
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

inline void check_optimizer(const std::string& key, const torch::optim::Optimizer& optimizer,
                            const c10::IValue& stored, std::vector<std::string>& errors) {
  if (!stored.isGenericDict() || !stored.toGenericDict().contains("archive") ||
      !stored.toGenericDict().contains("shapes")) {
    errors.push_back(fmt::format("\"{}\": expected an optimizer's state, found {}", key, describe(stored)));
    return;
  }
  const auto params = optimizer_params(optimizer);
  const auto shapes = stored.toGenericDict().at("shapes").toList();
  if (shapes.size() != params.size()) {
    errors.push_back(fmt::format("\"{}\": expected state for {} parameters, found {} in the checkpoint", key,
                                 params.size(), shapes.size()));
    return;
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto shape = c10::IValue(shapes.get(i)).toIntVector();
    if (at::IntArrayRef(shape) != params[i].sizes()) {
      errors.push_back(fmt::format("\"{}\": parameter {}: expected shape {}, found shape {} in the checkpoint", key,
                                   i, shape_str(params[i].sizes()), shape_str(shape)));
    }
  }
}

inline void restore_optimizer(const std::string& key, torch::optim::Optimizer& optimizer, const c10::IValue& stored) {
  const at::Tensor blob = stored.toGenericDict().at("archive").toTensor().contiguous();
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(static_cast<const char*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel()));
    optimizer.load(archive);
  } catch (const c10::Error& e) {
    raise("\"{}\": the optimizer state in the checkpoint does not fit this optimizer ({}); build the optimizer the "
          "same way as when it was saved",
          key, e.what_without_backtrace());
  }
}

/// Loads a checkpoint into state; see Fabric::load.
inline State load_state(const std::filesystem::path& path, State& state, bool strict) {
  Checkpoint ckpt = parse_checkpoint(path);
  std::vector<std::string> errors;
  for (auto& [key, entry] : state) {
    if (!ckpt.root.contains(key)) {
      if (strict) errors.push_back(fmt::format("\"{}\": missing from the checkpoint", key));
      continue;
    }
    const c10::IValue stored = ckpt.root.at(key);
    const auto kind_it = ckpt.kinds.find(key);
    const std::string stored_kind = kind_it != ckpt.kinds.end() ? kind_it->second : "value";
    if (stored_kind != kind_name(entry.kind())) {
      errors.push_back(fmt::format("\"{}\": expected a {}, found a {} in the checkpoint", key, kind_name(entry.kind()),
                                   stored_kind));
      continue;
    }
    switch (entry.kind()) {
      case StateEntry::Kind::module: check_module(key, *entry.module(), stored, strict, errors); break;
      case StateEntry::Kind::optimizer: check_optimizer(key, *entry.optimizer(), stored, errors); break;
      case StateEntry::Kind::value:
        if (!same_value_type(entry.value(), stored)) {
          errors.push_back(
              fmt::format("\"{}\": expected {}, found {}", key, describe(entry.value()), describe(stored)));
        }
        break;
    }
  }
  if (!errors.empty()) {
    raise("cannot load {} ({} problem{}; nothing was changed):\n  {}\n{}", path.string(), errors.size(),
          errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "),
          strict ? "Pass strict = false to skip missing and unexpected keys." : "Shapes and types must match.");
  }
  for (auto& [key, entry] : state) {
    if (!ckpt.root.contains(key)) continue;
    const c10::IValue stored = ckpt.root.at(key);
    switch (entry.kind()) {
      case StateEntry::Kind::module: restore_module(*entry.module(), stored); break;
      case StateEntry::Kind::optimizer: restore_optimizer(key, *entry.optimizer(), stored); break;
      case StateEntry::Kind::value: entry.assign(stored); break;
    }
  }
  State rest;
  for (const auto& item : ckpt.root) {
    const std::string& key = item.key().toStringRef();
    if (!state.contains(key)) rest.emplace(key, StateEntry(item.value()));
  }
  return rest;
}

/// Reads the tensors of a torch::save module archive, recursively, under dotted names.
inline void read_archive_tensors(torch::serialize::InputArchive& archive, const torch::nn::Module& module,
                                 const std::string& prefix, bool strict, std::vector<std::string>& errors,
                                 std::vector<std::pair<at::Tensor, at::Tensor>>& copies) {
  std::vector<std::string> known;
  auto read = [&](const std::string& name, const at::Tensor& target, bool is_buffer) {
    known.push_back(name);
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
    known.push_back(child.key());
    torch::serialize::InputArchive sub;
    if (!archive.try_read(child.key(), sub)) {
      if (strict) errors.push_back(fmt::format("\"{}{}\": submodule missing from the file", prefix, child.key()));
      continue;
    }
    read_archive_tensors(sub, *child.value(), prefix + child.key() + ".", strict, errors, copies);
  }
  if (strict) {
    for (const auto& key : archive.keys()) {
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        errors.push_back(fmt::format("\"{}{}\": in the file but not in the module", prefix, key));
      }
    }
  }
}

inline torch::serialize::InputArchive open_archive(const std::filesystem::path& path) {
  (void)read_file(path);  // existence and emptiness checks with fabric's messages
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path.string());
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    if (auto nl = why.find('\n'); nl != std::string::npos) why.resize(nl);
    raise("could not read {} as a torch::save archive ({}); expected a file written by torch::save (use load for "
          "fabric checkpoints)",
          path.string(), why);
  }
  return archive;
}

/// Loads a module from a torch::save file, checking names and shapes before changing anything.
inline void load_raw_module(const std::filesystem::path& path, torch::nn::Module& module, bool strict) {
  auto archive = open_archive(path);
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  read_archive_tensors(archive, module, "", strict, errors, copies);
  if (!errors.empty()) {
    raise("cannot load {} into the module ({} problem{}; nothing was changed):\n  {}", path.string(), errors.size(),
          errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "));
  }
  at::NoGradGuard no_grad;
  for (auto& [target, loaded] : copies) target.copy_(loaded);
}

/// Loads an optimizer from a torch::save file.
inline void load_raw_optimizer(const std::filesystem::path& path, torch::optim::Optimizer& optimizer) {
  auto archive = open_archive(path);
  try {
    optimizer.load(archive);
  } catch (const c10::Error& e) {
    raise("could not load the optimizer state in {} ({}); expected a file written by torch::save(optimizer, path) "
          "for an optimizer built the same way",
          path.string(), e.what_without_backtrace());
  }
}

}  // namespace detail
}  // namespace fabric
