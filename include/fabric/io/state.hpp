#pragma once
// Checkpoint state: fabric::State (what save and load take), the Stateful concept (any object with
// state_dict() and load_state_dict(), or a StateAdapter, such as LibTorch's LR schedulers), save's
// per-entry Filters, the conversion into the dictionary a CheckpointIO writes, and the strict or
// non-strict restore from one.
//
// In the dictionary, "__fabric__" holds the format and the kind of every entry; a module is a flat
// dictionary of its parameters and buffers under their dotted names (the keys of a PyTorch
// state_dict); an optimizer is its LibTorch archive plus the shapes of its parameters and its C++
// type; a Stateful object is its state_dict(); plain values (integers, floating point, booleans,
// strings, tensors) are stored as they are.
//
// Loading checks everything first (names, shapes, types, optimizer groups and options) and reports
// all problems in one fabric::Error; only then are optimizers restored, then Stateful objects (both
// undone if one fails, and the error names the entry), followed by modules and values, which cannot
// fail, so a failed load changes nothing.

#include "fabric/core/error.hpp"
#include "fabric/core/version.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/io/checkpoint_io.hpp"
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
#include <torch/optim/schedulers/lr_scheduler.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric {

/// Makes a type Stateful without members of its own (as nlohmann's adl_serializer): a specialization
/// has `static fabric::StateDict state_dict(const T&)` and `static void load_state_dict(T&, const
/// fabric::StateDict&)`. fabric specializes it for LibTorch's LR schedulers.
///
///     template <> struct fabric::StateAdapter<Counter> {
///       static fabric::StateDict state_dict(const Counter& c) {
///         fabric::StateDict d = fabric::make_state_dict();
///         d.insert("n", c.n);
///         return d;
///       }
///       static void load_state_dict(Counter& c, const fabric::StateDict& d) { c.n = d.at("n").toInt(); }
///     };
template <class T>
struct StateAdapter;

namespace detail {

/// What state_dict() may return: PyTorch's shape of a state (string keys) or any dictionary.
template <class D>
concept state_dict_type =
    std::same_as<std::remove_cvref_t<D>, StateDict> || std::same_as<std::remove_cvref_t<D>, c10::impl::GenericDict>;
/// load_state_dict takes the state as a StateDict.
template <class T>
concept loads_state_dict = requires(T& object, const StateDict& dict) {
  object.load_state_dict(dict);
};
/// load_state_dict takes the state as a GenericDict (what fabric::GradScaler takes).
template <class T>
concept loads_generic_dict = requires(T& object, const c10::impl::GenericDict& dict) {
  object.load_state_dict(dict);
};
/// The object has PyTorch's two members: state_dict() const and load_state_dict(state).
template <class T>
concept has_state_dict_members = requires(const T& object) {
  { object.state_dict() } -> state_dict_type;
}
&&(loads_state_dict<T> || loads_generic_dict<T>);
/// A StateAdapter<T> specialization saves and restores the object.
template <class T>
concept has_state_adapter = requires(const T& saved, T& loaded, const StateDict& dict) {
  { StateAdapter<T>::state_dict(saved) } -> std::same_as<StateDict>;
  StateAdapter<T>::load_state_dict(loaded, dict);
};

}  // namespace detail

/// An object whose state save writes and load restores in place, as Lightning saves any object with
/// `state_dict()` and `load_state_dict()`: members `state_dict() const` returning fabric::StateDict (or
/// a c10::impl::GenericDict) and `load_state_dict(const fabric::StateDict&)` (or of a GenericDict), or a
/// fabric::StateAdapter<T> specialization.
template <class T>
concept Stateful = detail::has_state_dict_members<T> || detail::has_state_adapter<T>;

namespace detail {

/// Reaches LibTorch's protected LRScheduler::step_count_ through a member pointer named in a derived
/// class; it is a scheduler's only state (the learning rates live in the optimizer's state).
struct LRSchedulerAccess : torch::optim::LRScheduler {
  static unsigned& step_count(torch::optim::LRScheduler& scheduler) {
    return scheduler.*(&LRSchedulerAccess::step_count_);
  }
};

}  // namespace detail

/// LibTorch's LR schedulers (torch::optim::StepLR and every LRScheduler subclass) as Stateful: their
/// state is the number of steps taken, under "step_count" (PyTorch's schedulers call it last_epoch).
template <class T>
requires std::derived_from<T, torch::optim::LRScheduler>
struct StateAdapter<T> {
  static StateDict state_dict(const T& scheduler) {
    StateDict dict = make_state_dict();
    dict.insert("step_count",
                static_cast<std::int64_t>(detail::LRSchedulerAccess::step_count(const_cast<T&>(scheduler))));
    return dict;
  }
  static void load_state_dict(T& scheduler, const StateDict& dict) {
    if (!dict.contains("step_count") || !dict.at("step_count").isInt() || dict.at("step_count").toInt() < 0) {
      detail::raise(
          "LR scheduler: expected a non-negative integer \"step_count\" in the scheduler state, found {}; pass a "
          "state saved from an LR scheduler",
          dict.contains("step_count") ? detail::describe(dict.at("step_count")) : std::string("none"));
    }
    detail::LRSchedulerAccess::step_count(scheduler) = static_cast<unsigned>(dict.at("step_count").toInt());
  }
};

namespace detail {

/// A dictionary read from a file as a StateDict; a key that is not a string is an error.
inline StateDict to_state_dict(const c10::impl::GenericDict& dict) {
  StateDict out = make_state_dict();
  for (const auto& item : dict) {
    if (!item.key().isString()) {
      raise("expected a state with string keys, found a key that is {}; save it from a Stateful object",
            describe(item.key()));
    }
    out.insert(item.key().toStringRef(), item.value());
  }
  return out;
}

template <Stateful T>
c10::IValue stateful_save(const T& object) {
  if constexpr (has_state_dict_members<T>) {
    return c10::IValue(object.state_dict());
  } else {
    return c10::IValue(StateAdapter<T>::state_dict(object));
  }
}

template <Stateful T>
void stateful_load(T& object, const c10::impl::GenericDict& dict) {
  if constexpr (has_state_dict_members<T>) {
    if constexpr (loads_generic_dict<T>) {
      object.load_state_dict(dict);
    } else {
      object.load_state_dict(to_state_dict(dict));
    }
  } else {
    StateAdapter<T>::load_state_dict(object, to_state_dict(dict));
  }
}

/// The state's object is the process's (fabric::RngState): an entry may hold a temporary of it.
template <class T>
concept global_stateful = Stateful<T> && requires {
  requires T::global_state;
};

}  // namespace detail

/// One entry of a checkpoint state: a module, an optimizer, a Stateful object or a plain value.
///
/// Modules, optimizers and Stateful objects are restored in place. Plain values are replaced in the
/// entry (read them with get<T>()); an entry made from std::ref(variable) also writes the loaded value
/// back into it.
class StateEntry {
 public:
  /// What an entry holds.
  enum class Kind { module, optimizer, stateful, value };

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

  /// Refers to a Stateful object (an LR scheduler, the set-up loader, a fabric::GradScaler, one's own):
  /// save writes its state_dict() and load calls its load_state_dict() (not copied; a const object is
  /// saved only).
  template <class T>
  requires(Stateful<std::remove_const_t<T>> && !ModuleLike<T> &&
           !std::derived_from<std::remove_const_t<T>, torch::optim::Optimizer>) StateEntry(T& object)  // NOLINT
      : kind_(Kind::stateful) {
    refer_to(&object);
  }
  /// Holds a temporary of a Stateful type whose state is the process's, e.g. `{"rng", fabric::RngState{}}`.
  template <class T>
  requires(!std::is_lvalue_reference_v<T> && Stateful<T>) StateEntry(T&& object)  // NOLINT
      : kind_(Kind::stateful) {
    static_assert(detail::global_stateful<T>,
                  "fabric: a Stateful state entry refers to its object, which save reads and load restores in place; "
                  "pass a named object (an lvalue), not a temporary");
    auto owned = std::make_shared<T>(std::move(object));
    refer_to(owned.get());
    owner_ = std::move(owned);
  }
  /// Refers to a Stateful object held by a std::shared_ptr (shares it).
  template <class T>
  requires(Stateful<std::remove_const_t<T>> && !ModuleLike<std::shared_ptr<T>>)
      StateEntry(const std::shared_ptr<T>& object)  // NOLINT
      : kind_(Kind::stateful) {
    if (!object)
      detail::raise("state entry: expected a Stateful object, found an empty std::shared_ptr; pass the object");
    refer_to(object.get());
    owner_ = object;
  }

  /// Returns what the entry holds.
  Kind kind() const noexcept { return kind_; }
  /// Returns the plain value (for entries that hold one).
  const c10::IValue& value() const noexcept { return value_; }
  /// Returns the module an entry refers to.
  const std::shared_ptr<torch::nn::Module>& module() const noexcept { return module_; }
  /// Returns the optimizer an entry refers to.
  torch::optim::Optimizer* optimizer() const noexcept { return optimizer_; }
  /// Returns the state of the Stateful object an entry refers to (its state_dict() now).
  c10::IValue state_dict() const { return save_state_(); }
  /// Says whether load can restore the Stateful object (it is not const).
  bool restorable() const noexcept { return static_cast<bool>(load_state_); }
  /// Restores the Stateful object an entry refers to; a const object is an error.
  void load_state_dict(const c10::impl::GenericDict& dict) const {
    if (!load_state_) {
      detail::raise("state entry: the object is const, so load cannot restore it; pass it non-const to load into it");
    }
    load_state_(dict);
  }

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

  template <class T>
  void refer_to(T* object) {
    save_state_ = [object] { return detail::stateful_save<std::remove_const_t<T>>(*object); };
    if constexpr (!std::is_const_v<T>) {
      load_state_ = [object](const c10::impl::GenericDict& dict) { detail::stateful_load(*object, dict); };
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
  std::function<c10::IValue()> save_state_{};
  std::function<void(const c10::impl::GenericDict&)> load_state_{};
  std::shared_ptr<void> owner_{};

 public:
  /// Replaces the plain value (and writes it back to a referenced variable).
  void assign(c10::IValue v) {
    if (write_back_) write_back_(v);
    value_ = std::move(v);
  }
};

/// What save and load take: names to modules, optimizers, Stateful objects and plain values.
///
///     fabric::State state{{"model", model}, {"optimizer", optimizer}, {"scheduler", scheduler},
///                         {"loader", loader}, {"rng", fabric::RngState{}}, {"epoch", epoch}};
using State = std::map<std::string, StateEntry>;

/// Chooses what save writes of one state entry, as a callable of Lightning's `save(filter=...)`: it is
/// called with each item of the entry's state (a module's tensors under their dotted names, the keys
/// of a Stateful object's state_dict() or of a dictionary value) and returns whether to keep it. It
/// takes `(std::string_view name, const c10::IValue& value)`, or `(std::string_view, const at::Tensor&)`
/// for entries of tensors only.
class Filter {
 public:
  /// Wraps a predicate over (name, value).
  template <class F>
  requires std::is_invocable_r_v<bool, F&, std::string_view, const c10::IValue&> Filter(F predicate)  // NOLINT
      : predicate_(std::move(predicate)) {}
  /// Wraps a predicate over (name, tensor); an item that is not a tensor is an error at save.
  template <class F>
  requires(!std::is_invocable_r_v<bool, F&, std::string_view, const c10::IValue&> &&
           std::is_invocable_r_v<bool, F&, std::string_view, const at::Tensor&>) Filter(F predicate)  // NOLINT
      : predicate_([predicate = std::move(predicate)](std::string_view name, const c10::IValue& value) mutable {
          if (!value.isTensor()) {
            detail::raise(
                "save: the filter takes tensors, but the item \"{}\" is {}; write the filter over "
                "(std::string_view, const c10::IValue&)",
                name, detail::describe(value));
          }
          return static_cast<bool>(predicate(name, value.toTensor()));
        }) {}
  /// Says whether to save the item.
  bool operator()(std::string_view name, const c10::IValue& value) const { return predicate_(name, value); }

 private:
  std::function<bool(std::string_view, const c10::IValue&)> predicate_;
};

/// save's filters: state keys to the Filter of that entry (entries without one are saved whole).
///
///     fabric.save(path, state, {{"model", [](std::string_view name, const at::Tensor&) {
///                                  return name.find("bias") == std::string_view::npos; }}});
using Filters = std::map<std::string, Filter>;

namespace detail {

// Format 2 adds the "stateful" kind (format 1 stored a GradScaler as a "value").
inline constexpr std::int64_t checkpoint_format = 2;
inline constexpr const char* marker_key = "__fabric__";

inline const char* kind_name(StateEntry::Kind k) {
  switch (k) {
    case StateEntry::Kind::module:
      return "module";
    case StateEntry::Kind::optimizer:
      return "optimizer";
    case StateEntry::Kind::stateful:
      return "stateful";
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

/// Checks save's filters against the state: every key names an entry, and none an optimizer.
inline void check_filters(const State& state, const Filters& filters) {
  std::vector<std::string> unknown;
  for (const auto& [key, filter] : filters) {
    if (!state.contains(key)) unknown.push_back(fmt::format("\"{}\"", key));
  }
  if (!unknown.empty()) {
    std::vector<std::string> keys;
    for (const auto& [key, entry] : state) keys.push_back(fmt::format("\"{}\"", key));
    raise("save: the filter keys {{{}}} are not present in the state keys {{{}}}; filter only entries of the state",
          fmt::join(unknown, ", "), fmt::join(keys, ", "));
  }
  for (const auto& [key, filter] : filters) {
    if (state.at(key).kind() == StateEntry::Kind::optimizer) {
      raise(
          "save: the filter for \"{}\" is for an optimizer, whose LibTorch state is one archive (Optimizer::save) "
          "that cannot be split by item; leave \"{}\" out of the filter, or the optimizer out of the state",
          key, key);
    }
  }
}

/// The items of a dictionary that filter keeps; nothing when it keeps none (the entry is left out).
inline std::optional<c10::IValue> filtered(const std::string& key, const c10::impl::GenericDict& dict,
                                           const Filter& filter) {
  c10::impl::GenericDict out(dict.keyType(), dict.valueType());
  for (const auto& item : dict) {
    if (!item.key().isString()) {
      raise("save: state entry \"{}\" has a key that is {}, which a filter cannot name; expected string keys", key,
            describe(item.key()));
    }
    if (filter(item.key().toStringRef(), item.value())) out.insert(item.key(), item.value());
  }
  if (out.empty()) return std::nullopt;
  return c10::IValue(out);
}

/// Converts a state into the dictionary a CheckpointIO writes: modules as {dotted name: tensor},
/// optimizers as their archive, Stateful objects as their state_dict(), values as they are, and the
/// "__fabric__" entry with the kinds. An entry with a filter keeps the items its filter chooses and
/// is left out when it keeps none (Lightning's `_apply_filter`).
inline Checkpoint to_checkpoint(const State& state, const Filters& filters = {}) {
  check_filters(state, filters);
  Checkpoint root(c10::StringType::get(), c10::AnyType::get());
  c10::Dict<std::string, std::string> kinds;
  for (const auto& [key, entry] : state) {
    if (key == marker_key) raise("the state key \"{}\" is reserved; rename that entry", key);
    c10::IValue stored;
    switch (entry.kind()) {
      case StateEntry::Kind::module:
        stored = module_to_ivalue(*entry.module());
        break;
      case StateEntry::Kind::optimizer:
        stored = optimizer_to_ivalue(key, *entry.optimizer());
        break;
      case StateEntry::Kind::stateful:
        try {
          stored = entry.state_dict();
        } catch (const std::exception& e) {
          raise("state entry \"{}\": its state_dict() failed ({}); nothing was written", key, first_line(e.what()));
        }
        break;
      case StateEntry::Kind::value:
        if (entry.value().isNone()) raise("state entry \"{}\" holds no value; give it one or remove it", key);
        if (entry.value().isTensor() && !entry.value().toTensor().defined()) {
          raise("state entry \"{}\" holds an undefined tensor; expected a defined tensor, give it one or remove it",
                key);
        }
        stored = entry.value();
        break;
    }
    const auto filter = filters.find(key);
    if (filter != filters.end() && stored.isGenericDict()) {
      auto kept = filtered(key, stored.toGenericDict(), filter->second);
      if (!kept) continue;
      stored = std::move(*kept);
    }
    root.insert(key, std::move(stored));
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
/// kind of every entry ("module", "optimizer", "stateful", "value"); nothing for a dictionary without
/// it (one torch.save wrote in Python), whose entries are taken for what the state asks.
inline std::optional<std::map<std::string, std::string>> take_marker(Checkpoint& root,
                                                                     const std::filesystem::path& path) {
  if (!root.contains(marker_key)) return std::nullopt;
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
      if (kind != "module" && kind != "optimizer" && kind != "stateful" && kind != "value") {
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

/// Checks a Stateful entry of a checkpoint: a dictionary, const objects refused, and with strict
/// every key of the object's state_dict() present (the object's load_state_dict checks the rest).
inline void check_stateful(const std::string& key, const StateEntry& entry, const c10::IValue& stored, bool strict,
                           std::vector<std::string>& errors) {
  if (!stored.isGenericDict()) {
    errors.push_back(fmt::format("\"{}\": expected a dictionary (the state_dict() of a Stateful object), found {}", key,
                                 describe(stored)));
    return;
  }
  if (!entry.restorable()) {
    errors.push_back(fmt::format("\"{}\": the object is const, so load cannot restore it; pass it non-const", key));
    return;
  }
  if (!strict) return;
  c10::IValue current;
  try {
    current = entry.state_dict();
  } catch (const std::exception& e) {
    errors.push_back(fmt::format("\"{}\": its state_dict() failed ({})", key, first_line(e.what())));
    return;
  }
  const auto dict = stored.toGenericDict();
  for (const auto& item : current.toGenericDict()) {
    if (!dict.contains(item.key())) {
      errors.push_back(fmt::format("\"{}.{}\": missing from the checkpoint", key,
                                   item.key().isString() ? item.key().toStringRef() : describe(item.key())));
    }
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
  if (!dict.contains("archive") || !dict.at("archive").isTensor() ||
      (dict.contains("shapes") && !dict.at("shapes").isList())) {
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
  // Without "shapes" (an optimizer.state_dict() of PyTorch, see TorchCheckpointIO) the archive's checks below apply.
  const auto shapes =
      dict.contains("shapes") ? dict.at("shapes").toList() : c10::impl::GenericList(c10::AnyType::get());
  if (dict.contains("shapes") && shapes.size() != params.size()) {
    errors.push_back(fmt::format("{}: expected state for {} parameters, found {} in the checkpoint", label,
                                 params.size(), shapes.size()));
    return;
  }
  const std::size_t before = errors.size();
  for (std::size_t i = 0; i < shapes.size(); ++i) {
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
    load_archive_bytes(archive, static_cast<const char*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel()),
                       "the optimizer state in the checkpoint");
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
      std::string stored_kind = kind_name(entry.kind());
      if (kinds) {
        const auto kind_it = kinds->find(key);
        stored_kind = kind_it != kinds->end() ? kind_it->second : "value";
      }
      // Format 1 stored a GradScaler, the one Stateful object then, as a value.
      if (entry.kind() == StateEntry::Kind::stateful && stored_kind == "value") stored_kind = "stateful";
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
        case StateEntry::Kind::stateful:
          check_stateful(key, entry, stored, strict, errors);
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
  // Then Stateful objects, each undone (with the optimizers) when a later one fails.
  std::vector<std::pair<const StateEntry*, c10::IValue>> restored;
  for (auto& [key, entry] : state) {
    if (entry.kind() != StateEntry::Kind::stateful || !root.contains(key)) continue;
    c10::IValue before;
    try {
      before = entry.state_dict();
      restored.emplace_back(&entry, before);
      entry.load_state_dict(root.at(key).toGenericDict());
    } catch (const std::exception& e) {
      for (auto it = restored.rbegin(); it != restored.rend(); ++it) {
        try {
          if (it->second.isGenericDict()) it->first->load_state_dict(it->second.toGenericDict());
        } catch (const std::exception&) {  // NOTE: the entry's own error is the one to report.
        }
      }
      for (auto it = backups.rbegin(); it != backups.rend(); ++it) it->restore();
      raise("cannot load {}: \"{}\": its load_state_dict failed ({}); nothing was changed", path.string(), key,
            first_line(e.what()));
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
      case StateEntry::Kind::stateful:
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
