#pragma once
// fabric::TorchCheckpointIO: checkpoints Python reads and writes. It writes the zip file of Python's
// torch.save (a protocol-2 pickle of plain dictionaries, lists, numbers, strings and tensors, with
// optimizers in PyTorch's optimizer.state_dict() layout), which torch.load(path, weights_only=True),
// model.load_state_dict, optimizer.load_state_dict and Lightning's fabric.load read; and it reads files
// of Python's torch.save (state_dicts as OrderedDicts, Lightning's fabric.save, optimizer state_dicts)
// through fabric's restricted unpickler (detail/unpickler.hpp), which runs no pickled code.

#include "fabric/core/error.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/detail/unpickler.hpp"
#include "fabric/io/checkpoint_io.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/Functions.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {
namespace detail::torch_pickle {

using pickle::Value;
using pickle::ValuePtr;

inline std::optional<at::ScalarType> scalar_type(const std::string& name) {
  static const std::map<std::string, at::ScalarType> types = {{"Double", at::kDouble},
                                                              {"Float", at::kFloat},
                                                              {"Half", at::kHalf},
                                                              {"BFloat16", at::kBFloat16},
                                                              {"Long", at::kLong},
                                                              {"Int", at::kInt},
                                                              {"Short", at::kShort},
                                                              {"Char", at::kChar},
                                                              {"Byte", at::kByte},
                                                              {"Bool", at::kBool},
                                                              {"ComplexFloat", at::kComplexFloat},
                                                              {"ComplexDouble", at::kComplexDouble}};
  const auto it = types.find(name);
  if (it == types.end()) return std::nullopt;
  return it->second;
}

inline const char* storage_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return "DoubleStorage";
    case at::kFloat:
      return "FloatStorage";
    case at::kHalf:
      return "HalfStorage";
    case at::kBFloat16:
      return "BFloat16Storage";
    case at::kLong:
      return "LongStorage";
    case at::kInt:
      return "IntStorage";
    case at::kShort:
      return "ShortStorage";
    case at::kChar:
      return "CharStorage";
    case at::kByte:
      return "ByteStorage";
    case at::kBool:
      return "BoolStorage";
    case at::kComplexFloat:
      return "ComplexFloatStorage";
    case at::kComplexDouble:
      return "ComplexDoubleStorage";
    default:
      return nullptr;
  }
}

// ---- reading --------------------------------------------------------------------------------------

/// Turns the unpickler's value tree into IValues, building each storage once (views share it) from
/// the archive's data/<key> records, with every size, stride and offset checked against it.
class Builder {
 public:
  Builder(const pickle::ZipArchive& zip, std::string prefix) : zip_(zip), prefix_(std::move(prefix)) {}

  /// The IValue of v; last_size_ is then the number of values v expands to (a memoized value counts
  /// each time it appears, so a "memo bomb" that doubles a list at each level is refused).
  c10::IValue build(const ValuePtr& v, std::size_t depth = 0) {
    if (depth > 512) raise("the checkpoint nests values more than 512 deep");
    if (const auto it = done_.find(v.get()); it != done_.end()) {
      last_size_ = it->second.second;
      return it->second.first;
    }
    if (!active_.insert(v.get()).second) raise("the checkpoint holds a value that contains itself (a cycle)");
    std::uint64_t size = 1;
    c10::IValue out = make(*v, depth, size);
    active_.erase(v.get());
    done_.emplace(v.get(), std::make_pair(out, size));
    last_size_ = size;
    return out;
  }

 private:
  c10::IValue child(const ValuePtr& v, std::size_t depth, std::uint64_t& size) {
    c10::IValue out = build(v, depth + 1);
    size += last_size_;
    if (size > max_expanded) {
      raise(
          "the checkpoint's values expand to more than {} items (memoized values repeated: a memo bomb); "
          "expected a checkpoint of plain data",
          max_expanded);
    }
    return out;
  }

  c10::IValue make(const Value& v, std::size_t depth, std::uint64_t& size) {
    switch (v.kind) {
      case Value::Kind::none:
        return c10::IValue();
      case Value::Kind::boolean:
        return v.boolean;
      case Value::Kind::integer:
        return v.integer;
      case Value::Kind::floating:
        return v.floating;
      case Value::Kind::string:
      case Value::Kind::bytes:
        return v.text;
      case Value::Kind::tensor:
        return tensor(*v.tensor);
      case Value::Kind::tuple: {
        std::vector<c10::IValue> items;
        for (const auto& item : v.items) items.push_back(child(item, depth, size));
        return c10::ivalue::Tuple::create(std::move(items));
      }
      case Value::Kind::list:
        return list(v, depth, size);
      case Value::Kind::dict:
        return dict(v, depth, size);
      case Value::Kind::global:
        raise("the checkpoint holds the class or function {} as a value; expected plain data", v.text);
      case Value::Kind::storage:
        raise("the checkpoint holds a bare storage; expected tensors");
    }
    raise("the checkpoint holds a value fabric does not know");
  }

  c10::IValue list(const Value& v, std::size_t depth, std::uint64_t& size) {
    std::vector<c10::IValue> items;
    for (const auto& item : v.items) items.push_back(child(item, depth, size));
    auto all = [&](auto pred) { return !items.empty() && std::all_of(items.begin(), items.end(), pred); };
    if (all([](const c10::IValue& i) { return i.isInt(); })) {
      c10::List<std::int64_t> out;
      for (const auto& i : items) out.push_back(i.toInt());
      return out;
    }
    if (all([](const c10::IValue& i) { return i.isDouble(); })) {
      c10::List<double> out;
      for (const auto& i : items) out.push_back(i.toDouble());
      return out;
    }
    if (all([](const c10::IValue& i) { return i.isBool(); })) {
      c10::List<bool> out;
      for (const auto& i : items) out.push_back(i.toBool());
      return out;
    }
    if (all([](const c10::IValue& i) { return i.isString(); })) {
      c10::List<std::string> out;
      for (const auto& i : items) out.push_back(i.toStringRef());
      return out;
    }
    if (all([](const c10::IValue& i) { return i.isTensor(); })) {
      c10::List<at::Tensor> out;
      for (const auto& i : items) out.push_back(i.toTensor());
      return out;
    }
    c10::impl::GenericList out(c10::AnyType::get());
    for (auto& i : items) out.push_back(std::move(i));
    return out;
  }

  c10::IValue dict(const Value& v, std::size_t depth, std::uint64_t& size) {
    bool strings = true, ints = true;
    for (std::size_t i = 0; i < v.items.size(); i += 2) {
      strings = strings && v.items[i]->kind == Value::Kind::string;
      ints = ints && v.items[i]->kind == Value::Kind::integer;
    }
    c10::TypePtr key_type = c10::StringType::get();
    if (!strings) {
      if (!ints) raise("the checkpoint holds a dictionary with keys of mixed types; expected all str or all int keys");
      key_type = c10::IntType::get();
    }
    c10::impl::GenericDict out(key_type, c10::AnyType::get());
    for (std::size_t i = 0; i + 1 < v.items.size(); i += 2) {
      c10::IValue key = child(v.items[i], depth, size);
      out.insert_or_assign(std::move(key), child(v.items[i + 1], depth, size));
    }
    return out;
  }

  at::Tensor storage(const pickle::StorageRef& s) {
    if (const auto it = storages_.find(s.key); it != storages_.end()) {
      if (it->second.first != s.dtype) {
        raise("storage \"{}\" is named as {} and as {}; the checkpoint is corrupt", s.key, it->second.first, s.dtype);
      }
      return it->second.second;
    }
    const auto type = scalar_type(s.dtype);
    if (!type) raise("storage \"{}\" has the element type {}, which fabric does not read", s.key, s.dtype);
    const std::string record = prefix_ + "/data/" + s.key;
    if (!zip_.contains(record)) {
      raise("the checkpoint names storage \"{}\" but has no record {}; the file is truncated or corrupt", s.key,
            record);
    }
    const std::string_view bytes = zip_.record(record);
    const auto element = static_cast<std::uint64_t>(c10::elementSize(*type));
    if (static_cast<std::uint64_t>(s.numel) > bytes.size() / element) {
      raise("storage \"{}\" should hold {} elements of {} ({} bytes), its record {} has {} bytes; the file is corrupt",
            s.key, s.numel, s.dtype, static_cast<std::uint64_t>(s.numel) * element, record, bytes.size());
    }
    at::Tensor flat = at::empty({s.numel}, at::TensorOptions().dtype(*type));
    if (s.numel > 0) std::memcpy(flat.data_ptr(), bytes.data(), static_cast<std::size_t>(s.numel) * element);
    storages_.emplace(s.key, std::make_pair(s.dtype, flat));
    return flat;
  }

  at::Tensor tensor(const pickle::TensorRef& t) {
    at::Tensor flat = storage(*t.storage);
    std::int64_t last = t.offset;
    bool empty = false;
    if (t.offset < 0) raise("a tensor of storage \"{}\" has the negative offset {}", t.storage->key, t.offset);
    for (std::size_t d = 0; d < t.size.size(); ++d) {
      if (t.size[d] < 0 || t.stride[d] < 0) {
        raise("a tensor of storage \"{}\" has a negative size or stride; the checkpoint is corrupt", t.storage->key);
      }
      if (t.size[d] == 0) empty = true;
      std::int64_t span = 0;
      if (t.size[d] > 0 &&
          (__builtin_mul_overflow(t.size[d] - 1, t.stride[d], &span) || __builtin_add_overflow(last, span, &last))) {
        raise("a tensor of storage \"{}\" has a size and stride that overflow", t.storage->key);
      }
    }
    if (!empty && last >= flat.numel()) {
      raise("a tensor reaches element {} of storage \"{}\", which has {}; the checkpoint is corrupt", last,
            t.storage->key, flat.numel());
    }
    if (empty && t.offset > flat.numel()) raise("an empty tensor starts past its storage \"{}\"", t.storage->key);
    if (!t.requires_grad) return flat.as_strided(t.size, t.stride, t.offset);
    // NOTE: as Python's _rebuild_tensor_v2: a leaf over the storage (a view cannot take requires_grad).
    if (!at::isFloatingType(flat.scalar_type()) && !at::isComplexType(flat.scalar_type())) {
      raise("a tensor of storage \"{}\" requires grad but is of {}; only floating point tensors can", t.storage->key,
            c10::toString(flat.scalar_type()));
    }
    at::Tensor leaf = at::empty({0}, flat.options());
    leaf.set_(flat.storage(), t.offset, t.size, t.stride);
    leaf.set_requires_grad(true);
    return leaf;
  }

  const pickle::ZipArchive& zip_;
  std::string prefix_;
  static constexpr std::uint64_t max_expanded = 1u << 24;
  std::unordered_map<const Value*, std::pair<c10::IValue, std::uint64_t>> done_;
  std::uint64_t last_size_ = 0;
  std::set<const Value*> active_;
  std::map<std::string, std::pair<std::string, at::Tensor>> storages_;
};

/// Reads the value a torch.save file holds (zip format), refusing anything but plain data.
inline c10::IValue read_bytes(std::string_view file, const std::string& where) {
  try {
    if (pickle::legacy_torch_file(file)) {
      raise(
          "it is in the legacy format of torch.save(..., _use_new_zipfile_serialization=False), which fabric does not "
          "read; re-save it in Python with torch.save(torch.load(path), path)");
    }
    if (file.size() < 4 || file.substr(0, 4) != std::string_view("PK\x03\x04", 4)) {
      raise("it is not a zip archive, so not a torch.save file (nor a fabric checkpoint)");
    }
    const pickle::ZipArchive zip(file);
    const std::string prefix = pickle::archive_prefix(zip);
    if (zip.contains(prefix + "/constants.pkl")) {
      raise(
          "it is a TorchScript archive (torch::save of a module or optimizer, or torch.jit.save), not a torch.save "
          "file; load it with load_raw");
    }
    if (zip.contains(prefix + "/byteorder") && zip.record(prefix + "/byteorder") != "little") {
      raise("its tensors are stored big-endian (byteorder \"{}\"); expected little-endian",
            std::string(zip.record(prefix + "/byteorder")));
    }
    const pickle::Tree tree(zip.record(prefix + "/data.pkl"));
    Builder builder(zip, prefix);
    return builder.build(tree.root());
  } catch (const Error& e) {
    raise("could not read {}: {}", where, e.what());
  } catch (const c10::Error& e) {
    raise("could not read {}: {}", where, first_line(e.what_without_backtrace()));
  }
}

// ---- optimizers: LibTorch's archive <-> PyTorch's optimizer.state_dict() --------------------------

inline bool double_option(const std::string& name) {
  static const std::set<std::string> names = {
      "lr",    "momentum",       "dampening",       "weight_decay", "eps", "lr_decay", "initial_accumulator_value",
      "alpha", "tolerance_grad", "tolerance_change"};
  return names.contains(name);
}
inline bool bool_option(const std::string& name) {
  return name == "nesterov" || name == "amsgrad" || name == "centered";
}

/// PyTorch's optimizer.state_dict() of fabric's optimizer entry ({"archive", "shapes", "type"}):
/// {"state": {index: {name: value}}, "param_groups": [{options..., "params": [indices]}]}, with "step"
/// a float tensor as PyTorch keeps it and PyTorch's own group options at their defaults.
inline c10::IValue optimizer_to_python(const std::string& key, const c10::impl::GenericDict& entry) {
  const std::string type = entry.contains("type") && entry.at("type").isString() ? entry.at("type").toStringRef() : "";
  if (type.find("LBFGS") != std::string::npos) {
    raise(
        "state entry \"{}\": an LBFGS keeps whole-model state that PyTorch's LBFGS lays out differently, so "
        "TorchCheckpointIO cannot write it for Python; save it in fabric's native format (a path ending in "
        "\".fabric\", or fabric::NativeCheckpointIO given to the strategy)",
        key);
  }
  const at::Tensor blob = entry.at("archive").toTensor().contiguous();
  torch::serialize::InputArchive archive;
  archive.load_from(static_cast<const char*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel()));
  torch::serialize::InputArchive groups_archive;
  archive.read("param_groups", groups_archive);
  const std::int64_t group_count = archive_int(groups_archive, "param_groups/size");
  std::map<std::string, std::int64_t> index_of;
  std::int64_t next = 0;
  c10::impl::GenericList groups(c10::AnyType::get());
  const bool adam = type.find("Adam") != std::string::npos;
  for (std::int64_t g = 0; g < group_count; ++g) {
    torch::serialize::InputArchive group_archive;
    groups_archive.read("param_groups/" + std::to_string(g), group_archive);
    torch::serialize::InputArchive options;
    group_archive.read("options", options);
    c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
    for (const auto& name : options.keys()) {
      c10::IValue v;
      options.read(name, v);
      group.insert(name, v);
    }
    // PyTorch's options that LibTorch lacks, at PyTorch's defaults (what LibTorch's step does).
    if (adam || type.find("SGD") != std::string::npos || type.find("RMSprop") != std::string::npos ||
        type.find("Adagrad") != std::string::npos) {
      group.insert("maximize", false);
      group.insert("foreach", c10::IValue());
      group.insert("differentiable", false);
      if (adam) group.insert("capturable", false);
    }
    c10::List<std::int64_t> params;
    const std::int64_t count = archive_int(group_archive, "params/size");
    for (std::int64_t j = 0; j < count; ++j) {
      c10::IValue old_key;
      group_archive.read("params/" + std::to_string(j), old_key);
      index_of[old_key.toStringRef()] = next;
      params.push_back(next++);
    }
    group.insert("params", params);
    groups.push_back(group);
  }
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  torch::serialize::InputArchive state_archive;
  if (archive.try_read("state", state_archive)) {
    for (const auto& old_key : state_archive.keys()) {
      const auto index = index_of.find(old_key);
      if (index == index_of.end()) continue;  // state of a parameter no group holds
      torch::serialize::InputArchive param_state;
      state_archive.read(old_key, param_state);
      c10::impl::GenericDict s(c10::StringType::get(), c10::AnyType::get());
      for (const auto& name : param_state.keys()) {
        c10::IValue v;
        param_state.read(name, v);
        if (name == "step" && v.isInt()) v = at::scalar_tensor(static_cast<double>(v.toInt()), at::kFloat);
        if (v.isTensor() && v.toTensor().dim() > 0) v = v.toTensor().detach();
        s.insert(name, v);
      }
      state.insert(index->second, s);
    }
  }
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  out.insert("state", state);
  out.insert("param_groups", groups);
  return out;
}

/// A list of lists of integers as LibTorch types it (List[List[int]]); the unpickler gives lists of
/// anything. A value of another shape is returned as it is (load reports it).
inline c10::IValue int_lists(const c10::IValue& v) {
  if (!v.isList()) return v;
  c10::impl::GenericList out(c10::ListType::ofInts());
  for (const c10::IValue inner : v.toList()) {
    if (!inner.isList()) return v;
    c10::List<std::int64_t> ints;
    for (const c10::IValue i : inner.toList()) {
      if (!i.isInt()) return v;
      ints.push_back(i.toInt());
    }
    out.push_back(ints);
  }
  return out;
}

/// Says whether a value has the shape of PyTorch's optimizer.state_dict().
inline bool is_python_optimizer(const c10::IValue& v) {
  if (!v.isGenericDict()) return false;
  const auto d = v.toGenericDict();
  if (d.size() != 2 || d.keyType()->kind() != c10::TypeKind::StringType || !d.contains("state") ||
      !d.contains("param_groups")) {
    return false;
  }
  return d.at("state").isGenericDict() && d.at("param_groups").isList();
}

inline double as_double(const std::string& where, const c10::IValue& v) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  if (v.isBool()) return v.toBool() ? 1.0 : 0.0;
  if (v.isTensor() && v.toTensor().numel() == 1) return v.toTensor().item<double>();
  raise("{}: expected a number, found {}", where, describe(v));
}

/// fabric's optimizer entry ({"archive": LibTorch's archive}) of PyTorch's optimizer.state_dict();
/// parameters are matched by position as PyTorch's load_state_dict does, and state shapes are checked
/// when the optimizer is loaded.
inline c10::IValue optimizer_from_python(const std::string& key, const c10::impl::GenericDict& d) {
  torch::serialize::OutputArchive archive;
  archive.write("pytorch_version", c10::IValue("1.5.0"));
  torch::serialize::OutputArchive groups_archive(archive.compilation_unit());
  const auto groups = d.at("param_groups").toList();
  groups_archive.write("param_groups/size", at::scalar_tensor(static_cast<std::int64_t>(groups.size()), at::kLong));
  std::set<std::int64_t> ids;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const std::string where = fmt::format("\"{}\": param_groups[{}]", key, g);
    const c10::IValue gv = groups.get(g);
    if (!gv.isGenericDict() || gv.toGenericDict().keyType()->kind() != c10::TypeKind::StringType ||
        !gv.toGenericDict().contains("params") || !gv.toGenericDict().at("params").isList()) {
      raise("{}: expected a dictionary with \"params\", found {}", where, describe(gv));
    }
    const auto group = gv.toGenericDict();
    torch::serialize::OutputArchive group_archive(archive.compilation_unit());
    const auto params = group.at("params").toList();
    group_archive.write("params/size", at::scalar_tensor(static_cast<std::int64_t>(params.size()), at::kLong));
    for (std::size_t j = 0; j < params.size(); ++j) {
      const c10::IValue p = params.get(j);
      if (!p.isInt()) raise("{}: a parameter id is {}, not an integer", where, describe(p));
      ids.insert(p.toInt());
      group_archive.write("params/" + std::to_string(j), c10::IValue(std::to_string(p.toInt())));
    }
    torch::serialize::OutputArchive options(archive.compilation_unit());
    for (const auto& item : group) {
      const std::string& name = item.key().toStringRef();
      const c10::IValue& v = item.value();
      if (name == "maximize" && v.isBool() && v.toBool()) {
        raise("{}: maximize=True, which LibTorch's optimizers do not have; train with maximize=False", where);
      }
      if (double_option(name)) {
        options.write(name, c10::IValue(as_double(where + "." + name, v)));
      } else if (bool_option(name)) {
        if (!v.isBool()) raise("{}.{}: expected a bool, found {}", where, name, describe(v));
        options.write(name, v);
      } else if (name == "betas") {
        std::vector<c10::IValue> items;
        if (v.isTuple()) {
          for (const auto& b : v.toTupleRef().elements()) items.push_back(b);
        } else if (v.isList()) {
          for (const auto& b : v.toList()) items.push_back(b);
        }
        if (items.size() != 2) raise("{}.betas: expected two numbers, found {}", where, describe(v));
        options.write(name, c10::IValue(std::make_tuple(as_double(where + ".betas", items[0]),
                                                        as_double(where + ".betas", items[1]))));
      }
      // Other keys are PyTorch's alone (foreach, capturable, differentiable, fused, initial_lr, ...).
    }
    group_archive.write("options", options);
    groups_archive.write("param_groups/" + std::to_string(g), group_archive);
  }
  torch::serialize::OutputArchive state_archive(archive.compilation_unit());
  for (const auto& item : d.at("state").toGenericDict()) {
    if (!item.key().isInt() || !ids.contains(item.key().toInt())) {
      raise("\"{}\": the state of parameter {} names no parameter of param_groups", key, describe(item.key()));
    }
    if (!item.value().isGenericDict()) {
      raise("\"{}\": the state of parameter {} is {}, not a dictionary", key, item.key().toInt(),
            describe(item.value()));
    }
    torch::serialize::OutputArchive param_state(archive.compilation_unit());
    bool any = false;
    for (const auto& field : item.value().toGenericDict()) {
      if (!field.key().isString()) continue;
      const std::string& name = field.key().toStringRef();
      const c10::IValue& v = field.value();
      if (v.isNone()) continue;  // e.g. SGD's momentum_buffer without momentum
      if (name == "step") {
        param_state.write(name, c10::IValue(static_cast<std::int64_t>(std::llround(as_double("step", v)))));
      } else if (v.isTensor()) {
        param_state.write(name, v.toTensor(), /*is_buffer=*/true);
      } else {
        param_state.write(name, v);
      }
      any = true;
    }
    if (any) state_archive.write(std::to_string(item.key().toInt()), param_state);
  }
  archive.write("state", state_archive);
  archive.write("param_groups", groups_archive);
  std::vector<char> bytes;
  archive.save_to([&](const void* data, std::size_t n) {
    bytes.insert(bytes.end(), static_cast<const char*>(data), static_cast<const char*>(data) + n);
    return n;
  });
  at::Tensor blob = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(blob.data_ptr(), bytes.data(), bytes.size());
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  out.insert("archive", blob);
  return out;
}

// ---- writing --------------------------------------------------------------------------------------

/// Writes IValues as Python's pickler does for the same Python values, collecting tensor storages
/// (each storage once; views keep their offsets and strides).
class PickleWriter {
 public:
  void value(const c10::IValue& v, std::size_t depth = 0) {
    if (depth > 512) raise("the state nests values more than 512 deep");
    if (v.isNone()) {
      w_.none();
    } else if (v.isBool()) {
      w_.boolean(v.toBool());
    } else if (v.isInt()) {
      w_.integer(v.toInt());
    } else if (v.isDouble()) {
      w_.floating(v.toDouble());
    } else if (v.isString()) {
      w_.string(v.toStringRef());
    } else if (v.isTensor()) {
      tensor(v.toTensor());
    } else if (v.isTuple()) {
      const auto& items = v.toTupleRef().elements();
      if (items.empty()) {
        w_.empty_tuple();
        return;
      }
      w_.mark();
      for (const auto& item : items) value(item, depth + 1);
      w_.tuple();
    } else if (v.isList()) {
      w_.empty_list();
      const auto list = v.toList();
      if (list.empty()) return;
      w_.mark();
      for (const auto& item : list) value(item, depth + 1);
      w_.appends();
    } else if (v.isGenericDict()) {
      w_.empty_dict();
      const auto dict = v.toGenericDict();
      if (dict.empty()) return;
      w_.mark();
      for (const auto& item : dict) {
        value(item.key(), depth + 1);
        value(item.value(), depth + 1);
      }
      w_.setitems();
    } else if (v.isDevice()) {
      w_.global("torch", "device");
      w_.mark();
      w_.string(v.toDevice().str());
      w_.tuple();
      w_.reduce();
    } else {
      raise("cannot write {} ({}) for Python; expected tensors, numbers, strings, dictionaries, lists and tuples",
            describe(v), v.tagKind());
    }
  }

  void tensor(const at::Tensor& input) {
    if (!input.defined()) raise("cannot write an undefined tensor for Python; give it a value or leave it out");
    const bool requires_grad = input.requires_grad();
    at::Tensor t = input.detach();
    if (t.layout() != at::kStrided || t.is_quantized()) raise("cannot write a sparse or quantized tensor for Python");
    if (!t.device().is_cpu()) t = t.cpu();
    const char* name = storage_name(t.scalar_type());
    if (name == nullptr) raise("cannot write a tensor of {} for Python", c10::toString(t.scalar_type()));
    const void* impl = t.storage().unsafeGetStorageImpl();
    auto it = keys_.find(impl);
    if (it == keys_.end()) {
      const std::string key = std::to_string(storages_.size());
      it = keys_.emplace(impl, key).first;
      storages_.emplace_back(key, t);
    } else if (storages_[std::stoul(it->second)].second.scalar_type() != t.scalar_type()) {
      // A storage viewed with two element types: write this one on its own.
      t = t.clone();
      const std::string key = std::to_string(storages_.size());
      storages_.emplace_back(key, t);
      it = keys_.emplace(t.storage().unsafeGetStorageImpl(), key).first;
    }
    const std::int64_t element = static_cast<std::int64_t>(t.element_size());
    w_.global("torch._utils", "_rebuild_tensor_v2");
    w_.mark();
    w_.mark();
    w_.string("storage");
    w_.global("torch", name);
    w_.string(it->second);
    w_.string("cpu");
    w_.integer(static_cast<std::int64_t>(t.storage().nbytes()) / element);
    w_.tuple();
    w_.binpersid();
    w_.integer(t.storage_offset());
    ints(t.sizes());
    ints(t.strides());
    w_.boolean(requires_grad);
    w_.global("collections", "OrderedDict");
    w_.empty_tuple();
    w_.reduce();
    w_.tuple();
    w_.reduce();
  }

  /// The pickle and the storages (key, a tensor of that storage), after `value`.
  std::string finish() {
    w_.stop();
    return w_.bytes();
  }
  const std::vector<std::pair<std::string, at::Tensor>>& storages() const { return storages_; }
  void start() { w_.proto(); }

 private:
  void ints(at::IntArrayRef values) {
    if (values.empty()) {
      w_.empty_tuple();
      return;
    }
    w_.mark();
    for (const auto v : values) w_.integer(v);
    w_.tuple();
  }

  pickle::Writer w_;
  std::unordered_map<const void*, std::string> keys_;
  std::vector<std::pair<std::string, at::Tensor>> storages_;
};

/// The bytes of a torch.save zip file holding value.
inline std::vector<char> write_bytes(const c10::IValue& value) {
  PickleWriter writer;
  writer.start();
  writer.value(value);
  const std::string data = writer.finish();
  std::vector<char> out;
  {
    caffe2::serialize::PyTorchStreamWriter zip([&](const void* buf, std::size_t n) {
      out.insert(out.end(), static_cast<const char*>(buf), static_cast<const char*>(buf) + n);
      return n;
    });
    zip.writeRecord("data.pkl", data.data(), data.size());
    zip.writeRecord("byteorder", "little", 6);
    for (const auto& [key, tensor] : writer.storages()) {
      const auto& storage = tensor.storage();
      zip.writeRecord("data/" + key, storage.data(), storage.nbytes());
    }
    zip.writeEndOfFile();
  }
  return out;
}

}  // namespace detail::torch_pickle

namespace detail {

/// The value of a torch.save file of Python at path; nothing when the file is not one (a LibTorch
/// torch::save archive, which load_raw reads through LibTorch). A Python file naming anything but
/// plain data is a fabric::Error.
inline std::optional<c10::IValue> read_python_file(const std::filesystem::path& path) {
  const std::vector<char> bytes = read_file(path);
  const std::string_view file(bytes.data(), bytes.size());
  if (pickle::legacy_torch_file(file)) return torch_pickle::read_bytes(file, path.string());  // its clear error
  if (file.size() < 4 || file.substr(0, 4) != std::string_view("PK\x03\x04", 4)) return std::nullopt;
  try {
    const pickle::ZipArchive zip(file);
    if (zip.contains(pickle::archive_prefix(zip) + "/constants.pkl")) return std::nullopt;
  } catch (const Error&) {
    return std::nullopt;
  }
  return torch_pickle::read_bytes(file, path.string());
}

namespace torch_pickle {
/// Says whether bytes are a file of Python's torch.save rather than one of LibTorch's pickler (fabric's
/// native checkpoints), whose pickles tag their containers with torch.jit._pickle globals.
inline bool is_python_torch_bytes(std::string_view file) {
  if (pickle::legacy_torch_file(file)) return true;
  if (file.size() < 4 || file.substr(0, 4) != std::string_view("PK\x03\x04", 4)) return false;
  try {
    const pickle::ZipArchive zip(file);
    const std::string prefix = pickle::archive_prefix(zip);
    if (zip.contains(prefix + "/constants.pkl")) return false;
    return zip.record(prefix + "/data.pkl").find("torch.jit._pickle") == std::string_view::npos;
  } catch (const Error&) {
    return false;
  }
}
}  // namespace torch_pickle

/// Says whether the file at path is one of Python's torch.save (see is_python_torch_bytes); a missing
/// or empty file is a fabric::Error.
inline bool is_python_torch_file(const std::filesystem::path& path) {
  const std::vector<char> bytes = read_file(path);
  return torch_pickle::is_python_torch_bytes(std::string_view(bytes.data(), bytes.size()));
}

/// Loads a Python state_dict (names to tensors) into a module, checking names and shapes first.
inline void load_python_module(const std::filesystem::path& path, const c10::IValue& value, torch::nn::Module& module,
                               bool strict) {
  if (!value.isGenericDict() || value.toGenericDict().keyType()->kind() != c10::TypeKind::StringType) {
    raise("expected a module's state_dict (names to tensors) in {}, found {}", path.string(), describe(value));
  }
  const auto dict = value.toGenericDict();
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::set<std::string> known;
  for (auto& [name, tensor] : module_tensors(module)) {
    known.insert(name);
    if (!dict.contains(name)) {
      if (strict) errors.push_back(fmt::format("\"{}\": missing from the file", name));
      continue;
    }
    const c10::IValue& v = dict.at(name);
    if (!v.isTensor()) {
      errors.push_back(fmt::format("\"{}\": expected a tensor, found {}", name, describe(v)));
    } else if (v.toTensor().sizes() != tensor.sizes()) {
      errors.push_back(fmt::format("\"{}\": expected shape {}, found shape {} in the file", name,
                                   shape_str(tensor.sizes()), shape_str(v.toTensor().sizes())));
    } else {
      copies.emplace_back(tensor, v.toTensor());
    }
  }
  if (strict) {
    for (const auto& item : dict) {
      if (!known.contains(item.key().toStringRef())) {
        errors.push_back(fmt::format("\"{}\": in the file but not in the module", item.key().toStringRef()));
      }
    }
  }
  finish_module_load(path, errors, copies, strict);
}

/// Loads a Python optimizer.state_dict() into an optimizer, checking groups, type and shapes first.
inline void load_python_optimizer(const std::filesystem::path& path, const c10::IValue& value,
                                  torch::optim::Optimizer& optimizer) {
  if (!torch_pickle::is_python_optimizer(value)) {
    raise("expected an optimizer's state_dict ({{\"state\", \"param_groups\"}}) in {}, found {}", path.string(),
          describe(value));
  }
  torch::serialize::InputArchive archive;
  std::vector<std::string> errors;
  try {
    const at::Tensor blob = torch_pickle::optimizer_from_python("optimizer", value.toGenericDict())
                                .toGenericDict()
                                .at("archive")
                                .toTensor();
    archive.load_from(static_cast<const char*>(blob.data_ptr()), static_cast<std::size_t>(blob.numel()));
  } catch (const c10::Error& e) {
    raise("could not read the optimizer state in {} ({})", path.string(), first_line(e.what_without_backtrace()));
  }
  check_optimizer_archive("", archive, optimizer, "the file", errors);
  if (!errors.empty()) {
    raise("cannot load {} into the optimizer ({} problem{}; nothing was changed):\n  {}", path.string(), errors.size(),
          errors.size() == 1 ? "" : "s", fmt::join(errors, "\n  "));
  }
  try {
    (void)load_optimizer_archive(archive, optimizer);
  } catch (const c10::Error& e) {
    raise("could not load the optimizer state in {} ({}); nothing was changed", path.string(),
          first_line(e.what_without_backtrace()));
  }
}

/// Refuses a fabric checkpoint given to load_raw (it carries fabric's marker entry): load reads those.
inline void refuse_fabric_checkpoint_in_load_raw(const std::filesystem::path& path, const c10::IValue& value) {
  // NOTE: fabric's own checkpoints are torch pickles too; they carry fabric's marker entry.
  if (value.isGenericDict() && value.toGenericDict().contains("__fabric__")) {
    raise(
        "expected a file written by torch::save or Python's torch.save at {}, found a fabric checkpoint (written "
        "by fabric.save); use load for fabric checkpoints",
        path.string());
  }
}
/// load_raw of a module from the value of a torch.save file (a state_dict).
inline void load_raw_python(const std::filesystem::path& path, const c10::IValue& value, torch::nn::Module& module,
                            bool strict) {
  refuse_fabric_checkpoint_in_load_raw(path, value);
  load_python_module(path, value, module, strict);
}
/// load_raw of an optimizer from the value of a torch.save file (an optimizer.state_dict()).
inline void load_raw_python(const std::filesystem::path& path, const c10::IValue& value,
                            torch::optim::Optimizer& optimizer) {
  refuse_fabric_checkpoint_in_load_raw(path, value);
  load_python_optimizer(path, value, optimizer);
}

}  // namespace detail

/// Checkpoints in Python's torch.save format, readable by Python with
/// `torch.load(path, weights_only=True)` (torch 2.x) as a plain dictionary: modules as `{name: tensor}`,
/// optimizers in PyTorch's `optimizer.state_dict()` layout (so `model.load_state_dict`,
/// `optimizer.load_state_dict` and Lightning's `fabric.load` resume from it), other values as they are,
/// and fabric's "__fabric__" entry. It reads those files and Python's own (`torch.save(model.state_dict())`,
/// Lightning's `fabric.save`) through a restricted unpickler that runs no pickled code: a file naming any
/// Python object outside tensors, storages, OrderedDict, torch.Size and torch.device is refused.
///
///     fabric::Fabric fabric(fabric::SingleDevice({.checkpoint_io = fabric::TorchCheckpointIO{}}));
///     fabric.save("model.ckpt", {{"model", model}, {"optimizer", optimizer}, {"step", step}});
class TorchCheckpointIO {
 public:
  /// Writes the checkpoint as torch.save does, atomically.
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
    std::map<std::string, std::string> kinds = entry_kinds(checkpoint);
    // What PyTorch's layout has no place for (the optimizer's LibTorch type and its parameters' shapes,
    // which load checks first) goes into fabric's marker entry.
    c10::impl::GenericDict optimizers(c10::StringType::get(), c10::AnyType::get());
    for (const auto& item : checkpoint) {
      const std::string& key = item.key().toStringRef();
      c10::IValue value = item.value();
      if (kinds[key] == "optimizer" && value.isGenericDict() && value.toGenericDict().contains("archive")) {
        c10::impl::GenericDict extra(c10::StringType::get(), c10::AnyType::get());
        for (const char* name : {"type", "shapes"}) {
          if (value.toGenericDict().contains(name)) extra.insert(name, value.toGenericDict().at(name));
        }
        optimizers.insert(key, extra);
        try {
          value = detail::torch_pickle::optimizer_to_python(key, value.toGenericDict());
        } catch (const c10::Error& e) {
          detail::raise(
              "state entry \"{}\": could not convert the optimizer state for Python ({}); nothing was written", key,
              detail::first_line(e.what_without_backtrace()));
        }
      }
      root.insert(key, value);
    }
    if (!optimizers.empty() && root.contains("__fabric__") && root.at("__fabric__").isGenericDict()) {
      c10::impl::GenericDict marker = root.at("__fabric__").toGenericDict().copy();
      marker.insert_or_assign("optimizers", optimizers);
      root.insert_or_assign("__fabric__", marker);
    }
    std::vector<char> bytes;
    try {
      bytes = detail::torch_pickle::write_bytes(root);
    } catch (const c10::Error& e) {
      detail::raise("could not write {} for Python ({}); nothing was written", path.string(),
                    detail::first_line(e.what_without_backtrace()));
    }
    detail::write_atomically(path, bytes.data(), bytes.size());
  }

  /// Reads a file of torch.save (Python's, or this format's) as a checkpoint; optimizer entries in
  /// PyTorch's layout become fabric's. A file that is not one, or names anything but plain data, is a
  /// fabric::Error.
  Checkpoint load_checkpoint(const std::filesystem::path& path) const {
    const std::vector<char> bytes = detail::read_file(path);
    const c10::IValue value =
        detail::torch_pickle::read_bytes(std::string_view(bytes.data(), bytes.size()), path.string());
    if (!value.isGenericDict() || value.toGenericDict().keyType()->kind() != c10::TypeKind::StringType) {
      detail::raise(
          "expected a checkpoint dictionary with string keys in {}, found {}; to load a bare state_dict use "
          "fabric.load(path, {{{{\"model\", model}}}}) on a file of torch.save({{\"model\": model.state_dict()}})",
          path.string(), detail::describe(value));
    }
    Checkpoint checkpoint(c10::StringType::get(), c10::AnyType::get());
    // This format's files keep each optimizer's LibTorch type and parameter shapes in the marker.
    c10::impl::GenericDict optimizers(c10::StringType::get(), c10::AnyType::get());
    const auto root = value.toGenericDict();
    if (root.contains("__fabric__") && root.at("__fabric__").isGenericDict()) {
      const auto marker = root.at("__fabric__").toGenericDict();
      if (marker.contains("optimizers") && marker.at("optimizers").isGenericDict()) {
        optimizers = marker.at("optimizers").toGenericDict();
      }
    }
    try {
      for (const auto& item : root) {
        const std::string& key = item.key().toStringRef();
        c10::IValue v = item.value();
        if (detail::torch_pickle::is_python_optimizer(v)) {
          auto entry = detail::torch_pickle::optimizer_from_python(key, v.toGenericDict()).toGenericDict();
          if (optimizers.contains(key) && optimizers.at(key).isGenericDict()) {
            for (const auto& extra : optimizers.at(key).toGenericDict()) {
              entry.insert(extra.key(),
                           extra.key() == "shapes" ? detail::torch_pickle::int_lists(extra.value()) : extra.value());
            }
          }
          v = entry;
        } else if (key == "__fabric__" && v.isGenericDict() && v.toGenericDict().contains("optimizers")) {
          auto marker = v.toGenericDict().copy();
          (void)marker.erase("optimizers");
          v = marker;
        }
        checkpoint.insert(key, v);
      }
    } catch (const c10::Error& e) {
      detail::raise("could not read the optimizer state in {} ({})", path.string(),
                    detail::first_line(e.what_without_backtrace()));
    }
    return checkpoint;
  }

  /// Removes the checkpoint at path (nothing when there is none).
  void remove_checkpoint(const std::filesystem::path& path) const {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (ec) detail::raise("could not remove the checkpoint {}: {}", path.string(), ec.message());
  }

  /// Claims the paths a Lightning user expects torch.save's format at: `*.ckpt`, `*.pt` and `*.pth`.
  bool claims(const std::filesystem::path& path) const {
    const auto ext = path.extension();
    return ext == ".ckpt" || ext == ".pt" || ext == ".pth";
  }
  /// Recognises files of Python's torch.save (zip or legacy) and this format's, by their pickle: LibTorch's
  /// own (fabric's native checkpoints) tag their containers with torch.jit._pickle globals.
  bool recognises(const std::filesystem::path& path) const {
    if (file_head(path, 1).empty()) return false;
    try {
      return detail::is_python_torch_file(path);
    } catch (const Error&) {
      return false;
    }
  }
  /// Loads a module from a Python state_dict file (names, shapes checked first); a fabric checkpoint is
  /// refused (use load).
  void load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) const {
    detail::load_raw_python(path, read(path), module, strict);
  }
  /// Loads an optimizer from a Python optimizer.state_dict() file (groups, type and shapes checked first).
  void load_raw(const std::filesystem::path& path, torch::optim::Optimizer& optimizer, bool /*strict*/) const {
    detail::load_raw_python(path, read(path), optimizer);
  }

  /// Reads any torch.save file into a value (a state_dict, an optimizer state_dict, ...), through the
  /// same restricted reader; nothing in it is converted.
  static c10::IValue read(const std::filesystem::path& path) {
    const std::vector<char> bytes = detail::read_file(path);
    return detail::torch_pickle::read_bytes(std::string_view(bytes.data(), bytes.size()), path.string());
  }

 private:
  static std::map<std::string, std::string> entry_kinds(const Checkpoint& checkpoint) {
    std::map<std::string, std::string> out;
    if (!checkpoint.contains("__fabric__") || !checkpoint.at("__fabric__").isGenericDict()) return out;
    const auto marker = checkpoint.at("__fabric__").toGenericDict();
    if (!marker.contains("kinds") || !marker.at("kinds").isGenericDict()) return out;
    for (const auto& k : marker.at("kinds").toGenericDict()) {
      if (k.key().isString() && k.value().isString()) out[k.key().toStringRef()] = k.value().toStringRef();
    }
    return out;
  }
};

}  // namespace fabric
