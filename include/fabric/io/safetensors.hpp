#pragma once
// fabric::SafetensorsCheckpointIO: checkpoints in Hugging Face's safetensors format, which Python's
// `safetensors.torch.load_file` reads (a module's tensors under the names of its state_dict()), and
// which fabric reads back memory-mapped, from fabric or from anyone else; and fabric::AutoCheckpointIO,
// the list of fabric's formats that save, load and load_raw pick from by default.

#include "fabric/core/error.hpp"
#include "fabric/core/version.hpp"
#include "fabric/detail/archive.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/detail/safetensors_header.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/io/native.hpp"
#include "fabric/io/state.hpp"
#include "fabric/io/torch_pickle.hpp"
#include "fabric/utils/apply.hpp"
#include "fabric/wrappers/module.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/serialize/input-archive.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace fabric {
namespace detail::safetensors {

static_assert(std::endian::native == std::endian::little,
              "fabric: safetensors data is little-endian; fabric reads it on little-endian machines only");

/// The metadata key of fabric's layout (JSON): what each checkpoint entry was and where its parts are.
inline constexpr const char* layout_key = "__fabric__";

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kBool:
      return "BOOL";
    case at::kByte:
      return "U8";
    case at::kChar:
      return "I8";
    case at::kShort:
      return "I16";
    case at::kInt:
      return "I32";
    case at::kLong:
      return "I64";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    case at::kFloat:
      return "F32";
    case at::kDouble:
      return "F64";
    case at::kComplexFloat:
      return "C64";
    default:
      return nullptr;
  }
}

inline std::optional<at::ScalarType> scalar_type(std::string_view dtype) {
  for (const at::ScalarType t : {at::kBool, at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf,
                                 at::kBFloat16, at::kFloat, at::kDouble, at::kComplexFloat}) {
    if (dtype == dtype_name(t)) return t;
  }
  return std::nullopt;
}

/// A file mapped into memory (private, copy-on-write), unmapped when the last tensor over it dies.
class Mapping {
 public:
  explicit Mapping(const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) raise("could not open {}: {}", path.string(), std::generic_category().message(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      raise("could not read {}: expected a regular file", path.string());
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ < 8) {
      ::close(fd);
      raise("could not read {} as safetensors: the file has {} bytes, expected at least 8", path.string(), size_);
    }
    void* addr = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    const int error = errno;
    ::close(fd);
    if (addr == MAP_FAILED) raise("could not map {}: {}", path.string(), std::generic_category().message(error));
    data_ = static_cast<unsigned char*>(addr);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { ::munmap(data_, size_); }

  unsigned char* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A file read: its header, and its tensors over the mapping (each keeps the mapping alive).
struct File {
  Header header;
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

/// Maps and validates a safetensors file; tensors are views of the mapping, not copies (a tensor whose
/// data is not aligned for its type is copied).
inline File read(const std::filesystem::path& path) {
  auto mapping = std::make_shared<Mapping>(path);
  File file;
  try {
    file.header = parse_header(std::span<const unsigned char>(mapping->data(), mapping->size()), mapping->size());
  } catch (const Error& e) {
    raise("could not read {}: {}", path.string(), e.what());
  }
  for (const auto& [key, value] : file.header.metadata) file.metadata[key] = value;
  for (const auto& info : file.header.tensors) {
    const auto type = scalar_type(info.dtype);
    if (!type) {
      raise("could not read {}: tensor \"{}\" has the dtype {}, which this LibTorch has no type for", path.string(),
            info.name, info.dtype);
    }
    unsigned char* data = mapping->data() + file.header.data_start + info.begin;
    const auto options = at::TensorOptions().dtype(*type);
    at::Tensor t;
    const auto item = static_cast<std::uintptr_t>(c10::elementSize(*type));
    if (info.begin == info.end) {
      t = at::empty(info.shape, options);
    } else if (reinterpret_cast<std::uintptr_t>(data) % item != 0) {
      t = at::empty(info.shape, options);
      std::memcpy(t.data_ptr(), data, info.end - info.begin);
    } else {
      t = at::from_blob(
          data, info.shape, [keep = mapping](void*) {}, options);
    }
    file.tensors.emplace(info.name, std::move(t));
  }
  return file;
}

// ---- values: type-tagged strings in __metadata__ ----

inline std::string encode_value(const c10::IValue& v, const std::string& where) {
  if (v.isBool()) return v.toBool() ? "bool:true" : "bool:false";
  if (v.isInt()) return fmt::format("int:{}", v.toInt());
  if (v.isDouble()) return fmt::format("float:{}", v.toDouble());
  if (v.isString()) return "str:" + v.toStringRef();
  if (v.isNone()) return "none:";
  raise(
      "cannot write \"{}\" to safetensors: it is {}; expected tensors, dictionaries, lists, numbers, booleans and "
      "strings",
      where, describe(v));
}

inline c10::IValue decode_value(const std::string& text) {
  const auto colon = text.find(':');
  const std::string tag = colon == std::string::npos ? "" : text.substr(0, colon);
  const std::string rest = colon == std::string::npos ? text : text.substr(colon + 1);
  if (tag == "bool" && (rest == "true" || rest == "false")) return rest == "true";
  if (tag == "int" || tag == "float") {
    const char* begin = rest.c_str();
    char* end = nullptr;
    errno = 0;
    if (tag == "int") {
      const long long n = std::strtoll(begin, &end, 10);
      if (!rest.empty() && *end == '\0' && errno == 0) return static_cast<std::int64_t>(n);
    } else {
      const double d = std::strtod(begin, &end);
      if (!rest.empty() && *end == '\0') return d;
    }
  }
  if (tag == "str") return rest;
  if (tag == "none" && rest.empty()) return c10::IValue();
  return text;  // a string another writer put there, as it is
}

// ---- the optimizer: Python's optimizer.state_dict() layout (torch_pickle's converters), flattened ----

inline nlohmann::ordered_json option_json(const c10::IValue& v, const std::string& where) {
  if (v.isBool()) return v.toBool();
  if (v.isInt()) return v.toInt();
  if (v.isDouble()) return v.toDouble();
  if (v.isString()) return v.toStringRef();
  if (v.isNone()) return nullptr;
  if (v.isTuple() || v.isList()) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    const auto items = v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
    for (const auto& item : items) out.push_back(option_json(item, where));
    return out;
  }
  if (v.isGenericDict()) {
    nlohmann::ordered_json out = nlohmann::ordered_json::object();
    for (const auto& item : v.toGenericDict()) {
      out[item.key().isString() ? item.key().toStringRef() : fmt::format("{}", item.key().toInt())] =
          option_json(item.value(), where);
    }
    return out;
  }
  raise("cannot write the optimizer's {} to safetensors: it is {}", where, describe(v));
}

inline c10::IValue json_value(const nlohmann::json& j) {
  if (j.is_boolean()) return j.get<bool>();
  if (j.is_number_integer()) return j.get<std::int64_t>();
  if (j.is_number_float()) return j.get<double>();
  if (j.is_string()) return j.get<std::string>();
  if (j.is_array()) {
    const bool ints = std::all_of(j.begin(), j.end(), [](const nlohmann::json& x) { return x.is_number_integer(); });
    if (ints && !j.empty()) {
      c10::List<std::int64_t> out;
      for (const auto& x : j) out.push_back(x.get<std::int64_t>());
      return out;
    }
    c10::impl::GenericList out(c10::AnyType::get());
    for (const auto& x : j) out.push_back(json_value(x));
    return out;
  }
  if (j.is_object()) {
    c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [k, v] : j.items()) out.insert(k, json_value(v));
    return out;
  }
  return c10::IValue();
}

/// Appends the optimizer's state as `<key>.state.<i>.<name>` tensors (i: the parameter's index over all
/// groups, as in Python's optimizer.state_dict(); "step" a float32 scalar as PyTorch keeps it) and
/// returns its param_groups as Python has them (options and "params": [indices]).
inline nlohmann::ordered_json flatten_optimizer(const std::string& key, const c10::impl::GenericDict& entry,
                                                std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  const auto python = torch_pickle::optimizer_to_python(key, entry).toGenericDict();
  for (const auto& item : python.at("state").toGenericDict()) {
    for (const auto& field : item.value().toGenericDict()) {
      const std::string name = fmt::format("{}.state.{}.{}", key, item.key().toInt(), field.key().toStringRef());
      const c10::IValue& v = field.value();
      if (v.isTensor()) {
        tensors.emplace_back(name, v.toTensor());
      } else if (v.isInt()) {
        tensors.emplace_back(name, at::scalar_tensor(v.toInt(), at::kLong));
      } else if (v.isDouble()) {
        tensors.emplace_back(name, at::scalar_tensor(v.toDouble(), at::kDouble));
      } else {
        raise("cannot write \"{}\" to safetensors: its state \"{}\" is {}, not a tensor or a number", key,
              field.key().toStringRef(), describe(v));
      }
    }
  }
  return option_json(python.at("param_groups"), "param_groups");
}

/// The optimizer entry of fabric's checkpoint from the flattened state and the param_groups JSON.
inline c10::IValue unflatten_optimizer(const std::string& key, const std::map<std::string, at::Tensor>& file_tensors,
                                       const nlohmann::json& groups, std::set<std::string>& used) {
  c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
  const std::string prefix = key + ".state.";
  for (const auto& [name, tensor] : file_tensors) {
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string rest = name.substr(prefix.size());
    const auto dot = rest.find('.');
    char* end = nullptr;
    const auto index = static_cast<std::int64_t>(std::strtoll(rest.c_str(), &end, 10));
    if (dot == std::string::npos || end != rest.c_str() + dot || dot == 0) continue;
    if (!state.contains(index))
      state.insert(index, c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()));
    state.at(index).toGenericDict().insert(rest.substr(dot + 1), tensor);
    used.insert(name);
  }
  c10::impl::GenericDict python(c10::StringType::get(), c10::AnyType::get());
  python.insert("state", state);
  python.insert("param_groups", json_value(groups));
  return torch_pickle::optimizer_from_python(key, python);
}

// ---- writing ----

struct Writer {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;

  /// Writes a value of a Stateful object or a plain value under name; returns its layout leaf.
  nlohmann::ordered_json value(const std::string& name, const c10::IValue& v) {
    if (v.isTensor()) {
      if (!v.toTensor().defined()) raise("cannot write \"{}\" to safetensors: the tensor is undefined", name);
      tensors.emplace_back(name, v.toTensor());
      return "tensor:" + name;
    }
    if (v.isGenericDict()) {
      nlohmann::ordered_json out = nlohmann::ordered_json::object();
      for (const auto& item : v.toGenericDict()) {
        if (!item.key().isString()) {
          raise("cannot write \"{}\" to safetensors: a key is {}; expected string keys", name, describe(item.key()));
        }
        out[item.key().toStringRef()] = value(name + "." + item.key().toStringRef(), item.value());
      }
      return nlohmann::ordered_json{{"dict", std::move(out)}};
    }
    if (v.isList() || v.isTuple()) {
      nlohmann::ordered_json out = nlohmann::ordered_json::array();
      const auto items = v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
      for (std::size_t i = 0; i < items.size(); ++i) out.push_back(value(fmt::format("{}.{}", name, i), items[i]));
      return nlohmann::ordered_json{{"list", std::move(out)}};
    }
    metadata.emplace_back(name, encode_value(v, name));
    return "meta:" + name;
  }
};

/// Writes a checkpoint dictionary as safetensors bytes (see SafetensorsCheckpointIO for the layout).
inline std::string to_bytes(const Checkpoint& checkpoint) {
  Writer w;
  nlohmann::ordered_json layout = nlohmann::ordered_json::object();
  nlohmann::ordered_json entries = nlohmann::ordered_json::object();
  std::map<std::string, std::string> kinds;
  if (checkpoint.contains(marker_key)) {
    const auto marker = checkpoint.at(marker_key).toGenericDict();
    layout["format"] = marker.at("format").toInt();
    layout["version"] = marker.at("version").toStringRef();
    for (const auto& k : marker.at("kinds").toGenericDict()) kinds[k.key().toStringRef()] = k.value().toStringRef();
  } else {
    layout["format"] = checkpoint_format;
    layout["version"] = std::string(version());
  }
  int modules = 0;
  for (const auto& [key, kind] : kinds) modules += kind == "module" ? 1 : 0;
  for (const auto& item : checkpoint) {
    const std::string key = item.key().toStringRef();
    if (key == marker_key) continue;
    const auto kind_it = kinds.find(key);
    const std::string kind = kind_it != kinds.end() ? kind_it->second : "value";
    nlohmann::ordered_json entry{{"kind", kind}};
    if (kind == "module") {
      // NOTE: one module: its tensors under their state_dict() names, as Python's model.state_dict() has them.
      nlohmann::ordered_json names = nlohmann::ordered_json::object();
      for (const auto& t : item.value().toGenericDict()) {
        const std::string name = modules == 1 ? t.key().toStringRef() : key + "." + t.key().toStringRef();
        w.tensors.emplace_back(name, t.value().toTensor());
        names[t.key().toStringRef()] = name;
      }
      entry["tensors"] = std::move(names);
    } else if (kind == "optimizer") {
      const auto dict = item.value().toGenericDict();
      nlohmann::ordered_json groups;
      try {
        groups = flatten_optimizer(key, dict, w.tensors);
      } catch (const c10::Error& e) {
        raise("cannot write \"{}\" to safetensors: its LibTorch state has an unexpected layout ({})", key,
              first_line(e.what_without_backtrace()));
      }
      w.metadata.emplace_back(key + ".param_groups", groups.dump());
      entry["type"] = dict.at("type").toStringRef();
      nlohmann::ordered_json shapes = nlohmann::ordered_json::array();
      for (const auto& s : dict.at("shapes").toListRef()) shapes.push_back(s.toIntVector());
      entry["shapes"] = std::move(shapes);
    } else {
      entry["value"] = w.value(key, item.value());
    }
    entries[key] = std::move(entry);
  }
  layout["entries"] = std::move(entries);
  w.metadata.emplace_back(layout_key, layout.dump());

  std::vector<TensorInfo> infos;
  std::vector<at::Tensor> data;
  for (auto& [name, tensor] : w.tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const char* dtype = dtype_name(t.scalar_type());
    if (dtype == nullptr) {
      raise("cannot write \"{}\" to safetensors: its dtype {} has no safetensors type; convert it first", name,
            c10::toString(t.scalar_type()));
    }
    infos.push_back(TensorInfo{name, dtype, t.sizes().vec(), 0, 0});
    data.push_back(std::move(t));
  }
  std::string out = write_header(infos, w.metadata);
  const std::size_t header = out.size();
  out.resize(header + (infos.empty() ? 0 : infos.back().end));
  for (std::size_t i = 0; i < infos.size(); ++i) {
    if (infos[i].end > infos[i].begin) {
      std::memcpy(out.data() + header + infos[i].begin, data[i].data_ptr(), infos[i].end - infos[i].begin);
    }
  }
  return out;
}

// ---- reading ----

/// Parses fabric's layout (a JSON string in the metadata), nested at most a few levels per value.
inline nlohmann::json parse_layout(const std::string& text, const std::filesystem::path& path) {
  int depth_seen = 0;
  const nlohmann::json::parser_callback_t bound = [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    depth_seen = std::max(depth_seen, depth);
    if (depth > 64)
      raise("the safetensors file {} has a \"{}\" layout nested over 64 levels", path.string(), layout_key);
    return true;
  };
  try {
    return nlohmann::json::parse(text, bound);
  } catch (const nlohmann::json::exception& e) {
    raise("the safetensors file {} has a malformed \"{}\" layout ({}); expected one fabric's save wrote", path.string(),
          layout_key, e.what());
  }
}

struct Reader {
  const File& file;
  const std::filesystem::path& path;
  std::set<std::string> used;

  [[noreturn]] void malformed(const std::string& why) const {
    raise("the safetensors file {} has a malformed \"{}\" layout ({}); expected one fabric's save wrote, unaltered",
          path.string(), layout_key, why);
  }
  at::Tensor tensor(const std::string& name) {
    const auto it = file.tensors.find(name);
    if (it == file.tensors.end()) malformed(fmt::format("it names the tensor \"{}\", which the file lacks", name));
    used.insert(name);
    return it->second;
  }
  c10::IValue value(const nlohmann::json& leaf) {
    if (leaf.is_string()) {
      const std::string s = leaf.get<std::string>();
      if (s.rfind("tensor:", 0) == 0) return tensor(s.substr(7));
      if (s.rfind("meta:", 0) == 0) {
        const auto it = file.metadata.find(s.substr(5));
        if (it == file.metadata.end()) malformed(fmt::format("it names the metadata \"{}\", which is missing", s));
        return decode_value(it->second);
      }
    } else if (leaf.is_object() && leaf.size() == 1 && leaf.contains("dict") && leaf.at("dict").is_object()) {
      c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
      for (const auto& [k, v] : leaf.at("dict").items()) out.insert(k, value(v));
      return out;
    } else if (leaf.is_object() && leaf.size() == 1 && leaf.contains("list") && leaf.at("list").is_array()) {
      std::vector<c10::IValue> items;
      for (const auto& v : leaf.at("list")) items.push_back(value(v));
      return make_list(items);
    }
    malformed(fmt::format("unexpected entry {}", leaf.dump().substr(0, 80)));
  }
  static c10::IValue make_list(const std::vector<c10::IValue>& items) {
    const auto all = [&](auto pred) { return !items.empty() && std::all_of(items.begin(), items.end(), pred); };
    if (all([](const c10::IValue& v) { return v.isInt(); })) {
      c10::List<std::int64_t> out;
      for (const auto& v : items) out.push_back(v.toInt());
      return out;
    }
    if (all([](const c10::IValue& v) { return v.isDouble(); })) {
      c10::List<double> out;
      for (const auto& v : items) out.push_back(v.toDouble());
      return out;
    }
    if (all([](const c10::IValue& v) { return v.isTensor(); })) {
      c10::List<at::Tensor> out;
      for (const auto& v : items) out.push_back(v.toTensor());
      return out;
    }
    c10::impl::GenericList out(c10::AnyType::get());
    for (const auto& v : items) out.push_back(v);
    return out;
  }
};

/// Rebuilds the checkpoint dictionary of a file fabric wrote (its layout in the metadata); a file
/// written elsewhere becomes its tensors and metadata strings, each under its own name.
inline Checkpoint to_checkpoint(const File& file, const std::filesystem::path& path) {
  Checkpoint root(c10::StringType::get(), c10::AnyType::get());
  const auto layout_it = file.metadata.find(layout_key);
  if (layout_it == file.metadata.end()) {
    for (const auto& [name, tensor] : file.tensors) root.insert(name, tensor);
    for (const auto& [key, value] : file.metadata) {
      if (!root.contains(key)) root.insert(key, decode_value(value));
    }
    return root;
  }
  const nlohmann::json layout = parse_layout(layout_it->second, path);
  Reader r{file, path, {}};
  if (!layout.is_object() || !layout.contains("format") || !layout.at("format").is_number_integer() ||
      !layout.contains("entries") || !layout.at("entries").is_object()) {
    r.malformed("expected {\"format\": n, \"entries\": {...}}");
  }
  c10::Dict<std::string, std::string> kinds;
  for (const auto& [key, entry] : layout.at("entries").items()) {
    if (!entry.is_object() || !entry.contains("kind") || !entry.at("kind").is_string()) {
      r.malformed(fmt::format("entry \"{}\" has no kind", key));
    }
    const std::string kind = entry.at("kind").get<std::string>();
    kinds.insert(key, kind);
    if (kind == "module") {
      if (!entry.contains("tensors") || !entry.at("tensors").is_object()) r.malformed("a module without tensors");
      c10::Dict<std::string, at::Tensor> tensors;
      for (const auto& [name, file_name] : entry.at("tensors").items()) {
        if (!file_name.is_string()) r.malformed(fmt::format("module \"{}\": a tensor name is not a string", key));
        tensors.insert(name, r.tensor(file_name.get<std::string>()));
      }
      root.insert(key, tensors);
    } else if (kind == "optimizer") {
      if (!entry.contains("shapes") || !entry.at("shapes").is_array() || !entry.contains("type") ||
          !entry.at("type").is_string()) {
        r.malformed(fmt::format("optimizer \"{}\" lacks its shapes or type", key));
      }
      const auto groups_it = file.metadata.find(key + ".param_groups");
      if (groups_it == file.metadata.end()) r.malformed(fmt::format("optimizer \"{}\" has no param_groups", key));
      const nlohmann::json groups = parse_layout(groups_it->second, path);
      c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
      try {
        dict = unflatten_optimizer(key, file.tensors, groups, r.used).toGenericDict();
      } catch (const c10::Error& e) {
        raise("could not read the optimizer state \"{}\" in {} ({})", key, path.string(),
              first_line(e.what_without_backtrace()));
      }
      c10::impl::GenericList shapes(c10::ListType::ofInts());
      for (const auto& s : entry.at("shapes")) {
        c10::List<std::int64_t> shape;
        if (!s.is_array()) r.malformed(fmt::format("optimizer \"{}\": a shape is not a list", key));
        for (const auto& d : s) {
          if (!d.is_number_integer()) r.malformed(fmt::format("optimizer \"{}\": a dimension is not an integer", key));
          shape.push_back(d.get<std::int64_t>());
        }
        shapes.push_back(shape);
      }
      dict.insert("shapes", shapes);
      dict.insert("type", entry.at("type").get<std::string>());
      root.insert(key, dict);
    } else {
      if (!entry.contains("value")) r.malformed(fmt::format("entry \"{}\" has no value", key));
      root.insert(key, r.value(entry.at("value")));
    }
  }
  c10::impl::GenericDict marker(c10::StringType::get(), c10::AnyType::get());
  marker.insert("format", layout.at("format").get<std::int64_t>());
  marker.insert("version", layout.contains("version") && layout.at("version").is_string()
                               ? layout.at("version").get<std::string>()
                               : std::string());
  marker.insert("kinds", kinds);
  root.insert(marker_key, marker);
  return root;
}

/// Says whether a path names a safetensors file (its extension is ".safetensors").
inline bool is_safetensors_path(const std::filesystem::path& path) { return path.extension() == ".safetensors"; }

/// Loads a module from a safetensors file written by anyone (a Python model.state_dict() saved with
/// safetensors.torch.save_file): names, shapes and dtypes are checked before anything changes; floating
/// point converts to the parameter's floating-point type, as PyTorch's load_state_dict does.
inline void load_module(const std::filesystem::path& path, torch::nn::Module& module, bool strict) {
  const File file = read(path);
  std::map<std::string, at::Tensor> found = file.tensors;
  // A file fabric wrote with several modules names the tensors "<entry>.<name>": one module's names are
  // the state_dict() names already.
  std::vector<std::string> errors;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::set<std::string> seen;
  for (auto& [name, target] : module_tensors(module)) {
    seen.insert(name);
    const auto it = found.find(name);
    if (it == found.end()) {
      if (strict) errors.push_back(fmt::format("\"{}\": missing from the file", name));
      continue;
    }
    const at::Tensor& t = it->second;
    if (t.sizes() != target.sizes()) {
      errors.push_back(fmt::format("\"{}\": expected shape {}, found shape {} in the file", name,
                                   shape_str(target.sizes()), shape_str(t.sizes())));
    } else if (t.scalar_type() != target.scalar_type() &&
               !(at::isFloatingType(t.scalar_type()) && at::isFloatingType(target.scalar_type()))) {
      errors.push_back(fmt::format("\"{}\": expected dtype {}, found {} in the file", name,
                                   dtype_name(target.scalar_type()) ? dtype_name(target.scalar_type()) : "?",
                                   dtype_name(t.scalar_type())));
    } else {
      copies.emplace_back(target, t);
    }
  }
  if (strict) {
    for (const auto& [name, t] : found) {
      if (!seen.contains(name)) errors.push_back(fmt::format("\"{}\": in the file but not in the module", name));
    }
  }
  finish_module_load(path, errors, copies, strict, "shapes and dtypes");
}

}  // namespace detail::safetensors

/// Writes checkpoints as safetensors (atomically, as fabric::NativeCheckpointIO) and reads them back
/// memory-mapped, from fabric or from anyone else. Python reads the file with
/// `safetensors.torch.load_file(path)`:
///
/// | in the checkpoint           | in the file                                                          |
/// |-----------------------------|----------------------------------------------------------------------|
/// | one module                  | its tensors under its state_dict() names (`0.weight`, ...)           |
/// | several modules             | `<entry>.<name>`                                                     |
/// | an optimizer                | `<entry>.state.<i>.<name>` (i: the parameter's index over all groups,|
/// |                             | as Python's optimizer.state_dict()) and metadata                    |
/// |                             | `<entry>.param_groups` (JSON, Python's param_groups); load rebuilds  |
/// |                             | LibTorch's state from them (as fabric::TorchCheckpointIO does)       |
/// | tensors of values, Stateful | `<entry>` or `<entry>.<key>...`                                      |
/// | numbers, booleans, strings  | metadata `<entry>[.<key>...]`: "int:3", "float:0.5", "bool:true",   |
/// |                             | "str:text" (safetensors metadata is strings only)                     |
///
/// The metadata `__fabric__` (JSON) says what each entry was, so that load rebuilds the checkpoint; a
/// file without it (written elsewhere) loads as its tensors and metadata strings under their own names
/// (read a Python state_dict into a module with Fabric::load_raw).
class SafetensorsCheckpointIO {
 public:
  /// Writes the checkpoint as safetensors, atomically.
  void save_checkpoint(const Checkpoint& checkpoint, const std::filesystem::path& path) const {
    const std::string bytes = detail::safetensors::to_bytes(checkpoint);
    detail::write_atomically(path, bytes.data(), bytes.size());
  }
  /// Reads a safetensors file (mapped, not copied whole); a malformed or hostile file is a fabric::Error.
  Checkpoint load_checkpoint(const std::filesystem::path& path) const {
    const auto file = detail::safetensors::read(path);
    return detail::safetensors::to_checkpoint(file, path);
  }
  /// Removes the checkpoint at path (nothing when there is none).
  void remove_checkpoint(const std::filesystem::path& path) const { NativeCheckpointIO{}.remove_checkpoint(path); }

  /// Claims paths ending in `.safetensors`.
  bool claims(const std::filesystem::path& path) const { return detail::safetensors::is_safetensors_path(path); }
  /// Recognises files named `*.safetensors` (the format has no magic number).
  bool recognises(const std::filesystem::path& path) const { return detail::safetensors::is_safetensors_path(path); }
  /// Loads a module from a safetensors file written by anyone (a Python model.state_dict() saved with
  /// safetensors.torch.save_file): names, shapes and dtypes are checked before anything changes.
  void load_raw(const std::filesystem::path& path, torch::nn::Module& module, bool strict) const {
    detail::safetensors::load_module(path, module, strict);
  }
  /// Refuses: an optimizer's state is read by Fabric::load from a checkpoint fabric saved.
  void load_raw(const std::filesystem::path& path, torch::optim::Optimizer& /*optimizer*/, bool /*strict*/) const {
    detail::raise(
        "load_raw reads a module from a safetensors file ({}), not an optimizer; load an optimizer's state with "
        "Fabric::load from a checkpoint fabric saved",
        path.string());
  }
};

/// The formats save, load and load_raw use when the strategy names none, in this order:
/// fabric::SafetensorsCheckpointIO for `*.safetensors`, fabric::TorchCheckpointIO (PyTorch's torch.save
/// format) for `*.ckpt`, `*.pt`, `*.pth` and for reading Python's files, and fabric::NativeCheckpointIO for
/// `*.fabric` and every other path. Add a format with a fabric::FormatList of one's own.
using AutoCheckpointIO = FormatList<SafetensorsCheckpointIO, TorchCheckpointIO, NativeCheckpointIO>;

}  // namespace fabric
