#pragma once
// The CheckpointIO concept (Lightning's CheckpointIO: how a checkpoint dictionary reaches a file and
// comes back), the check that names what a format lacks, and fabric::AnyCheckpointIO, which holds any
// format where a strategy keeps it.

#include "fabric/core/concepts.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <concepts>
#include <filesystem>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

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

 private:
  struct Interface {
    virtual ~Interface() = default;
    virtual void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) = 0;
    virtual Checkpoint load_checkpoint(const std::filesystem::path& path) = 0;
    virtual void remove_checkpoint(const std::filesystem::path& path) = 0;
  };
  template <class IO>
  struct Model final : Interface {
    explicit Model(IO value) : io(std::move(value)) {}
    void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) override {
      io.save_checkpoint(checkpoint, path);
    }
    Checkpoint load_checkpoint(const std::filesystem::path& path) override { return io.load_checkpoint(path); }
    void remove_checkpoint(const std::filesystem::path& path) override { io.remove_checkpoint(path); }
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
