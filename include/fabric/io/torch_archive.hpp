#pragma once
// Loading files written by LibTorch's own torch::save(module, path) and torch::save(optimizer, path)
// (`Fabric::load_raw` through fabric::NativeCheckpointIO), with the same name, shape and type checks as
// fabric's checkpoints.

#include "fabric/core/concepts.hpp"
#include "fabric/core/error.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/detail/zip_check.hpp"
#include "fabric/io/torch_pickle.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/wrappers/module.hpp"
#include "fabric/wrappers/optimizer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>

#include <filesystem>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fabric::detail {

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
  const std::vector<char> bytes = read_file(path);  // existence and emptiness checks with fabric's messages
  // NOTE: LibTorch's zip reader trusts the file's offsets; only a validated buffer reaches it.
  const auto zip = check_torch_zip(bytes.data(), bytes.size(), path.string(),
                                   "a file written by torch::save (a zip archive as torch writes it)");
  check_zip_crcs(
      bytes.data(), zip, [](const ZipEntry&) { return true; }, path.string());
  if (zip.find("constants.pkl") == nullptr) {
    raise(
        "expected a file written by torch::save (a TorchScript archive with constants.pkl) at {}, found a torch "
        "pickle without it (a fabric checkpoint or a file of torch::pickle_save); use load for fabric checkpoints",
        path.string());
  }
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(bytes.data(), bytes.size());
  } catch (const std::exception& e) {
    raise(
        "could not read {} as a torch::save archive ({}); expected a file written by torch::save (use load for "
        "fabric checkpoints)",
        path.string(), first_line(e.what()));
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
  finish_module_load(path, errors, copies, strict);
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

/// load_raw of NativeCheckpointIO: a module from a file of LibTorch's torch::save, or from a torch pickle
/// without fabric's marker through the restricted reader (Python's torch.save); a fabric checkpoint is
/// refused with "use load".
inline void load_raw_file(const std::filesystem::path& path, torch::nn::Module& module, bool strict) {
  if (const auto python = read_python_file(path)) return load_raw_python(path, *python, module, strict);
  load_raw_module(path, module, strict);
}

/// load_raw of NativeCheckpointIO: an optimizer from a file of LibTorch's torch::save, or from a Python
/// optimizer.state_dict() through the restricted reader.
inline void load_raw_file(const std::filesystem::path& path, torch::optim::Optimizer& optimizer) {
  if (const auto python = read_python_file(path)) return load_raw_python(path, *python, optimizer);
  load_raw_optimizer(path, optimizer);
}

}  // namespace fabric::detail
