#pragma once
// The safetensors header, torch-free (so that it can be fuzzed with any compiler): the bytes of a file
// become a validated list of tensors (name, dtype, shape, byte range) and the `__metadata__` strings,
// and back. The layout (huggingface/safetensors, README "Format"): an 8-byte little-endian header
// length N, N bytes of UTF-8 JSON (`{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
// "data_offsets": [begin, end]}, ...}`, space-padded), then the data, which the tensors' byte ranges
// (relative to its start) cover exactly, without gaps or overlaps.

#include "fabric/core/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fabric::detail::safetensors {

/// The largest header fabric reads (the Rust reader's bound, 100 MB).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;
/// The deepest nesting a valid header has: the root object, a tensor's object, its shape or offsets.
inline constexpr int max_depth = 3;

/// One tensor of a safetensors file: its byte range is relative to the start of the data.
struct TensorInfo {
  std::string name;
  std::string dtype;  // "F32", "BF16", "I64", "BOOL", ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

/// A parsed header: the tensors in the order of their data, the metadata, and where the data starts
/// in the file (8 + the header length).
struct Header {
  std::vector<TensorInfo> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::uint64_t data_start = 0;
};

/// The size in bytes of one element of a safetensors dtype; nothing for a dtype fabric does not know
/// (the sub-byte F4/F6 types have no whole-byte size).
inline std::optional<std::size_t> dtype_size(std::string_view dtype) {
  static constexpr std::array<std::pair<std::string_view, std::size_t>, 16> sizes{{{"BOOL", 1},
                                                                                   {"U8", 1},
                                                                                   {"I8", 1},
                                                                                   {"F8_E5M2", 1},
                                                                                   {"F8_E4M3", 1},
                                                                                   {"I16", 2},
                                                                                   {"U16", 2},
                                                                                   {"F16", 2},
                                                                                   {"BF16", 2},
                                                                                   {"I32", 4},
                                                                                   {"U32", 4},
                                                                                   {"F32", 4},
                                                                                   {"F64", 8},
                                                                                   {"I64", 8},
                                                                                   {"U64", 8},
                                                                                   {"C64", 8}}};
  for (const auto& [name, size] : sizes) {
    if (name == dtype) return size;
  }
  return std::nullopt;
}

/// The number of elements of a shape times the element size; nothing when it overflows 64 bits.
inline std::optional<std::uint64_t> byte_size(const std::vector<std::int64_t>& shape, std::size_t item) {
  std::uint64_t n = item;
  for (const std::int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<std::uint64_t>(d), &n)) return std::nullopt;
  }
  return n;
}

namespace impl {

using json = nlohmann::json;

inline std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline std::uint64_t unsigned_value(const json& v, std::string_view what, std::string_view name) {
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0)) {
    raise("invalid safetensors header: tensor \"{}\": expected {} to be a non-negative integer, found {}", name, what,
          v.dump());
  }
  return v.get<std::uint64_t>();
}

/// Parses the JSON text: nesting deeper than a header has and a key given twice in one object are
/// refused while parsing (nlohmann keeps the last of repeated keys silently).
inline json parse_json(std::string_view text) {
  std::vector<std::set<std::string>> keys;  // the keys seen in each open object
  const json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_depth) {
          raise(
              "invalid safetensors header: nested deeper than {} levels; expected {{name: {{dtype, shape, "
              "data_offsets}}}}",
              max_depth);
        }
        if (event == json::parse_event_t::object_start) keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second) {
          raise("invalid safetensors header: the key \"{}\" appears twice in one object; expected unique names",
                parsed.get<std::string>());
        }
        break;
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), check, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    raise("invalid safetensors header: not valid UTF-8 JSON ({})", e.what());
  }
}

}  // namespace impl

/// Parses and validates the header of a safetensors file of file_size bytes whose first bytes are in
/// prefix (at least the 8-byte length and the header; more is ignored). Refuses, with fabric::Error:
/// a length beyond the file or over max_header_bytes, JSON that is not valid UTF-8 or nested deeper
/// than a header, names given twice, unknown dtypes, negative dimensions, a shape whose byte size
/// overflows or differs from its byte range, and byte ranges that are reversed, overlap, leave gaps or
/// do not end at the end of the file.
inline Header parse_header(std::span<const unsigned char> prefix, std::uint64_t file_size) {
  if (file_size < 8 || prefix.size() < 8) {
    raise("invalid safetensors file: {} bytes, expected at least the 8-byte header length", file_size);
  }
  const std::uint64_t n = impl::read_u64_le(prefix.data());
  if (n > max_header_bytes) {
    raise("invalid safetensors file: the header length is {} bytes, over the {} bytes fabric reads", n,
          max_header_bytes);
  }
  if (n > file_size - 8) {
    raise("invalid safetensors file: the header length is {} bytes but the file has {} bytes after it", n,
          file_size - 8);
  }
  if (prefix.size() < 8 + n) raise("invalid safetensors file: {} header bytes given, expected {}", prefix.size(), n);
  const std::string_view text(reinterpret_cast<const char*>(prefix.data()) + 8, static_cast<std::size_t>(n));
  if (text.empty() || text.front() != '{') {
    raise("invalid safetensors header: expected a JSON object starting with '{{', found {}",
          text.empty() ? std::string("nothing") : fmt::format("byte {:#04x}", static_cast<unsigned char>(text[0])));
  }
  const impl::json root = impl::parse_json(text);
  if (!root.is_object()) raise("invalid safetensors header: expected a JSON object, found {}", root.type_name());

  Header header;
  header.data_start = 8 + n;
  const std::uint64_t data_size = file_size - header.data_start;
  for (const auto& [name, value] : root.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) {
        raise("invalid safetensors header: expected \"__metadata__\" to map strings to strings, found {}",
              value.type_name());
      }
      for (const auto& [key, text_value] : value.items()) {
        if (!text_value.is_string()) {
          raise("invalid safetensors header: \"__metadata__\" entry \"{}\" is {}, expected a string", key,
                text_value.type_name());
        }
        header.metadata.emplace_back(key, text_value.get<std::string>());
      }
      continue;
    }
    if (!value.is_object()) {
      raise("invalid safetensors header: tensor \"{}\" is {}, expected an object with dtype, shape and data_offsets",
            name, value.type_name());
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(field)) raise("invalid safetensors header: tensor \"{}\" has no \"{}\"", name, field);
    }
    TensorInfo info;
    info.name = name;
    const auto& dtype = value.at("dtype");
    if (!dtype.is_string()) raise("invalid safetensors header: tensor \"{}\": dtype is {}", name, dtype.type_name());
    info.dtype = dtype.get<std::string>();
    const auto item = dtype_size(info.dtype);
    if (!item) {
      raise(
          "invalid safetensors header: tensor \"{}\" has the dtype \"{}\", which fabric does not read; expected one "
          "of BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64 (and U16, U32, U64, F8_E5M2, F8_E4M3, C64)",
          name, info.dtype);
    }
    const auto& shape = value.at("shape");
    if (!shape.is_array()) raise("invalid safetensors header: tensor \"{}\": shape is {}", name, shape.type_name());
    for (const auto& d : shape) {
      const std::uint64_t dim = impl::unsigned_value(d, "every dimension", name);
      if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        raise("invalid safetensors header: tensor \"{}\": the dimension {} is too large", name, dim);
      }
      info.shape.push_back(static_cast<std::int64_t>(dim));
    }
    const auto& offsets = value.at("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2) {
      raise("invalid safetensors header: tensor \"{}\": expected data_offsets [begin, end], found {}", name,
            offsets.dump());
    }
    info.begin = impl::unsigned_value(offsets[0], "data_offsets", name);
    info.end = impl::unsigned_value(offsets[1], "data_offsets", name);
    if (info.begin > info.end) {
      raise("invalid safetensors header: tensor \"{}\": data_offsets [{}, {}] end before they begin", name, info.begin,
            info.end);
    }
    const auto bytes = byte_size(info.shape, *item);
    if (!bytes) raise("invalid safetensors header: tensor \"{}\": the byte size of its shape overflows", name);
    if (*bytes != info.end - info.begin) {
      raise(
          "invalid safetensors header: tensor \"{}\": a {} tensor of shape [{}] has {} bytes, but its data_offsets "
          "[{}, {}] hold {}",
          name, info.dtype, fmt::join(info.shape, ", "), *bytes, info.begin, info.end, info.end - info.begin);
    }
    header.tensors.push_back(std::move(info));
  }
  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t at = 0;
  for (const auto& t : header.tensors) {
    if (t.begin != at) {
      raise("invalid safetensors header: tensor \"{}\" starts at byte {} of the data, expected {} ({})", t.name,
            t.begin, at, t.begin < at ? "it overlaps the tensor before it" : "a gap before it");
    }
    at = t.end;
  }
  if (at != data_size) {
    raise("invalid safetensors file: the tensors cover {} bytes of data, but the file has {} after the header", at,
          data_size);
  }
  return header;
}

/// Writes the 8-byte length and the JSON header of tensors laid out in the given order (their byte
/// ranges are assigned here, one after another), space-padded to a multiple of 8 bytes as Python's
/// writer does. A name or metadata string that is not valid UTF-8 is an error.
inline std::string write_header(std::vector<TensorInfo>& tensors,
                                const std::vector<std::pair<std::string, std::string>>& metadata) {
  nlohmann::ordered_json root = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    std::set<std::string_view> keys;
    for (const auto& [key, value] : metadata) {
      if (!keys.insert(key).second) raise("cannot write safetensors: the metadata key \"{}\" is given twice", key);
      meta[key] = value;
    }
    root["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> names;
  std::uint64_t at = 0;
  for (auto& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second) {
      raise("cannot write safetensors: the tensor name \"{}\" is {}; expected unique names", t.name,
            t.name == "__metadata__" ? "reserved" : "given twice");
    }
    const auto item = dtype_size(t.dtype);
    const auto bytes = item ? byte_size(t.shape, *item) : std::nullopt;
    if (!bytes) raise("cannot write safetensors: tensor \"{}\" has an unknown dtype or an overflowing size", t.name);
    t.begin = at;
    t.end = at + *bytes;
    at = t.end;
    root[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string text;
  try {
    text = root.dump();
  } catch (const nlohmann::json::exception& e) {
    raise("cannot write safetensors: a name or metadata value is not valid UTF-8 ({})", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xff);
  return out + text;
}

}  // namespace fabric::detail::safetensors
