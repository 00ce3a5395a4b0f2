#pragma once
// The rank files of fabric's sharded checkpoints, torch-free (so that they can be fuzzed with any compiler): a
// rank file is a safetensors file of 1-D slices whose metadata "fabric_sharded" (JSON) lists each shard's key,
// full shape, first element and CRC-32C; the parser validates the list against the header, and check_ranges
// validates the pieces of one tensor gathered from every rank (no overlap, every element held).

#include "fabric/core/error.hpp"
#include "fabric/detail/safetensors_header.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fabric::detail::sharded {

/// The version of the sharded layout this fabric writes (and the newest it reads).
inline constexpr std::int64_t format = 1;
/// The safetensors metadata key of a rank file's shard list (JSON).
inline constexpr const char* shards_key = "fabric_sharded";
/// The most ranks a checkpoint may name.
inline constexpr std::int64_t max_world = 1 << 20;

/// The element count of a shape; nothing when a dimension is negative or the count overflows.
inline std::optional<std::int64_t> element_count(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  return n;
}

/// One shard of a rank file: its key, the full tensor's dtype (safetensors name) and shape, its range, and
/// where its bytes are in the file.
struct ShardInfo {
  std::string key;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
  std::int64_t begin = 0;
  std::int64_t count = 0;
  std::uint64_t offset = 0;  ///< of its first byte in the file
  std::uint64_t bytes = 0;
  std::uint32_t crc = 0;
};

/// Parses and validates the rank file of rank `rank` of `world` whose first bytes are in prefix (the whole
/// header at least) and whose size is file_size: the safetensors header (see parse_header), then the shard
/// list: its format, rank and world size, one entry per tensor of the file with a key, a non-negative shape
/// whose element count does not overflow, a range inside it and a 32-bit CRC; every tensor 1-D. The shards come
/// in the order of the list. Anything else is a fabric::Error saying what is wrong.
inline std::vector<ShardInfo> parse_rank_file(std::span<const unsigned char> prefix, std::uint64_t file_size,
                                              std::int64_t rank, std::int64_t world) {
  const safetensors::Header header = safetensors::parse_header(prefix, file_size);
  const auto meta_it =
      std::find_if(header.metadata.begin(), header.metadata.end(), [](const auto& m) { return m.first == shards_key; });
  if (meta_it == header.metadata.end()) {
    raise("it has no \"{}\" metadata; expected a rank file of fabric's sharded checkpoint", shards_key);
  }
  nlohmann::json list;
  try {
    list = nlohmann::json::parse(meta_it->second);
  } catch (const nlohmann::json::exception& e) {
    raise("its \"{}\" metadata is not JSON ({})", shards_key, e.what());
  }
  auto integer = [](const nlohmann::json& object, const char* name, const std::string& where) -> std::int64_t {
    if (!object.is_object() || !object.contains(name) || !object.at(name).is_number_integer()) {
      raise("{}: expected an integer \"{}\"", where, name);
    }
    if (object.at(name).is_number_unsigned() &&
        object.at(name).get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      raise("{}: \"{}\" is out of range", where, name);
    }
    return object.at(name).get<std::int64_t>();
  };
  const std::int64_t version = integer(list, "format", "its shard list");
  if (version < 1 || version > format) {
    raise("its format is {}, this fabric reads formats 1 to {}; upgrade fabric", version, format);
  }
  const std::int64_t says_rank = integer(list, "rank", "its shard list");
  const std::int64_t says_world = integer(list, "world_size", "its shard list");
  if (says_rank != rank || says_world != world) {
    raise("it says it is rank {} of {}, expected rank {} of {}: files of another save were mixed in", says_rank,
          says_world, rank, world);
  }
  if (!list.contains("shards") || !list.at("shards").is_array()) raise("its shard list has no \"shards\" list");
  const auto& shards = list.at("shards");
  if (shards.size() != header.tensors.size()) {
    raise("its shard list names {} shards, but it holds {} tensors", shards.size(), header.tensors.size());
  }
  std::map<std::string, const safetensors::TensorInfo*> infos;
  for (const auto& info : header.tensors) infos.emplace(info.name, &info);
  std::vector<ShardInfo> out;
  std::set<std::string> seen;
  for (const auto& shard : shards) {
    if (!shard.is_object() || !shard.contains("key") || !shard.at("key").is_string()) {
      raise("a shard has no \"key\" string");
    }
    ShardInfo s;
    s.key = shard.at("key").get<std::string>();
    const std::string where = fmt::format("shard \"{}\"", s.key);
    if (!seen.insert(s.key).second) raise("{} is listed twice", where);
    const auto info = infos.find(s.key);
    if (info == infos.end()) raise("{} has no tensor in the file", where);
    if (!shard.contains("shape") || !shard.at("shape").is_array()) raise("{}: expected a \"shape\" list", where);
    for (const auto& d : shard.at("shape")) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0 ||
          (d.is_number_unsigned() &&
           d.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))) {
        raise("{}: expected non-negative dimensions, found {}", where, shard.at("shape").dump());
      }
      s.shape.push_back(d.get<std::int64_t>());
    }
    const auto numel = element_count(s.shape);
    if (!numel) raise("{}: the element count of the shape [{}] overflows", where, fmt::join(s.shape, ", "));
    s.numel = *numel;
    s.begin = integer(shard, "begin", where);
    const std::int64_t crc = integer(shard, "crc32c", where);
    if (crc < 0 || crc > static_cast<std::int64_t>(std::numeric_limits<std::uint32_t>::max())) {
      raise("{}: its crc32c {} is not a 32-bit checksum", where, crc);
    }
    s.crc = static_cast<std::uint32_t>(crc);
    const safetensors::TensorInfo& t = *info->second;
    if (t.shape.size() != 1) raise("{}: expected a 1-D slice, found the shape [{}]", where, fmt::join(t.shape, ", "));
    s.dtype = t.dtype;
    s.count = t.shape[0];
    if (s.begin < 0 || s.begin > s.numel || s.count > s.numel - s.begin) {
      raise("{}: elements [{}, {}) lie outside its tensor of shape [{}] ({} elements)", where, s.begin,
            s.begin + s.count, fmt::join(s.shape, ", "), s.numel);
    }
    s.offset = header.data_start + t.begin;
    s.bytes = t.end - t.begin;
    out.push_back(std::move(s));
  }
  return out;
}

/// A piece of one tensor held by one rank.
struct Range {
  std::int64_t rank = 0;
  std::int64_t begin = 0;
  std::int64_t count = 0;
};

/// Sorts the pieces of the tensor `key` (numel elements of shape `shape`) from every rank and checks that they
/// do not overlap and hold every element; raises naming the ranks and ranges otherwise.
inline void check_ranges(const std::string& dir, const std::string& key, const std::vector<std::int64_t>& shape,
                         std::int64_t numel, std::vector<Range>& ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin != b.begin ? a.begin < b.begin : a.count < b.count; });
  std::int64_t covered = 0;
  const Range* last = nullptr;
  for (const auto& r : ranges) {
    if (r.count == 0) continue;
    if (r.begin < covered) {
      raise(
          "the sharded checkpoint {} is inconsistent: the ranges of \"{}\" overlap: rank {} holds [{}, {}) and rank {} "
          "holds [{}, {})",
          dir, key, last->rank, last->begin, last->begin + last->count, r.rank, r.begin, r.begin + r.count);
    }
    if (r.begin > covered) break;
    covered = r.begin + r.count;
    last = &r;
  }
  if (covered != numel) {
    std::int64_t gap_end = numel;
    for (const auto& r : ranges) {
      if (r.count > 0 && r.begin > covered) {
        gap_end = r.begin;
        break;
      }
    }
    raise("the sharded checkpoint {} is incomplete: elements [{}, {}) of \"{}\" (shape [{}]) are in no rank's file",
          dir, covered, gap_end, key, fmt::join(shape, ", "));
  }
}

}  // namespace fabric::detail::sharded
