#pragma once
// fabric::NativeCheckpointIO: fabric's own checkpoint format, a torch pickle of the checkpoint dictionary
// (torch::pickle_save; Python reads it with torch.load(path, weights_only=False)), written atomically,
// with checksums of its tensors and metadata, and validated before LibTorch reads it; its extension is
// `.fabric`. Its load_raw reads LibTorch's torch::save files.

#include "fabric/core/error.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/detail/crc.hpp"
#include "fabric/detail/zip_check.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/io/torch_archive.hpp"

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fabric {

namespace detail {

/// The top-level key under which NativeCheckpointIO stores a checkpoint's checksums.
inline constexpr std::string_view checksums_key = "__fabric_checksums__";

/// Says whether a tensor's sizes, strides and offset stay inside its storage (a hostile pickle can declare
/// a tensor larger than the bytes it points at; reading it would read past them).
inline bool tensor_fits_storage(const at::Tensor& t) {
  if (!t.defined() || t.layout() != c10::kStrided || !t.has_storage()) return true;
  if (t.storage_offset() < 0) return false;
  std::uint64_t last = static_cast<std::uint64_t>(t.storage_offset());
  for (std::int64_t i = 0; i < t.dim(); ++i) {
    const std::int64_t size = t.size(i);
    const std::int64_t stride = t.stride(i);
    if (size < 0 || stride < 0) return false;
    if (size == 0) return true;
    const auto extent = static_cast<std::uint64_t>(size - 1);
    if (stride != 0 && extent > (std::uint64_t{1} << 62) / static_cast<std::uint64_t>(stride)) return false;
    last += extent * static_cast<std::uint64_t>(stride);
    if (last > (std::uint64_t{1} << 62)) return false;
  }
  return (last + 1) * t.element_size() <= t.storage().nbytes();
}

/// Walks a checkpoint's values in their (insertion) order, feeding a CRC-32C of its metadata (keys, kinds,
/// numbers, strings, tensors' dtypes and shapes) and giving each tensor with its path to a callback.
class ChecksumWalker {
 public:
  template <class OnTensor>
  void walk(const c10::IValue& v, const std::string& path, OnTensor&& on_tensor) {
    if (v.isNone()) {
      tag('N');
    } else if (v.isBool()) {
      tag('B');
      put(static_cast<std::int64_t>(v.toBool()));
    } else if (v.isInt()) {
      tag('I');
      put(v.toInt());
    } else if (v.isDouble()) {
      tag('F');
      const double x = v.toDouble();
      std::int64_t bits = 0;
      std::memcpy(&bits, &x, sizeof bits);
      put(bits);
    } else if (v.isString()) {
      const auto& s = v.toStringRef();
      tag('S');
      put(static_cast<std::int64_t>(s.size()));
      crc_ = crc32c(s.data(), s.size(), crc_);
    } else if (v.isTensor()) {
      const auto& t = v.toTensor();
      tag('T');
      if (t.defined()) {
        put(static_cast<std::int64_t>(t.scalar_type()));
        put(t.dim());
        for (const auto size : t.sizes()) put(size);
      }
      on_tensor(t, path);
    } else if (v.isGenericDict()) {
      const auto dict = v.toGenericDict();
      tag('D');
      put(static_cast<std::int64_t>(dict.size()));
      for (const auto& item : dict) {
        walk(item.key(), path + "#key", on_tensor);
        const auto name = item.key().isString() ? item.key().toStringRef()
                          : item.key().isInt()  ? std::to_string(item.key().toInt())
                                                : std::string("?");
        walk(item.value(), path.empty() ? name : path + "/" + name, on_tensor);
      }
    } else if (v.isList() || v.isTuple()) {
      const auto items = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
      tag(v.isList() ? 'L' : 'U');
      put(static_cast<std::int64_t>(items.size()));
      for (std::size_t i = 0; i < items.size(); ++i) walk(items[i], path + "[" + std::to_string(i) + "]", on_tensor);
    } else {
      tag('O');
      const std::string kind = v.tagKind();
      crc_ = crc32c(kind.data(), kind.size(), crc_);
    }
  }
  std::uint32_t metadata() const { return crc_; }

 private:
  void tag(char c) { crc_ = crc32c(&c, 1, crc_); }
  void put(std::int64_t x) { crc_ = crc32c(&x, sizeof x, crc_); }
  std::uint32_t crc_ = 0;
};

/// Returns the CRC-32C of a tensor's values (its bytes in row-major order).
inline std::uint32_t tensor_crc(const at::Tensor& t) {
  if (!t.defined() || t.layout() != c10::kStrided) return 0;
  const at::Tensor c = t.device().is_cpu() ? t.contiguous() : t.cpu().contiguous();
  return crc32c(c.data_ptr(), c.nbytes());
}

}  // namespace detail

/// Writes a checkpoint as one torch pickle, atomically (a temporary file beside the target, flushed to
/// disk and renamed over it; parent directories are created; temporaries of killed writers are removed),
/// with a CRC-32C of every tensor and of the metadata under the key "__fabric_checksums__"; reads it back
/// after validating the file (a malformed or corrupt file is a fabric::Error naming what is wrong, never a
/// crash), verifying the checksums and checking that it is a dictionary with string keys. Lightning's
/// TorchCheckpointIO.
class NativeCheckpointIO {
 public:
  /// Pickles the checkpoint with its checksums and writes it atomically to path.
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    if (checkpoint.contains(std::string(detail::checksums_key))) {
      detail::raise("expected a checkpoint without the key \"{}\", which fabric's format reserves; rename the entry",
                    detail::checksums_key);
    }
    std::vector<char> bytes;
    try {
      detail::ChecksumWalker walker;
      c10::List<std::int64_t> tensors;
      walker.walk(checkpoint, "",
                  [&](const at::Tensor& t, const std::string&) { tensors.push_back(detail::tensor_crc(t)); });
      StateDict sums = make_state_dict();
      sums.insert("algorithm", std::string("crc32c"));
      sums.insert("metadata", static_cast<std::int64_t>(walker.metadata()));
      sums.insert("tensors", tensors);
      Checkpoint with_sums = checkpoint.copy();
      with_sums.insert(std::string(detail::checksums_key), sums);
      bytes = torch::jit::pickle_save(with_sums);
    } catch (const c10::Error& e) {
      detail::raise(
          "could not serialize the state ({}); expected modules, optimizers, integers, floating point, booleans, "
          "strings and dense tensors",
          detail::first_line(e.what_without_backtrace()));
    }
    detail::write_atomically(path, bytes.data(), bytes.size());
  }

  /// Reads the checkpoint at path; a missing, empty, truncated, corrupt or foreign file is a fabric::Error.
  Checkpoint load_checkpoint(const std::filesystem::path& path) const {
    const std::vector<char> bytes = detail::read_file(path);
    const auto archive = detail::check_torch_zip(bytes.data(), bytes.size(), path.string(),
                                                 "a file written by fabric's save (a zip archive as torch writes it)");
    const std::string storages = archive.prefix + "/data/";
    // NOTE: the small records (data.pkl, version, ...) are checked by their zip CRC-32; tensor storages by
    // fabric's CRC-32C (several times faster), or by their zip CRC-32 in files without it.
    detail::check_zip_crcs(
        bytes.data(), archive, [&](const detail::ZipEntry& e) { return !e.name.starts_with(storages); }, path.string());
    c10::IValue value;
    try {
      value = torch::jit::pickle_load(bytes);
    } catch (const std::exception& e) {
      // NOTE: LibTorch reads collections.OrderedDict as None (it expects one only as a tensor's empty
      // backward hooks), so a state_dict fails on its first item.
      if (std::string_view(e.what()).find("GenericDict") != std::string_view::npos) {
        refuse_python_ordered_dict(bytes, archive, path, false);
      }
      detail::raise(
          "could not read a checkpoint from {}: the file is truncated, corrupt or of another format ({}); "
          "expected a file written by fabric's save (use load_raw for files of torch::save)",
          path.string(), detail::first_line(e.what()));
    }
    if (!value.isGenericDict()) {
      refuse_python_ordered_dict(bytes, archive, path, true);
      detail::raise(
          "expected a fabric checkpoint at {}, found a torch pickle of {} instead of fabric's dictionary; read it "
          "with torch::pickle_load (or use load_raw for files written by torch::save)",
          path.string(), detail::describe(value));
    }
    Checkpoint checkpoint(c10::StringType::get(), c10::AnyType::get());
    c10::IValue sums;
    for (const auto& item : value.toGenericDict()) {
      if (!item.key().isString()) {
        detail::raise(
            "expected a fabric checkpoint at {}, found a dictionary with a key that is {}, not a string; it was "
            "not written by fabric's save",
            path.string(), detail::describe(item.key()));
      }
      if (item.key().toStringRef() == detail::checksums_key) {
        sums = item.value();
      } else {
        checkpoint.insert(item.key().toStringRef(), item.value());
      }
    }
    verify(checkpoint, sums, bytes, archive, path);
    return checkpoint;
  }

  /// Removes the checkpoint at path (nothing when there is none).
  void remove_checkpoint(const std::filesystem::path& path) const {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) detail::raise("could not remove the checkpoint {}: {}", path.string(), ec.message());
  }

  /// Claims paths ending in `.fabric`, the native format's own extension (in fabric::AutoCheckpointIO,
  /// the last format, it also takes every path no other format claims).
  bool claims(const std::filesystem::path& path) const { return path.extension() == ".fabric"; }
  /// Recognises zip archives as torch writes them (its checkpoints, LibTorch's torch::save files).
  bool recognises(const std::filesystem::path& path) const {
    return file_head(path, 4) == std::string_view("PK\x03\x04", 4);
  }
  /// Loads a module from a file of LibTorch's torch::save(module, path), checking names and shapes first
  /// (a torch pickle without fabric's marker goes through the restricted reader); a fabric checkpoint is
  /// refused (use load).
  void load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) const {
    detail::load_raw_file(path, module, strict);
  }
  /// Loads an optimizer from a file of LibTorch's torch::save(optimizer, path), checking its groups, type
  /// and state shapes first.
  void load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool /*strict*/) const {
    detail::load_raw_file(path, optimizer);
  }

 private:
  /// Raises the plain error for Python's OrderedDict state dicts when the pickle holds one (at its top,
  /// with `at_top`; LibTorch's own pickles name OrderedDict for every tensor's backward hooks).
  static void refuse_python_ordered_dict(const std::vector<char>& bytes, const detail::ZipArchive& archive,
                                         const std::filesystem::path& path, bool at_top) {
    const auto* pickle = archive.find("data.pkl");
    if (!pickle->stored) return;
    const std::string_view text(bytes.data() + pickle->data_offset, static_cast<std::size_t>(pickle->size));
    constexpr std::string_view global = "ccollections\nOrderedDict\n";
    if (text.size() < 2 + global.size()) return;
    if (at_top ? text.substr(2, global.size()) != global : text.find(global) == std::string_view::npos) return;
    detail::raise(
        "expected a fabric checkpoint at {}, found a file of Python's torch.save holding a collections.OrderedDict "
        "(what `torch.save(model.state_dict(), path)` and Python Lightning write), which LibTorch's unpickler "
        "cannot read; in Python, save plain dicts instead, e.g. `torch.save({{\"model\": dict(model.state_dict())}}, "
        "path)`, and load that",
        path.string());
  }

  /// Checks the tensors fit their storages and verifies the stored checksums (or, without them, the zip
  /// CRC-32 of the tensor storages); raises naming the corrupt entry.
  static void verify(const Checkpoint& checkpoint, const c10::IValue& sums, const std::vector<char>& bytes,
                     const detail::ZipArchive& archive, const std::filesystem::path& path) {
    auto corrupt = [&](const std::string& what) {
      detail::raise("{} is corrupt: {}; restore it from a good copy (or save it again)", path.string(), what);
    };
    std::vector<std::pair<at::Tensor, std::string>> tensors;
    detail::ChecksumWalker walker;
    walker.walk(checkpoint, "", [&](const at::Tensor& t, const std::string& name) {
      if (!detail::tensor_fits_storage(t)) {
        corrupt(fmt::format("the tensor \"{}\" (shape {}) is larger than the bytes stored for it", name,
                            detail::shape_str(t.sizes())));
      }
      tensors.emplace_back(t, name);
    });
    if (sums.isNone()) {
      const std::string storages = archive.prefix + "/data/";
      detail::check_zip_crcs(
          bytes.data(), archive, [&](const detail::ZipEntry& e) { return e.name.starts_with(storages); },
          path.string());
      return;
    }
    const char* layout = "a dictionary {\"algorithm\": \"crc32c\", \"metadata\": int, \"tensors\": [int]}";
    if (!sums.isGenericDict())
      corrupt(fmt::format("its checksums are {}, expected {}", detail::describe(sums), layout));
    const auto dict = sums.toGenericDict();
    auto get = [&](const char* key) {
      if (!dict.contains(key)) corrupt(fmt::format("its checksums lack \"{}\", expected {}", key, layout));
      return dict.at(key);
    };
    const auto algorithm = get("algorithm");
    const auto metadata = get("metadata");
    const auto list = get("tensors");
    if (!algorithm.isString() || algorithm.toStringRef() != "crc32c" || !metadata.isInt() || !list.isIntList()) {
      corrupt(fmt::format("its checksums are not {}", layout));
    }
    if (static_cast<std::uint32_t>(metadata.toInt()) != walker.metadata() || metadata.toInt() < 0 ||
        metadata.toInt() > 0xFFFFFFFFLL) {
      corrupt("its metadata (names, kinds, numbers, strings, tensor dtypes and shapes) differs from its checksum");
    }
    const auto expected = list.toIntVector();
    if (expected.size() != tensors.size()) {
      corrupt(fmt::format("it holds {} tensors, its checksums {}", tensors.size(), expected.size()));
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto crc = detail::tensor_crc(tensors[i].first);
      if (static_cast<std::int64_t>(crc) != expected[i]) {
        corrupt(fmt::format("the tensor \"{}\" has CRC-32C {:08x}, expected {:08x}", tensors[i].second, crc,
                            static_cast<std::uint64_t>(expected[i])));
      }
    }
  }
};

}  // namespace fabric
