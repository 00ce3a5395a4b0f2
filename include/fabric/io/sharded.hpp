#pragma once
// Sharded checkpoints: a directory with one safetensors file per rank, holding that rank's slices of tensors
// ("tensor shards", by key, with the full shape, dtype and range), and a metadata file that rank 0 writes (the
// plain entries and the index: format version and world size). The format knows nothing of the strategy that
// sharded the tensors, so it reshards on load (any world size) and consolidates offline, without a model, into
// one file of PyTorch's torch.save format (fabric::consolidate_checkpoint, the fabric-consolidate tool).
//
//     <dir>/fabric-meta.ckpt                  rank 0: fabric's native format (CRC-32C checked), the plain entries
//     <dir>/rank-00000-of-00002.safetensors   every rank: its shards, memory-mapped when read; the metadata
//     <dir>/rank-00001-of-00002.safetensors     "fabric_sharded" (JSON) gives each shard's key, full shape,
//                                             first element and CRC-32C
//
// Saving writes into the staging directory `<dir>.staging` (locked by its writer, rank 0) and replaces a
// previous checkpoint at <dir> only once every file is written: a save killed midway leaves the previous one
// loadable, and its staging directory, whose lock nobody holds, is removed by the next save or load.

#include "fabric/core/error.hpp"
#include "fabric/core/version.hpp"
#include "fabric/detail/atomic_file.hpp"
#include "fabric/detail/crc.hpp"
#include "fabric/detail/safetensors_header.hpp"
#include "fabric/detail/sharded_index.hpp"
#include "fabric/io/checkpoint_io.hpp"
#include "fabric/io/native.hpp"
#include "fabric/io/safetensors.hpp"
#include "fabric/io/torch_pickle.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric {

/// One rank's contiguous slice of a tensor, in the tensor's flattened (row-major) order.
struct TensorShard {
  std::string key;                  ///< '/'-separated path in the checkpoint: "model/h.0.attn.c_attn.weight",
                                    ///< "optimizer/state/3/exp_avg" (PyTorch's optimizer layout)
  std::vector<std::int64_t> shape;  ///< the full tensor's shape
  at::ScalarType dtype{};
  std::int64_t begin = 0;  ///< the first flattened element held here
  at::Tensor local;        ///< 1-D, contiguous, elements [begin, begin + local.numel()), any device
};

namespace detail {
namespace sharded {

/// The metadata file rank 0 writes (fabric's native format).
inline constexpr const char* meta_name = "fabric-meta.ckpt";
/// The entry of the metadata file holding the index: {"format", "world_size", "version"}.
inline constexpr const char* index_key = "__fabric_sharded__";
/// The lock file of a staging directory, held by the writer from prepare to commit.
inline constexpr const char* lock_name = ".lock";

/// The checkpoint directory without trailing separators ("ckpt/" and "ckpt" are one checkpoint).
inline std::filesystem::path normalize(const std::filesystem::path& dir) {
  std::string text = dir.string();
  while (text.size() > 1 && text.back() == '/') text.pop_back();
  if (text.empty()) raise("expected a checkpoint directory path, found an empty path; name the directory");
  return text;
}

/// The staging directory of a checkpoint directory: every rank derives it from the directory alone.
inline std::filesystem::path staging_of(const std::filesystem::path& dir) {
  return normalize(dir).string() + ".staging";
}

/// The file name of rank `rank`'s shards in a checkpoint of `world` ranks.
inline std::string rank_file_name(int rank, int world) {
  return fmt::format("rank-{:05}-of-{:05}.safetensors", rank, world);
}

/// Parses a rank file's name into (rank, world); nothing for other names.
inline std::optional<std::pair<std::int64_t, std::int64_t>> parse_rank_file_name(std::string_view name) {
  if (!name.starts_with("rank-") || !name.ends_with(".safetensors")) return std::nullopt;
  name.remove_prefix(5);
  name.remove_suffix(12);
  const auto of = name.find("-of-");
  if (of == std::string_view::npos) return std::nullopt;
  auto number = [](std::string_view digits) -> std::optional<std::int64_t> {
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string_view::npos) {
      return std::nullopt;
    }
    return std::stoll(std::string(digits));
  };
  const auto rank = number(name.substr(0, of));
  const auto world = number(name.substr(of + 4));
  if (!rank || !world) return std::nullopt;
  return std::pair{*rank, *world};
}

/// The staging locks this process holds (rank 0 between prepare and commit), by staging directory.
inline std::map<std::string, int>& held_locks() {
  static std::map<std::string, int> locks;
  return locks;
}
inline std::mutex& held_locks_mutex() {
  static std::mutex m;
  return m;
}

/// Says whether a live writer holds the staging directory's lock (in this process or another).
inline bool staging_in_use(const std::filesystem::path& staging) {
  {
    const std::lock_guard<std::mutex> guard(held_locks_mutex());
    if (held_locks().contains(staging.string())) return true;
  }
  const std::string lock = (staging / lock_name).string();
  const int fd = ::open(lock.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) return false;
  const bool held = ::flock(fd, LOCK_EX | LOCK_NB) != 0;
  ::close(fd);
  return held;
}

/// Removes the directories `<staging>.tmp-<pid>` that writers killed while creating the staging directory left
/// (their process is gone), and recovers from a commit without RENAME_EXCHANGE killed midway: its
/// `<staging>.previous` (the previous checkpoint, moved aside) goes back to `dir` where nothing replaced it.
inline void remove_dead_fresh_staging(const std::filesystem::path& dir, const std::filesystem::path& staging) {
  const std::string name = staging.filename().string();
  const std::string parent = staging.has_parent_path() ? staging.parent_path().string() : std::string(".");
  DIR* listing = ::opendir(parent.c_str());
  if (listing == nullptr) return;
  std::vector<std::string> dead;
  while (const dirent* entry = ::readdir(listing)) {
    const std::string_view file = entry->d_name;
    if (!file.starts_with(name)) continue;
    const std::string_view rest = file.substr(name.size());
    if (rest == ".previous" && !staging_in_use(staging)) {
      dead.emplace_back(file);
      continue;
    }
    if (!rest.starts_with(".tmp-")) continue;
    const std::string_view digits = rest.substr(5);
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string_view::npos) {
      continue;
    }
    const auto pid = static_cast<pid_t>(std::stol(std::string(digits)));
    if (pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) dead.emplace_back(file);
  }
  ::closedir(listing);
  std::error_code ec;
  for (const auto& file : dead) {
    const auto path = std::filesystem::path(parent) / file;
    if (file.ends_with(".previous") && !std::filesystem::exists(std::filesystem::symlink_status(dir, ec)) &&
        ::rename(path.c_str(), dir.c_str()) == 0) {
      continue;
    }
    std::filesystem::remove_all(path, ec);
  }
}

/// Removes the staging directory of `dir` when its writer is dead (nobody holds its lock); returns whether it did.
inline bool remove_stale_staging(const std::filesystem::path& dir) {
  const auto staging = staging_of(dir);
  remove_dead_fresh_staging(normalize(dir), staging);
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::symlink_status(staging, ec))) return false;
  if (staging_in_use(staging)) return false;
  std::filesystem::remove_all(staging, ec);
  return !ec;
}

/// Says whether a directory holds nothing.
inline bool is_empty_directory(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_directory(dir, ec) && std::filesystem::is_empty(dir, ec);
}

/// One rank's piece of a stored tensor: its range and its bytes in the mapped rank file.
struct Piece {
  int rank = 0;
  std::int64_t begin = 0;
  std::int64_t count = 0;
  const unsigned char* data = nullptr;
  std::uint32_t crc = 0;
  bool verified = false;
};

/// A stored tensor: its full shape and dtype and the pieces that hold it, sorted by their first element.
struct Stored {
  std::vector<std::int64_t> shape;
  at::ScalarType dtype{};
  std::int64_t numel = 0;
  std::vector<Piece> pieces;
};

/// A sharded checkpoint opened: the world size, the rank files (mapped), the tensors by key, in the
/// checkpoint's order.
struct Index {
  std::filesystem::path dir;
  std::int64_t world = 0;
  std::vector<std::filesystem::path> files;
  std::vector<std::shared_ptr<safetensors::Mapping>> mappings;
  std::vector<std::string> order;
  std::map<std::string, Stored> tensors;

  /// Verifies a piece's CRC-32C once; raises naming the entry and the file when it differs.
  void verify(const std::string& key, Piece& piece) {
    if (piece.verified) return;
    const auto bytes =
        static_cast<std::size_t>(piece.count) * static_cast<std::size_t>(c10::elementSize(tensors.at(key).dtype));
    const std::uint32_t crc = crc32c(piece.data, bytes);
    if (crc != piece.crc) {
      raise(
          "the shard of \"{}\" in {} is corrupt: its CRC-32C is {:#010x}, expected {:#010x}; the file was changed "
          "after fabric wrote it",
          key, files[static_cast<std::size_t>(piece.rank)].string(), crc, piece.crc);
    }
    piece.verified = true;
  }
};

/// Reads the metadata file of a sharded checkpoint: the plain entries and, taken out of them, the world size.
inline std::pair<Checkpoint, std::int64_t> read_meta(const std::filesystem::path& dir) {
  const auto meta_path = dir / meta_name;
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    raise("expected a sharded checkpoint directory at {}, found {}; check the path", dir.string(),
          std::filesystem::exists(dir, ec) ? "a file" : "nothing");
  }
  if (!std::filesystem::is_regular_file(meta_path, ec)) {
    raise(
        "expected a sharded checkpoint at {}, found a directory without its metadata file {}; it was not written by "
        "fabric's sharded save, or the save did not finish",
        dir.string(), meta_name);
  }
  Checkpoint meta = NativeCheckpointIO{}.load_checkpoint(meta_path);
  if (!meta.contains(index_key) || !meta.at(index_key).isGenericDict()) {
    raise("expected the index \"{}\" in {}, found {}; the file is not a sharded checkpoint's metadata", index_key,
          meta_path.string(), meta.contains(index_key) ? describe(meta.at(index_key)) : std::string("none"));
  }
  const auto index = meta.at(index_key).toGenericDict();
  auto integer = [&](const char* name) {
    if (!index.contains(name) || !index.at(name).isInt()) {
      raise("expected an integer \"{}\" in the index of {}, found {}", name, meta_path.string(),
            index.contains(name) ? describe(index.at(name)) : std::string("none"));
    }
    return index.at(name).toInt();
  };
  const std::int64_t version = integer("format");
  if (version < 1 || version > format) {
    raise("the sharded checkpoint {} has the format {}; this fabric ({}) reads formats 1 to {}; upgrade fabric",
          dir.string(), version, fabric::version(), format);
  }
  const std::int64_t world = integer("world_size");
  if (world < 1 || world > max_world) {
    raise("the sharded checkpoint {} names a world size of {}; expected 1 to {}", dir.string(), world, max_world);
  }
  (void)meta.erase(index_key);
  return {std::move(meta), world};
}

/// Opens every rank file of a sharded checkpoint and validates the shards against each other: the same shape
/// and dtype on every rank, ranges inside the shape that do not overlap and cover every element.
inline Index open_index(const std::filesystem::path& input) {
  Index index;
  index.dir = normalize(input);
  (void)remove_stale_staging(index.dir);
  index.world = read_meta(index.dir).second;
  const auto world = static_cast<int>(index.world);
  // Rank files of another world size: a checkpoint mixed with another save's files.
  DIR* listing = ::opendir(index.dir.c_str());
  if (listing == nullptr) raise("could not list {}: {}", index.dir.string(), std::strerror(errno));
  std::vector<std::string> foreign;
  while (const dirent* entry = ::readdir(listing)) {
    const auto parsed = parse_rank_file_name(entry->d_name);
    if (parsed && (parsed->second != index.world || parsed->first >= index.world)) foreign.emplace_back(entry->d_name);
  }
  ::closedir(listing);
  if (!foreign.empty()) {
    std::sort(foreign.begin(), foreign.end());
    raise("the sharded checkpoint {} was written by {} ranks, but it holds the files {} of another world size",
          index.dir.string(), index.world, fmt::join(foreign, ", "));
  }
  std::vector<std::vector<std::string>> rank_orders(static_cast<std::size_t>(world));
  for (int rank = 0; rank < world; ++rank) {
    const auto path = index.dir / rank_file_name(rank, world);
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
      raise("the sharded checkpoint {} of {} ranks has no file for rank {} ({}); copy the whole directory",
            index.dir.string(), world, rank, path.filename().string());
    }
    auto mapping = std::make_shared<safetensors::Mapping>(path);
    std::vector<ShardInfo> shards;
    try {
      shards = parse_rank_file(std::span<const unsigned char>(mapping->data(), mapping->size()), mapping->size(), rank,
                               world);
    } catch (const Error& e) {
      raise("could not read {}: {}", path.string(), std::string_view(e.what()).substr(8));
    }
    for (const auto& shard : shards) {
      const auto dtype = safetensors::scalar_type(shard.dtype);
      if (!dtype) {
        raise("could not read {}: shard \"{}\" has the dtype {}, which this LibTorch has no type for", path.string(),
              shard.key, shard.dtype);
      }
      auto [it, fresh] = index.tensors.try_emplace(shard.key);
      Stored& stored = it->second;
      if (fresh) {
        stored.shape = shard.shape;
        stored.dtype = *dtype;
        stored.numel = shard.numel;
      } else if (stored.shape != shard.shape || stored.dtype != *dtype) {
        raise(
            "the sharded checkpoint {} is inconsistent: \"{}\" is a {} tensor of shape [{}] on rank {}, but a {} "
            "tensor of shape [{}] on rank {}",
            index.dir.string(), shard.key, c10::toString(stored.dtype), fmt::join(stored.shape, ", "),
            stored.pieces.front().rank, c10::toString(*dtype), fmt::join(shard.shape, ", "), rank);
      }
      stored.pieces.push_back(Piece{rank, shard.begin, shard.count, mapping->data() + shard.offset, shard.crc, false});
      rank_orders[static_cast<std::size_t>(rank)].push_back(shard.key);
    }
    index.files.push_back(path);
    index.mappings.push_back(std::move(mapping));
  }
  // The order: rank 0's, and each key no lower rank holds right after the key before it in its rank's list.
  std::list<std::string> order;
  std::unordered_map<std::string, std::list<std::string>::iterator> placed;
  for (const auto& keys : rank_orders) {
    auto next = order.begin();
    for (const auto& key : keys) {
      if (const auto found = placed.find(key); found != placed.end()) {
        next = std::next(found->second);
      } else {
        placed.emplace(key, order.insert(next, key));
      }
    }
  }
  index.order.assign(order.begin(), order.end());
  for (auto& [key, stored] : index.tensors) {
    std::vector<Range> ranges;
    for (const auto& piece : stored.pieces) ranges.push_back({piece.rank, piece.begin, piece.count});
    check_ranges(index.dir.string(), key, stored.shape, stored.numel, ranges);
  }
  return index;
}

/// Copies elements [begin, begin + count) of a stored tensor into `out` (CPU, contiguous, its dtype).
inline void copy_range(Index& index, const std::string& key, std::int64_t begin, std::int64_t count,
                       unsigned char* out) {
  Stored& stored = index.tensors.at(key);
  const auto item = static_cast<std::int64_t>(c10::elementSize(stored.dtype));
  const std::int64_t end = begin + count;
  for (auto& piece : stored.pieces) {
    const std::int64_t lo = std::max(begin, piece.begin);
    const std::int64_t hi = std::min(end, piece.begin + piece.count);
    if (lo >= hi) continue;
    index.verify(key, piece);
    std::memcpy(out + (lo - begin) * item, piece.data + (lo - piece.begin) * item,
                static_cast<std::size_t>((hi - lo) * item));
  }
}

/// Splits a '/'-separated key into its parts; raises on an empty part.
inline std::vector<std::string> split_key(const std::string& key) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (true) {
    const auto slash = key.find('/', start);
    parts.push_back(key.substr(start, slash == std::string::npos ? std::string::npos : slash - start));
    if (parts.back().empty()) {
      raise("the checkpoint key \"{}\" has an empty part; expected names separated by single '/'", key);
    }
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return parts;
}

/// The dictionary key of a path part in `dict` (an integer in an integer-keyed dictionary).
inline c10::IValue dict_key(const c10::impl::GenericDict& dict, const std::string& part, const std::string& key) {
  if (dict.keyType()->kind() == c10::TypeKind::IntType) {
    if (part.empty() || part.size() > 18 || part.find_first_not_of("0123456789") != std::string::npos) {
      raise("the checkpoint key \"{}\": \"{}\" names an entry of a dictionary with integer keys; expected a number",
            key, part);
    }
    return static_cast<std::int64_t>(std::stoll(part));
  }
  return part;
}

/// Inserts value at the '/'-path key into root, creating the dictionaries on the way (and merging dictionaries).
inline void insert_path(c10::impl::GenericDict root, const std::string& key, const c10::IValue& value) {
  const auto parts = split_key(key);
  c10::impl::GenericDict dict = std::move(root);
  for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
    const c10::IValue k = dict_key(dict, parts[i], key);
    if (!dict.contains(k)) dict.insert(k, c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()));
    const c10::IValue next = dict.at(k);
    if (!next.isGenericDict()) {
      raise("the checkpoint key \"{}\": \"{}\" is {}, not a dictionary to put it in", key, parts[i], describe(next));
    }
    dict = next.toGenericDict();
  }
  const c10::IValue k = dict_key(dict, parts.back(), key);
  if (dict.contains(k) && dict.at(k).isNone() && !value.isNone()) {
    dict.insert_or_assign(k, value);  // a placeholder of the metadata: the value takes its place
    return;
  }
  if (dict.contains(k)) {
    const c10::IValue existing = dict.at(k);
    if (existing.isGenericDict() && value.isGenericDict()) {
      for (const auto& item : value.toGenericDict()) {
        const std::string sub =
            item.key().isString() ? item.key().toStringRef() : fmt::format("{}", item.key().toInt());
        c10::impl::GenericDict target = existing.toGenericDict();
        if (target.contains(item.key())) {
          insert_path(target, sub, item.value());
        } else {
          target.insert(item.key(), item.value());
        }
      }
      return;
    }
    raise("the checkpoint key \"{}\" is given twice (in the metadata or as a shard); expected one value", key);
  }
  if (value.isGenericDict()) {
    // A copy, so that filling it leaves the caller's dictionary as it was.
    dict.insert(k, value.toGenericDict().copy());
  } else {
    dict.insert(k, value);
  }
}

/// Gives PyTorch's optimizer layouts ({"state": {"3": ...}, "param_groups": [...]}) their integer state keys.
inline c10::IValue with_optimizer_keys(const c10::IValue& value) {
  if (!value.isGenericDict()) return value;
  const auto input = value.toGenericDict();
  c10::impl::GenericDict dict(input.keyType(), c10::AnyType::get());
  for (const auto& item : input) dict.insert(item.key(), with_optimizer_keys(item.value()));
  if (dict.keyType()->kind() != c10::TypeKind::StringType || !dict.contains("state") ||
      !dict.contains("param_groups") || !dict.at("state").isGenericDict() || !dict.at("param_groups").isList()) {
    return dict;
  }
  const auto state = dict.at("state").toGenericDict();
  if (state.keyType()->kind() != c10::TypeKind::StringType) return dict;
  c10::impl::GenericDict numbered(c10::IntType::get(), c10::AnyType::get());
  for (const auto& item : state) {
    const std::string& name = item.key().toStringRef();
    if (name.empty() || name.size() > 18 || name.find_first_not_of("0123456789") != std::string::npos) return dict;
    numbered.insert(static_cast<std::int64_t>(std::stoll(name)), item.value());
  }
  dict.insert_or_assign("state", numbered);
  return dict;
}

/// Validates a shard before it is written or read into.
inline std::int64_t check_shard(const TensorShard& shard, const char* what) {
  if (shard.key.empty()) raise("cannot {} a shard without a key; give it the entry's '/'-path", what);
  (void)split_key(shard.key);
  const auto numel = element_count(shard.shape);
  if (!numel) {
    raise("cannot {} the shard \"{}\": its shape [{}] has a negative dimension or too many elements", what, shard.key,
          fmt::join(shard.shape, ", "));
  }
  if (!shard.local.defined()) raise("cannot {} the shard \"{}\": its local tensor is undefined", what, shard.key);
  if (shard.local.dim() != 1) {
    raise("cannot {} the shard \"{}\": expected a 1-D local slice, found {} dimensions; flatten it", what, shard.key,
          shard.local.dim());
  }
  if (shard.local.scalar_type() != shard.dtype) {
    raise("cannot {} the shard \"{}\": its dtype is {}, but its local tensor holds {}", what, shard.key,
          c10::toString(shard.dtype), c10::toString(shard.local.scalar_type()));
  }
  const std::int64_t count = shard.local.numel();
  if (shard.begin < 0 || shard.begin > *numel || count > *numel - shard.begin) {
    raise("cannot {} the shard \"{}\": elements [{}, {}) lie outside its tensor of shape [{}] ({} elements)", what,
          shard.key, shard.begin, shard.begin + count, fmt::join(shard.shape, ", "), *numel);
  }
  return *numel;
}

}  // namespace sharded

/// Starts a sharded save at `dir` (rank 0, before the other phases): removes stale staging of dead writers and
/// creates the staging directory, locked by this process until commit. A directory at `dir` that is neither a
/// sharded checkpoint nor empty is refused (it would be replaced); a plain file there is replaced at commit, as
/// Lightning's sharded save replaces it.
inline void prepare_sharded_save(const std::filesystem::path& input) {
  const auto dir = sharded::normalize(input);
  const auto staging = sharded::staging_of(dir);
  std::error_code ec;
  if (std::filesystem::is_directory(dir, ec) && !std::filesystem::is_regular_file(dir / sharded::meta_name, ec) &&
      !sharded::is_empty_directory(dir)) {
    raise(
        "cannot write a sharded checkpoint to {}: it is a directory that is not a sharded checkpoint, whose files "
        "the save would replace; choose another path or remove the directory",
        dir.string());
  }
  {
    // NOTE: this process's own lock is that of a save it abandoned (a rank failed before the commit): saves are
    // collective, so no other save of this process is under way; start afresh.
    const std::lock_guard<std::mutex> guard(sharded::held_locks_mutex());
    auto& locks = sharded::held_locks();
    if (const auto own = locks.find(staging.string()); own != locks.end()) {
      ::close(own->second);
      locks.erase(own);
    }
  }
  if (sharded::staging_in_use(staging)) {
    raise(
        "cannot write a sharded checkpoint to {}: another save to it is in progress (its staging directory {} is "
        "locked); wait for it to finish",
        dir.string(), staging.string());
  }
  sharded::remove_dead_fresh_staging(dir, staging);
  std::filesystem::remove_all(staging, ec);
  if (ec) raise("could not remove the stale staging directory {}: {}", staging.string(), ec.message());
  if (dir.has_parent_path()) std::filesystem::create_directories(dir.parent_path(), ec);
  // NOTE: the staging directory appears already locked: it is made under a name of this process and renamed.
  const std::string fresh = fmt::format("{}.tmp-{}", staging.string(), static_cast<long>(::getpid()));
  std::filesystem::remove_all(fresh, ec);
  if (::mkdir(fresh.c_str(), 0755) != 0) {
    raise("could not create the staging directory {}: {}; check that the directory is writable", fresh,
          std::strerror(errno));
  }
  const std::string lock = fresh + "/" + sharded::lock_name;
  const int fd = ::open(lock.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0 || ::flock(fd, LOCK_EX) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    std::filesystem::remove_all(fresh, ec);
    raise("could not lock the staging directory {}: {}", fresh, std::strerror(err));
  }
  if (::rename(fresh.c_str(), staging.c_str()) != 0) {
    const int err = errno;
    ::close(fd);
    std::filesystem::remove_all(fresh, ec);
    raise("could not create the staging directory {}: {}", staging.string(), std::strerror(err));
  }
  const std::lock_guard<std::mutex> guard(sharded::held_locks_mutex());
  auto& locks = sharded::held_locks();
  if (const auto old = locks.find(staging.string()); old != locks.end()) ::close(old->second);
  locks[staging.string()] = fd;
}

/// Writes rank `rank`'s shards (of a save by `world` ranks) into the staging directory of `dir`, as one
/// safetensors file with each shard's key, full shape, first element and CRC-32C. Each key at most once.
inline void write_shards(const std::filesystem::path& dir, int rank, int world,
                         const std::vector<TensorShard>& shards) {
  if (world < 1 || world > sharded::max_world || rank < 0 || rank >= world) {
    raise("cannot write the shards of rank {} of {}: expected 0 <= rank < world size <= {}", rank, world,
          sharded::max_world);
  }
  const auto staging = sharded::staging_of(dir);
  std::error_code ec;
  if (!std::filesystem::is_directory(staging, ec)) {
    raise(
        "cannot write the shards of rank {} to {}: its staging directory {} does not exist; rank 0 calls "
        "prepare_sharded_save(dir) first, then a barrier",
        rank, dir.string(), staging.string());
  }
  std::vector<safetensors::TensorInfo> infos;
  std::vector<at::Tensor> data;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  std::set<std::string> keys;
  for (const auto& shard : shards) {
    (void)sharded::check_shard(shard, "write");
    if (!keys.insert(shard.key).second) {
      raise("cannot write the shards of rank {}: \"{}\" is given twice; a rank holds one contiguous slice per tensor",
            rank, shard.key);
    }
    const char* dtype = safetensors::dtype_name(shard.dtype);
    if (dtype == nullptr) {
      raise("cannot write the shard \"{}\": its dtype {} has no safetensors name", shard.key,
            c10::toString(shard.dtype));
    }
    at::Tensor local = shard.local.detach().to(at::kCPU).contiguous();
    const auto bytes = static_cast<std::size_t>(local.numel()) * local.element_size();
    const std::uint32_t crc = bytes == 0 ? 0U : crc32c(local.data_ptr(), bytes);
    infos.push_back({shard.key, dtype, {local.numel()}, 0, 0});
    list.push_back({{"key", shard.key}, {"shape", shard.shape}, {"begin", shard.begin}, {"crc32c", crc}});
    data.push_back(std::move(local));
  }
  const nlohmann::ordered_json meta{
      {"format", sharded::format}, {"rank", rank}, {"world_size", world}, {"shards", list}};
  const std::string header = safetensors::write_header(infos, {{sharded::shards_key, meta.dump()}});
  // NOTE: written in pieces: a shard already on the CPU is not copied at all.
  std::vector<FilePiece> pieces{{header.data(), header.size()}};
  for (const auto& t : data) {
    pieces.push_back({static_cast<const char*>(t.data_ptr()), static_cast<std::size_t>(t.numel()) * t.element_size()});
  }
  write_atomically(staging / sharded::rank_file_name(rank, world), pieces);
}

/// Writes the plain entries of a sharded save (rank 0) into the staging directory of `dir`, with the index.
/// Keys may be '/'-paths or nested dictionaries. Consolidation puts a tensor where the metadata holds None at its
/// key (a placeholder: the order of the whole checkpoint is kept), else after the entries of its dictionary that
/// the metadata holds (an empty dictionary keeps an entry's place).
inline void write_sharded_meta(const std::filesystem::path& dir, int world, const Checkpoint& meta) {
  if (world < 1 || world > sharded::max_world) {
    raise("cannot write a sharded checkpoint of {} ranks; expected 1 to {}", world, sharded::max_world);
  }
  if (meta.contains(sharded::index_key)) {
    raise("expected metadata without the key \"{}\", which fabric's sharded format reserves; rename the entry",
          sharded::index_key);
  }
  const auto staging = sharded::staging_of(dir);
  std::error_code ec;
  if (!std::filesystem::is_directory(staging, ec)) {
    raise(
        "cannot write the metadata to {}: its staging directory {} does not exist; call prepare_sharded_save(dir) "
        "first",
        dir.string(), staging.string());
  }
  Checkpoint out = meta.copy();
  c10::impl::GenericDict index(c10::StringType::get(), c10::AnyType::get());
  index.insert("format", sharded::format);
  index.insert("world_size", static_cast<std::int64_t>(world));
  index.insert("version", std::string(fabric::version()));
  out.insert(sharded::index_key, index);
  NativeCheckpointIO{}.save_checkpoint(out, staging / sharded::meta_name);
}

/// Finishes a sharded save (rank 0, after every rank wrote): checks that the metadata and every rank's file are
/// in the staging directory, then swaps it with `dir` in one step and removes the previous checkpoint.
inline void commit_sharded_save(const std::filesystem::path& input) {
  const auto dir = sharded::normalize(input);
  const auto staging = sharded::staging_of(dir);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(staging / sharded::meta_name, ec)) {
    raise(
        "cannot commit the sharded save to {}: the metadata was not written (rank 0 calls write_sharded_meta "
        "before the barrier); the previous checkpoint is untouched",
        dir.string());
  }
  const std::int64_t world = sharded::read_meta(staging).second;
  for (int rank = 0; rank < static_cast<int>(world); ++rank) {
    if (!std::filesystem::is_regular_file(
            staging / sharded::rank_file_name(static_cast<int>(rank), static_cast<int>(world)), ec)) {
      raise(
          "cannot commit the sharded save to {}: rank {} of {} wrote no shards (every rank calls write_shards "
          "before the barrier); the previous checkpoint is untouched",
          dir.string(), rank, world);
    }
  }
  int lock_fd = -1;
  {
    const std::lock_guard<std::mutex> guard(sharded::held_locks_mutex());
    auto& locks = sharded::held_locks();
    if (const auto it = locks.find(staging.string()); it != locks.end()) {
      lock_fd = it->second;
      locks.erase(it);
    }
  }
  auto sync_dir = [](const std::filesystem::path& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  };
  sync_dir(staging);
  struct stat st {};
  const bool exists = ::lstat(dir.c_str(), &st) == 0;
  if (exists && S_ISDIR(st.st_mode) && !std::filesystem::is_regular_file(dir / sharded::meta_name, ec) &&
      !sharded::is_empty_directory(dir)) {
    if (lock_fd >= 0) ::close(lock_fd);
    raise("cannot replace {}: it is a directory that is not a sharded checkpoint; the new checkpoint stays in {}",
          dir.string(), staging.string());
  }
  int moved = -1;
  if (exists) {
#ifdef RENAME_EXCHANGE
    moved = ::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE);
#endif
    if (moved != 0) {
      // NOTE: a file system without RENAME_EXCHANGE: the previous checkpoint is moved aside, then replaced; a
      // crash between the two renames leaves it at <dir>.staging, complete, and the new one is lost.
      const std::string aside = staging.string() + ".previous";
      std::filesystem::remove_all(aside, ec);
      if (::rename(dir.c_str(), aside.c_str()) == 0) {
        moved = ::rename(staging.c_str(), dir.c_str());
        if (moved != 0) (void)::rename(aside.c_str(), dir.c_str());
        std::filesystem::remove_all(aside, ec);
      }
    }
  } else {
    moved = ::rename(staging.c_str(), dir.c_str());
  }
  const int err = errno;
  if (lock_fd >= 0) ::close(lock_fd);
  if (moved != 0) {
    raise("could not move the sharded checkpoint from {} to {}: {}; the previous checkpoint is untouched",
          staging.string(), dir.string(), std::strerror(err));
  }
  (void)::unlink((dir / sharded::lock_name).c_str());
  if (dir.has_parent_path()) sync_dir(dir.parent_path());
  std::filesystem::remove_all(staging, ec);  // the previous checkpoint, swapped out
}

}  // namespace detail

/// Says whether `path` is a sharded checkpoint directory (its metadata file exists), as Lightning's
/// `_is_sharded_checkpoint`.
inline bool is_sharded_checkpoint(const std::filesystem::path& path) {
  std::error_code ec;
  const auto dir = detail::sharded::normalize(path);
  return std::filesystem::is_directory(dir, ec) &&
         std::filesystem::is_regular_file(dir / detail::sharded::meta_name, ec);
}

namespace detail {

/// Says whether `path` is a sharded checkpoint directory (its metadata file exists).
inline bool is_sharded_checkpoint(const std::filesystem::path& path) { return fabric::is_sharded_checkpoint(path); }

/// The plain entries rank 0 wrote (everything that is not a tensor shard).
inline Checkpoint read_sharded_meta(const std::filesystem::path& dir) {
  const auto normalized = sharded::normalize(dir);
  (void)sharded::remove_stale_staging(normalized);
  return sharded::read_meta(normalized).first;
}

/// Fills every wanted shard's `local` (allocated by the caller: its size, dtype, device) from the files holding
/// its range — any begin and size, so a checkpoint written by W ranks loads into V ranks. Checks key, shape and
/// dtype; strict: a missing key is a fabric::Error naming it; not strict: returns the missing keys.
inline std::vector<std::string> load_shards(const std::filesystem::path& dir, std::vector<TensorShard>& wanted,
                                            bool strict) {
  sharded::Index index = sharded::open_index(dir);
  std::vector<std::string> missing;
  for (const auto& shard : wanted) {
    (void)sharded::check_shard(shard, "load");
    const auto it = index.tensors.find(shard.key);
    if (it == index.tensors.end()) {
      missing.push_back(shard.key);
      continue;
    }
    const sharded::Stored& stored = it->second;
    if (stored.shape != shard.shape || stored.dtype != shard.dtype) {
      raise("cannot load \"{}\" from {}: it is stored as a {} tensor of shape [{}], expected a {} tensor of shape [{}]",
            shard.key, index.dir.string(), c10::toString(stored.dtype), fmt::join(stored.shape, ", "),
            c10::toString(shard.dtype), fmt::join(shard.shape, ", "));
    }
    if (!shard.local.is_contiguous()) raise("cannot load \"{}\": its local tensor is not contiguous", shard.key);
  }
  if (strict && !missing.empty()) {
    raise("cannot load {}: the sharded checkpoint has no {}; load with strict=false to leave them as they are",
          index.dir.string(), fmt::format("\"{}\"", fmt::join(missing, "\", \"")));
  }
  for (auto& shard : wanted) {
    if (!index.tensors.contains(shard.key) || shard.local.numel() == 0) continue;
    at::Tensor local = shard.local;
    const bool direct = local.device().is_cpu() && local.is_contiguous();
    at::Tensor target = direct ? local : at::empty({local.numel()}, at::TensorOptions().dtype(shard.dtype));
    sharded::copy_range(index, shard.key, shard.begin, local.numel(), static_cast<unsigned char*>(target.data_ptr()));
    if (!direct) {
      const at::NoGradGuard no_grad;
      local.copy_(target);
    }
  }
  return missing;
}

/// The whole checkpoint with every tensor assembled, keys split on '/' into nested dictionaries (needs the
/// whole checkpoint in CPU memory). PyTorch's optimizer layout ({"state", "param_groups"}) gets its integer
/// state keys back.
inline Checkpoint consolidate_sharded(const std::filesystem::path& dir) {
  sharded::Index index = sharded::open_index(dir);
  const Checkpoint meta = sharded::read_meta(index.dir).first;
  Checkpoint root(c10::StringType::get(), c10::AnyType::get());
  for (const auto& item : meta) sharded::insert_path(root, item.key().toStringRef(), item.value());
  for (const auto& key : index.order) {
    const sharded::Stored& stored = index.tensors.at(key);
    at::Tensor full = at::empty(stored.shape, at::TensorOptions().dtype(stored.dtype));
    if (stored.numel > 0)
      sharded::copy_range(index, key, 0, stored.numel, static_cast<unsigned char*>(full.data_ptr()));
    sharded::insert_path(root, key, full);
  }
  Checkpoint out(c10::StringType::get(), c10::AnyType::get());
  for (const auto& item : root) out.insert(item.key(), sharded::with_optimizer_keys(item.value()));
  return out;
}

/// Splits a whole checkpoint (nested dictionaries, PyTorch's optimizer layout) into the tensors to shard (every
/// tensor, under its '/'-path, in order) and the metadata (the rest, with None in each tensor's place), so that
/// consolidate_sharded gives the checkpoint back as it was, in its order.
inline std::pair<Checkpoint, std::vector<std::pair<std::string, at::Tensor>>> split_for_sharding(
    const Checkpoint& full) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  auto walk = [&](auto& self, const c10::impl::GenericDict& dict, const std::string& prefix) -> c10::impl::GenericDict {
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& item : dict) {
      const std::string name = item.key().isString() ? item.key().toStringRef()
                               : item.key().isInt()  ? fmt::format("{}", item.key().toInt())
                                                     : std::string();
      if (name.empty() || name.find('/') != std::string::npos) {
        raise("cannot shard the entry \"{}{}\": expected keys that are non-empty strings without '/' or integers",
              prefix, name.empty() ? describe(item.key()) : name);
      }
      const std::string path = prefix + name;
      const c10::IValue& v = item.value();
      if (v.isTensor() && v.toTensor().defined()) {
        tensors.emplace_back(path, v.toTensor());
        out.insert(item.key(), c10::IValue());
      } else if (v.isGenericDict()) {
        out.insert(item.key(), self(self, v.toGenericDict(), path + "/"));
      } else {
        out.insert(item.key(), v);
      }
    }
    return out;
  };
  Checkpoint meta = walk(walk, full, "");
  return {std::move(meta), std::move(tensors)};
}

}  // namespace detail

/// Lightning's `fabric consolidate`: writes the sharded checkpoint at `dir` as one file (default
/// `<dir>.consolidated`) in PyTorch's torch.save format, which single-device fabric, Python's torch.load and
/// Lightning's fabric.load read. An existing output file is refused, as Lightning refuses it.
///
///     fabric::consolidate_checkpoint("checkpoints/step-1000");  // -> checkpoints/step-1000.consolidated
inline void consolidate_checkpoint(const std::filesystem::path& dir, const std::filesystem::path& output = {}) {
  std::error_code ec;
  const auto folder = detail::sharded::normalize(dir);
  if (!std::filesystem::exists(folder, ec)) {
    detail::raise("the checkpoint folder to consolidate does not exist: {}", folder.string());
  }
  if (!std::filesystem::is_directory(folder, ec)) {
    detail::raise("the checkpoint path to consolidate must be a folder, containing the checkpoint shards: {}",
                  folder.string());
  }
  if (!is_sharded_checkpoint(folder)) {
    detail::raise(
        "only sharded checkpoints saved with fabric can be consolidated; {} has no {} (it is not in that format)",
        folder.string(), detail::sharded::meta_name);
  }
  const std::filesystem::path target =
      output.empty() ? std::filesystem::path(folder.string() + ".consolidated") : output;
  if (std::filesystem::exists(std::filesystem::symlink_status(target, ec))) {
    detail::raise(
        "the path for the consolidated checkpoint already exists: {}; choose another output file or move/delete it "
        "first",
        target.string());
  }
  const Checkpoint checkpoint = detail::consolidate_sharded(folder);
  std::vector<char> bytes;
  try {
    bytes = detail::torch_pickle::write_bytes(checkpoint);
  } catch (const c10::Error& e) {
    detail::raise("could not write {} ({}); nothing was written", target.string(),
                  detail::first_line(e.what_without_backtrace()));
  }
  detail::write_atomically(target, bytes.data(), bytes.size());
}

}  // namespace fabric
