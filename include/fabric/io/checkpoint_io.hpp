#pragma once
// The CheckpointIO concept (Lightning's CheckpointIO: how a checkpoint dictionary reaches a file and
// comes back), the check that names what a format lacks, fabric::FormatList, which picks a format per
// path (what save, load and load_raw do by default), and fabric::AnyCheckpointIO, which holds any format
// where a strategy keeps it.

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <concepts>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace torch::nn {
class Module;
}  // namespace torch::nn
namespace torch::optim {
class Optimizer;
}  // namespace torch::optim

namespace fabric {

/// A checkpoint as a CheckpointIO writes and reads it: a dictionary of names to values (tensors,
/// numbers, strings and nested dictionaries and lists of them), the shape of a PyTorch checkpoint.
using Checkpoint = c10::impl::GenericDict;

/// The state of a Stateful object (see fabric::Stateful): names to values, the shape of a PyTorch
/// `state_dict()`. Make an empty one with fabric::make_state_dict().
using StateDict = c10::Dict<std::string, c10::IValue>;

/// Returns an empty StateDict (c10::Dict has no default constructor for IValue values).
///
///     fabric::StateDict state = fabric::make_state_dict();
///     state.insert("count", std::int64_t{3});
inline StateDict make_state_dict() {
  return c10::impl::toTypedDict<std::string, c10::IValue>(
      c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()));
}

namespace detail {

/// The format writes a checkpoint to a path.
template <class IO>
concept saves_checkpoints = requires(IO& io, const Checkpoint& checkpoint, const std::filesystem::path& path) {
  io.save_checkpoint(checkpoint, path);
};
/// The format reads a checkpoint back from a path.
template <class IO>
concept loads_checkpoints = requires(IO& io, const std::filesystem::path& path) {
  { io.load_checkpoint(path) } -> std::same_as<Checkpoint>;
};
/// The format removes a checkpoint it wrote.
template <class IO>
concept removes_checkpoints = requires(IO& io, const std::filesystem::path& path) {
  io.remove_checkpoint(path);
};

/// The format says which paths it writes (`claims`) and which files it reads (`recognises`).
template <class IO>
concept picks_files = requires(const IO& io, const std::filesystem::path& path) {
  { io.claims(path) } -> std::convertible_to<bool>;
  { io.recognises(path) } -> std::convertible_to<bool>;
};
/// The format loads a module's tensors from a file it recognises (Fabric::load_raw).
template <class IO>
concept loads_raw_modules = requires(IO& io, const std::filesystem::path& path, torch::nn::Module& module) {
  io.load_raw(path, module, true);
};
/// The format loads an optimizer's state from a file it recognises (Fabric::load_raw).
template <class IO>
concept loads_raw_optimizers = requires(IO& io, const std::filesystem::path& path, torch::optim::Optimizer& optimizer) {
  io.load_raw(path, optimizer, true);
};

}  // namespace detail

/// A checkpoint format: `save_checkpoint(checkpoint, path)`, `load_checkpoint(path) -> Checkpoint` and
/// `remove_checkpoint(path)`, as Lightning's CheckpointIO. The strategy converts fabric::State into a
/// Checkpoint, writes it through the format on the ranks that write, and agrees across ranks.
///
///     struct Counting {
///       int saves = 0;
///       void save_checkpoint(const fabric::Checkpoint& c, const std::filesystem::path& p) { ++saves;
///       native.save_checkpoint(c, p); } fabric::Checkpoint load_checkpoint(const std::filesystem::path& p) { return
///       native.load_checkpoint(p); } void remove_checkpoint(const std::filesystem::path& p) {
///       native.remove_checkpoint(p); } fabric::NativeCheckpointIO native;
///     };
template <class IO>
concept CheckpointIO = std::move_constructible<IO> && detail::saves_checkpoints<IO> && detail::loads_checkpoints<IO> &&
    detail::removes_checkpoints<IO>;

namespace detail {

/// Fails with one message naming the first member a checkpoint format lacks; true when it has all.
template <class IO>
consteval bool check_checkpoint_io() {
  if constexpr (!std::move_constructible<IO>) {
    static_assert(dependent_false_v<IO>, "fabric: a CheckpointIO must be move constructible");
  } else if constexpr (!saves_checkpoints<IO>) {
    static_assert(dependent_false_v<IO>,
                  "fabric: a CheckpointIO needs `void save_checkpoint(const fabric::Checkpoint&, const "
                  "std::filesystem::path&)`; add it (see fabric::NativeCheckpointIO)");
  } else if constexpr (!loads_checkpoints<IO>) {
    static_assert(dependent_false_v<IO>,
                  "fabric: a CheckpointIO needs `fabric::Checkpoint load_checkpoint(const std::filesystem::path&)`; "
                  "add it (see fabric::NativeCheckpointIO)");
  } else if constexpr (!removes_checkpoints<IO>) {
    static_assert(dependent_false_v<IO>,
                  "fabric: a CheckpointIO needs `void remove_checkpoint(const std::filesystem::path&)`; add it (see "
                  "fabric::NativeCheckpointIO)");
  }
  return CheckpointIO<IO>;
}

}  // namespace detail

/// Returns up to n bytes from the start of the file at path (fewer for a shorter file, none for a file
/// that cannot be read): what a format's `recognises` looks at to know its own files.
inline std::string file_head(const std::filesystem::path& path, std::size_t n) {
  std::string head(n, '\0');
  std::ifstream in(path, std::ios::binary);
  in.read(head.data(), static_cast<std::streamsize>(n));
  head.resize(in ? n : static_cast<std::size_t>(in.gcount()));
  return head;
}

/// A format that can join a fabric::FormatList: a CheckpointIO that also says which paths it writes,
/// `bool claims(const std::filesystem::path&) const` (by the path: its extension), and which files it
/// reads, `bool recognises(const std::filesystem::path&) const` (by the file's first bytes, see
/// fabric::file_head, or by its path; false for a file it cannot read). It may also load a module or an
/// optimizer from a file it recognises for Fabric::load_raw: `void load_raw(const std::filesystem::path&,
/// torch::nn::Module&, bool strict) const` and `void load_raw(const std::filesystem::path&,
/// torch::optim::Optimizer&, bool strict) const`.
template <class IO>
concept ListedFormat = CheckpointIO<IO> && detail::picks_files<IO>;

namespace detail {

/// Fails with one message naming what keeps a format out of a fabric::FormatList; true when nothing does.
template <class IO>
consteval bool check_listed_format() {
  if constexpr (!check_checkpoint_io<IO>()) {
    return false;
  } else if constexpr (!picks_files<IO>) {
    static_assert(dependent_false_v<IO>,
                  "fabric: a format in a FormatList needs `bool claims(const std::filesystem::path&) const` (the "
                  "paths it writes) and `bool recognises(const std::filesystem::path&) const` (the files it reads); "
                  "add them (see fabric::SafetensorsCheckpointIO)");
    return false;
  } else {
    return true;
  }
}

}  // namespace detail

/// Picks a format per path: save writes through the first format that claims the path, load and
/// load_raw read through the first that recognises the file; the last format takes what no format
/// claims or recognises. fabric::AutoCheckpointIO, the default of every strategy, is
/// `FormatList<SafetensorsCheckpointIO, TorchCheckpointIO, NativeCheckpointIO>`. To add a format, list it
/// before them and give the list to the strategy (every format in it: fabric::ListedFormat):
///
///     struct Npz {  // writes and reads *.npz
///       bool claims(const std::filesystem::path& p) const { return p.extension() == ".npz"; }
///       bool recognises(const std::filesystem::path& p) const { return fabric::file_head(p, 4) == "PK\3\4" &&
///       claims(p); } void save_checkpoint(const fabric::Checkpoint& c, const std::filesystem::path& p) const;
///       fabric::Checkpoint load_checkpoint(const std::filesystem::path& p) const;
///       void remove_checkpoint(const std::filesystem::path& p) const;
///     };
///     using Formats = fabric::FormatList<Npz, fabric::SafetensorsCheckpointIO, fabric::TorchCheckpointIO,
///                                        fabric::NativeCheckpointIO>;
///     fabric::Fabric fabric(fabric::SingleDevice({.checkpoint_io = Formats{}}));
template <class... Formats>
class FormatList {
  static_assert(sizeof...(Formats) > 0, "fabric: a FormatList needs at least one format; list one");
  static_assert((detail::check_listed_format<Formats>() && ...));

 public:
  /// Holds default-constructed formats.
  FormatList() = default;
  /// Holds the given formats.
  explicit FormatList(Formats... formats) : formats_(std::move(formats)...) {}

  /// Says whether a format of the list claims the path (the last takes any path no other claims).
  bool claims(const std::filesystem::path& path) const {
    return std::apply([&](const auto&... f) { return (static_cast<bool>(f.claims(path)) || ...); }, formats_);
  }
  /// Says whether a format of the list recognises the file.
  bool recognises(const std::filesystem::path& path) const {
    return std::apply([&](const auto&... f) { return (static_cast<bool>(f.recognises(path)) || ...); }, formats_);
  }
  /// Writes through the first format that claims the path (else the last).
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    for_writer(path, [&](auto& f) { f.save_checkpoint(checkpoint, path); });
  }
  /// Reads through the first format that recognises the file (else the last).
  Checkpoint load_checkpoint(const std::filesystem::path& path) const {
    Checkpoint out(c10::StringType::get(), c10::AnyType::get());
    for_reader(
        path, [&](auto& f) { out = f.load_checkpoint(path); }, [](const auto&) { return true; });
    return out;
  }
  /// Removes the checkpoint through the format that claims the path (else the last).
  void remove_checkpoint(const std::filesystem::path& path) const {
    for_writer(path, [&](auto& f) { f.remove_checkpoint(path); });
  }
  /// Loads a module through the first format that recognises the file and loads modules (else the last).
  void load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) const {
    for_reader(
        path, [&](auto& f) { load_raw_into(f, path, module, strict); },
        []<class F>(const F&) { return detail::loads_raw_modules<const F>; });
  }
  /// Loads an optimizer through the first format that recognises the file and loads optimizers (else the last).
  void load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool strict) const {
    for_reader(
        path, [&](auto& f) { load_raw_into(f, path, optimizer, strict); },
        []<class F>(const F&) { return detail::loads_raw_optimizers<const F>; });
  }

  /// Returns the format of type F in the list.
  template <class F>
  const F& get() const noexcept {
    return std::get<F>(formats_);
  }

 private:
  template <class F, class Target>
  static void load_raw_into(const F& f, const std::filesystem::path& path, Target& target, bool strict) {
    if constexpr (requires { f.load_raw(path, target, strict); }) {
      f.load_raw(path, target, strict);
    } else {
      detail::raise(
          "load_raw cannot read {}: its format reads checkpoints only (use load), found no format in the "
          "list that loads {} from it",
          path.string(), std::is_same_v<Target, torch::nn::Module> ? "a module" : "an optimizer");
    }
  }
  template <class Do>
  void for_writer(const std::filesystem::path& path, Do&& action) const {
    bool done = false;
    std::apply(
        [&](const auto&... f) {
          ((!done && static_cast<bool>(f.claims(path)) ? (action(f), done = true) : false), ...);
        },
        formats_);
    if (!done) action(std::get<sizeof...(Formats) - 1>(formats_));
  }
  template <class Do, class Able>
  void for_reader(const std::filesystem::path& path, Do&& action, Able able) const {
    bool done = false;
    std::apply(
        [&](const auto&... f) {
          ((!done && able(f) && static_cast<bool>(f.recognises(path)) ? (action(f), done = true) : false), ...);
        },
        formats_);
    if (!done) action(std::get<sizeof...(Formats) - 1>(formats_));
  }

  std::tuple<Formats...> formats_{};
};

/// Holds any CheckpointIO behind one type, as a strategy keeps it (checkpoints are not in the hot path,
/// so the calls are virtual). Empty, the strategy writes fabric's native format.
///
///     fabric::SingleDevice strategy({.checkpoint_io = Counting{}});
class AnyCheckpointIO {
 public:
  /// Holds nothing: the strategy uses fabric::NativeCheckpointIO.
  AnyCheckpointIO() = default;
  /// Holds a copy of a format; a type that is not a CheckpointIO fails with a message naming what it lacks.
  template <class IO>
  requires(!std::same_as<std::remove_cvref_t<IO>, AnyCheckpointIO>) AnyCheckpointIO(IO io)  // NOLINT
      : impl_(make(std::move(io))) {}

  /// Says whether a format is held.
  explicit operator bool() const noexcept { return impl_ != nullptr; }
  /// Returns the held format if it is an IO, else null (as std::function::target).
  template <class IO>
  IO* target() const noexcept {
    auto* model = dynamic_cast<Model<IO>*>(impl_.get());
    return model != nullptr ? &model->io : nullptr;
  }
  /// Writes a checkpoint through the held format.
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    impl_->save_checkpoint(checkpoint, path);
  }
  /// Reads a checkpoint through the held format.
  Checkpoint load_checkpoint(const std::filesystem::path& path) const { return impl_->load_checkpoint(path); }
  /// Removes a checkpoint through the held format.
  void remove_checkpoint(const std::filesystem::path& path) const { impl_->remove_checkpoint(path); }
  /// Loads a module through the held format when it recognises the file and loads modules (a
  /// fabric::ListedFormat with load_raw, or a fabric::FormatList); returns whether it did.
  bool load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) const {
    return impl_ != nullptr && impl_->load_raw(path, module, strict);
  }
  /// Loads an optimizer through the held format when it recognises the file and loads optimizers;
  /// returns whether it did.
  bool load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool strict) const {
    return impl_ != nullptr && impl_->load_raw(path, optimizer, strict);
  }

 private:
  struct Interface {
    virtual ~Interface() = default;
    virtual void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) = 0;
    virtual Checkpoint load_checkpoint(const std::filesystem::path& path) = 0;
    virtual void remove_checkpoint(const std::filesystem::path& path) = 0;
    virtual bool load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) = 0;
    virtual bool load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool strict) = 0;
  };
  template <class IO>
  struct Model final : Interface {
    explicit Model(IO value) : io(std::move(value)) {}
    void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) override {
      io.save_checkpoint(checkpoint, path);
    }
    Checkpoint load_checkpoint(const std::filesystem::path& path) override { return io.load_checkpoint(path); }
    void remove_checkpoint(const std::filesystem::path& path) override { io.remove_checkpoint(path); }
    bool load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) override {
      return load_raw_into(path, module, strict);
    }
    bool load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool strict) override {
      return load_raw_into(path, optimizer, strict);
    }
    template <class Target>
    bool load_raw_into(const std::filesystem::path& path, Target& target, bool strict) {
      if constexpr (detail::picks_files<IO> && requires { io.load_raw(path, target, strict); }) {
        if (!io.recognises(path)) return false;
        io.load_raw(path, target, strict);
        return true;
      } else {
        return false;
      }
    }
    IO io;
  };
  template <class IO>
  static std::shared_ptr<Interface> make(IO io) {
    if constexpr (detail::check_checkpoint_io<IO>()) {
      return std::make_shared<Model<IO>>(std::move(io));
    } else {
      return nullptr;
    }
  }

  std::shared_ptr<Interface> impl_{};
};

}  // namespace fabric
