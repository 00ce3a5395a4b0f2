#pragma once
// fabric::NativeCheckpointIO: fabric's own checkpoint format, a torch pickle of the checkpoint dictionary
// (torch::pickle_save; Python reads it with torch.load(path, weights_only=False)), written atomically.

#include "fabric/core/error.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/io/checkpoint_io.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <exception>
#include <filesystem>
#include <system_error>
#include <vector>

namespace fabric {

/// Writes a checkpoint as one torch pickle, atomically (a temporary file beside the target, flushed to
/// disk and renamed over it; parent directories are created), and reads it back, checking that it is
/// a dictionary with string keys. Lightning's TorchCheckpointIO.
class NativeCheckpointIO {
 public:
  /// Pickles the checkpoint and writes it atomically to path.
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    std::vector<char> bytes;
    try {
      bytes = torch::jit::pickle_save(checkpoint);
    } catch (const c10::Error& e) {
      detail::raise(
          "could not serialize the state ({}); expected modules, optimizers, integers, floating point, booleans, "
          "strings and dense tensors",
          detail::first_line(e.what_without_backtrace()));
    }
    detail::write_atomically(path, bytes.data(), bytes.size());
  }

  /// Reads the checkpoint at path; a missing, empty, truncated or foreign file is a fabric::Error.
  Checkpoint load_checkpoint(const std::filesystem::path& path) const {
    const std::vector<char> bytes = detail::read_file(path);
    c10::IValue value;
    try {
      value = torch::jit::pickle_load(bytes);
    } catch (const std::exception& e) {
      detail::raise(
          "could not read a checkpoint from {}: the file is truncated, corrupt or of another format ({}); "
          "expected a file written by fabric's save (use load_raw for files of torch::save)",
          path.string(), detail::first_line(e.what()));
    }
    if (!value.isGenericDict()) {
      detail::raise(
          "expected a fabric checkpoint at {}, found a torch pickle of {} instead of fabric's dictionary; read it "
          "with torch::pickle_load (or use load_raw for files written by torch::save)",
          path.string(), detail::describe(value));
    }
    Checkpoint checkpoint(c10::StringType::get(), c10::AnyType::get());
    for (const auto& item : value.toGenericDict()) {
      if (!item.key().isString()) {
        detail::raise(
            "expected a fabric checkpoint at {}, found a dictionary with a key that is {}, not a string; it was "
            "not written by fabric's save",
            path.string(), detail::describe(item.key()));
      }
      checkpoint.insert(item.key().toStringRef(), item.value());
    }
    return checkpoint;
  }

  /// Removes the checkpoint at path (nothing when there is none).
  void remove_checkpoint(const std::filesystem::path& path) const {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) detail::raise("could not remove the checkpoint {}: {}", path.string(), ec.message());
  }
};

}  // namespace fabric
