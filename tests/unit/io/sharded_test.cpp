// Sharded checkpoints (fabric/io/sharded.hpp): W simulated ranks write their shards in one process and V ranks
// read them back (resharding), hostile and broken directories are refused with a fabric::Error naming what is
// wrong, a save killed midway leaves the previous checkpoint loadable, and consolidation gives, bit for bit,
// the file fabric::TorchCheckpointIO writes for the same state, which fabric and Python's torch.load read.

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

// Lightning left out: tests_fabric/utilities/test_consolidate_checkpoint.py::test_process_cli_args_remote - fsspec remote storage is Python-only

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using fabric::TensorShard;
using fabric_test::TempDir;

const fs::path python_dir = fs::path(__FILE__).parent_path().parent_path().parent_path() / "python";

/// A named full tensor to shard.
struct Full {
  std::string key;
  at::Tensor tensor;
};

/// The slice [begin, end) of a full tensor as a shard.
TensorShard slice(const Full& full, std::int64_t begin, std::int64_t end) {
  const at::Tensor flat = full.tensor.reshape({-1});
  return {full.key, full.tensor.sizes().vec(), full.tensor.scalar_type(), begin, flat.slice(0, begin, end).clone()};
}

/// The even split of n elements over world ranks (the last ones get fewer; some may get none).
std::pair<std::int64_t, std::int64_t> even_range(std::int64_t n, int rank, int world) {
  const std::int64_t per = (n + world - 1) / world;
  const std::int64_t begin = std::min(n, per * rank);
  return {begin, std::min(n, begin + per)};
}

/// Runs the phases of a sharded save of `world` ranks in this process, rank by rank.
void save(const fs::path& dir, int world, const std::vector<std::vector<TensorShard>>& shards,
          const fabric::Checkpoint& meta) {
  fabric::detail::prepare_sharded_save(dir);
  for (int rank = 0; rank < world; ++rank) fabric::detail::write_shards(dir, rank, world, shards[rank]);
  fabric::detail::write_sharded_meta(dir, world, meta);
  fabric::detail::commit_sharded_save(dir);
}

/// Saves full tensors split evenly over `world` ranks.
void save_even(const fs::path& dir, int world, const std::vector<Full>& tensors, const fabric::Checkpoint& meta) {
  std::vector<std::vector<TensorShard>> shards(world);
  for (int rank = 0; rank < world; ++rank) {
    for (const auto& full : tensors) {
      const auto [begin, end] = even_range(full.tensor.numel(), rank, world);
      shards[rank].push_back(slice(full, begin, end));
    }
  }
  save(dir, world, shards, meta);
}

fabric::Checkpoint empty_meta() { return fabric::Checkpoint(c10::StringType::get(), c10::AnyType::get()); }

fabric::Checkpoint step_meta(std::int64_t step) {
  auto meta = empty_meta();
  meta.insert("step", step);
  return meta;
}

/// The wanted shards of rank `rank` of `world` for the same tensors, zero-filled.
std::vector<TensorShard> wanted_even(const std::vector<Full>& tensors, int rank, int world) {
  std::vector<TensorShard> out;
  for (const auto& full : tensors) {
    const auto [begin, end] = even_range(full.tensor.numel(), rank, world);
    out.push_back({full.key, full.tensor.sizes().vec(), full.tensor.scalar_type(), begin,
                   at::zeros({end - begin}, full.tensor.options())});
  }
  return out;
}

std::vector<Full> sample_tensors() {
  torch::manual_seed(3);
  return {{"model/0.weight", torch::randn({7, 5})},
          {"model/0.bias", torch::randn({7})},
          {"model/tiny", torch::randn({1})},
          {"model/empty", torch::zeros({0, 3})},
          {"model/counts", torch::arange(11, torch::kLong)},
          {"optimizer/state/0/exp_avg", torch::randn({7, 5}).to(torch::kBFloat16)}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const fabric::Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

fs::path rank_file(const fs::path& dir, int rank, int world) {
  return dir / fmt::format("rank-{:05}-of-{:05}.safetensors", rank, world);
}

TEST_CASE("sharded checkpoints reshard on load: W ranks write, V ranks read any ranges", "[sharded]") {
  const auto tensors = sample_tensors();
  const auto [written, read] = GENERATE(table<int, int>({{2, 3}, {3, 2}, {2, 1}, {3, 1}, {1, 3}, {4, 4}, {5, 2}}));
  INFO("written by " << written << ", read by " << read);
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  save_even(dir, written, tensors, step_meta(5));
  CHECK(fabric::is_sharded_checkpoint(dir));
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 5);
  for (int rank = 0; rank < read; ++rank) {
    auto wanted = wanted_even(tensors, rank, read);
    CHECK(fabric::detail::load_shards(dir, wanted, true).empty());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto [begin, end] = even_range(tensors[i].tensor.numel(), rank, read);
      INFO(tensors[i].key << " on rank " << rank);
      CHECK(torch::equal(wanted[i].local, tensors[i].tensor.reshape({-1}).slice(0, begin, end)));
    }
  }
}

TEST_CASE("sharded checkpoints: uneven and zero-size shards, any wanted range, strict and not strict", "[sharded]") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  const Full w{"model/w", torch::arange(20, torch::kFloat).reshape({4, 5})};
  const Full b{"model/b", torch::arange(3, torch::kDouble)};
  // Rank 0 holds [0, 13) of w and nothing of b, rank 1 holds nothing of w, rank 2 holds [13, 20) and all of b.
  save(dir, 3, {{slice(w, 0, 13), slice(b, 0, 0)}, {slice(w, 13, 13)}, {slice(w, 13, 20), slice(b, 0, 3)}},
       empty_meta());
  for (std::int64_t begin = 0; begin <= 20; ++begin) {
    for (std::int64_t end = begin; end <= 20; ++end) {
      std::vector<TensorShard> wanted{{"model/w", {4, 5}, at::kFloat, begin, at::full({end - begin}, -1.0F)}};
      CHECK(fabric::detail::load_shards(dir, wanted, true).empty());
      CHECK(torch::equal(wanted[0].local, torch::arange(begin, end, torch::kFloat)));
    }
  }
  std::vector<TensorShard> wanted{{"model/b", {3}, at::kDouble, 1, at::zeros({2}, at::kDouble)},
                                  {"model/gone", {2}, at::kFloat, 0, at::full({2}, 7.0F)}};
  CHECK_THAT(error_of([&] { (void)fabric::detail::load_shards(dir, wanted, true); }),
             ContainsSubstring("has no \"model/gone\"") && ContainsSubstring("strict=false"));
  const auto missing = fabric::detail::load_shards(dir, wanted, false);
  CHECK(missing == std::vector<std::string>{"model/gone"});
  CHECK(torch::equal(wanted[0].local, torch::arange(1, 3, torch::kDouble)));
  CHECK(torch::equal(wanted[1].local, at::full({2}, 7.0F)));  // left as it was
  // A wanted shard whose local tensor is a view of a larger buffer (padding-free slices of one flat buffer).
  at::Tensor flat = at::zeros({25});
  std::vector<TensorShard> views{{"model/w", {4, 5}, at::kFloat, 2, flat.slice(0, 0, 10)},
                                 {"model/w", {4, 5}, at::kFloat, 12, flat.slice(0, 10, 18)}};
  CHECK(fabric::detail::load_shards(dir, views, true).empty());
  CHECK(torch::equal(flat.slice(0, 0, 10), torch::arange(2, 12, torch::kFloat)));
  CHECK(torch::equal(flat.slice(0, 10, 18), torch::arange(12, 20, torch::kFloat)));
  CHECK(torch::equal(flat.slice(0, 18), torch::zeros({7})));
}

TEST_CASE("load_shards refuses wanted shards that do not match what is stored", "[sharded]") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  const Full w{"model/w", torch::arange(6, torch::kFloat).reshape({2, 3})};
  save(dir, 1, {{slice(w, 0, 6)}}, empty_meta());
  auto load = [&](TensorShard shard) {
    std::vector<TensorShard> wanted{std::move(shard)};
    return error_of([&] { (void)fabric::detail::load_shards(dir, wanted, true); });
  };
  CHECK_THAT(load({"model/w", {3, 2}, at::kFloat, 0, at::zeros({6})}),
             ContainsSubstring("stored as a Float tensor of shape [2, 3], expected a Float tensor of shape [3, 2]"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kDouble, 0, at::zeros({6}, at::kDouble)}),
             ContainsSubstring("expected a Double tensor"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, 0, at::zeros({6}, at::kDouble)}),
             ContainsSubstring("its local tensor holds Double"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, 4, at::zeros({3})}),
             ContainsSubstring("elements [4, 7) lie outside its tensor of shape [2, 3]"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, -1, at::zeros({3})}), ContainsSubstring("lie outside"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, 0, at::zeros({2, 3})}), ContainsSubstring("expected a 1-D"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, 0, at::Tensor()}), ContainsSubstring("undefined"));
  CHECK_THAT(load({"model/w", {2, 3}, at::kFloat, 0, at::zeros({12}).slice(0, 0, 12, 2)}),
             ContainsSubstring("not contiguous"));
  CHECK_THAT(load({"model//w", {2, 3}, at::kFloat, 0, at::zeros({6})}), ContainsSubstring("has an empty part"));
}

TEST_CASE("sharded saves refuse bad shards and calls out of order", "[sharded]") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  const Full w{"model/w", torch::arange(6, torch::kFloat)};
  CHECK_THAT(error_of([&] { fabric::detail::write_shards(dir, 0, 1, {slice(w, 0, 6)}); }),
             ContainsSubstring("calls prepare_sharded_save(dir) first"));
  fabric::detail::prepare_sharded_save(dir);
  CHECK_THAT(error_of([&] { fabric::detail::write_shards(dir, 2, 2, {}); }),
             ContainsSubstring("expected 0 <= rank < world size"));
  CHECK_THAT(error_of([&] {
               fabric::detail::write_shards(dir, 0, 1, {slice(w, 0, 3), slice(w, 3, 6)});
             }),
             ContainsSubstring("\"model/w\" is given twice"));
  TensorShard outside = slice(w, 2, 6);
  outside.begin = 3;
  CHECK_THAT(error_of([&] { fabric::detail::write_shards(dir, 0, 1, {outside}); }),
             ContainsSubstring("elements [3, 7) lie outside"));
  fabric::detail::write_shards(dir, 0, 2, {slice(w, 0, 3)});
  fabric::detail::write_sharded_meta(dir, 2, empty_meta());
  CHECK_THAT(error_of([&] { fabric::detail::commit_sharded_save(dir); }),
             ContainsSubstring("rank 1 of 2 wrote no shards") && ContainsSubstring("previous checkpoint is untouched"));
  CHECK_FALSE(fs::exists(dir));
  auto reserved = empty_meta();
  reserved.insert("__fabric_sharded__", 1);
  CHECK_THAT(error_of([&] { fabric::detail::write_sharded_meta(dir, 2, reserved); }), ContainsSubstring("reserves"));
  // Another process's save in progress is refused; this process's own unfinished save is abandoned (below).
  const pid_t other = ::fork();
  if (other == 0) {
    try {
      fabric::detail::prepare_sharded_save(dir);
    } catch (const fabric::Error& e) {
      ::_exit(std::string_view(e.what()).find("another save to it is in progress") != std::string_view::npos ? 0 : 2);
    }
    ::_exit(1);
  }
  int status = 0;
  REQUIRE(::waitpid(other, &status, 0) == other);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  fabric::detail::write_shards(dir, 1, 2, {slice(w, 3, 6)});
  fabric::detail::commit_sharded_save(dir);
  std::vector<TensorShard> wanted{{"model/w", {6}, at::kFloat, 0, at::zeros({6})}};
  (void)fabric::detail::load_shards(dir, wanted, true);
  CHECK(torch::equal(wanted[0].local, w.tensor));
  CHECK_FALSE(fs::exists(tmp / "ckpt.staging"));
  CHECK_FALSE(fs::exists(dir / ".lock"));
  // A save abandoned after prepare (a rank failed): the next save of this process starts afresh.
  fabric::detail::prepare_sharded_save(dir);
  fabric::detail::write_shards(dir, 0, 1, {slice(w, 0, 6)});
  save(dir, 2, {{slice(w, 0, 2)}, {slice(w, 2, 6)}}, step_meta(9));
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 9);
  CHECK_FALSE(fs::exists(tmp / "ckpt.staging"));
}

/// The files of a valid 2-rank checkpoint of w = arange(6) split [0, 4) and [4, 6), for tampering.
fs::path tamper_base(const TempDir& tmp) {
  const fs::path dir = tmp / "ckpt";
  const Full w{"model/w", torch::arange(6, torch::kFloat)};
  save(dir, 2, {{slice(w, 0, 4)}, {slice(w, 4, 6)}}, step_meta(1));
  return dir;
}

/// Rewrites rank `rank`'s file of a checkpoint of `world` with other shards (as a buggy or hostile writer would).
void rewrite_rank(const fs::path& dir, int rank, int world, const std::vector<TensorShard>& shards) {
  const fs::path other = dir.string() + "-other";
  fabric::detail::prepare_sharded_save(other);
  fabric::detail::write_shards(other, rank, world, shards);
  fs::copy_file(fs::path(other.string() + ".staging") / rank_file(dir, rank, world).filename(),
                rank_file(dir, rank, world), fs::copy_options::overwrite_existing);
}

std::string load_error(const fs::path& dir) {
  return error_of([&] { (void)fabric::detail::consolidate_sharded(dir); });
}

TEST_CASE("sharded checkpoints: malformed and hostile directories are a fabric::Error naming the problem",
          "[sharded][malformed]") {
  TempDir tmp;
  const fs::path dir = tamper_base(tmp);
  const Full w{"model/w", torch::arange(6, torch::kFloat)};
  const auto original = read_bytes(rank_file(dir, 1, 2));
  auto restore = [&] { write_bytes(rank_file(dir, 1, 2), original); };
  REQUIRE(load_error(dir) == "(no error)");

  SECTION("ranges overlapping") {
    rewrite_rank(dir, 1, 2, {slice(w, 3, 6)});
    CHECK_THAT(load_error(dir), ContainsSubstring("the ranges of \"model/w\" overlap: rank 0 holds [0, 4) and rank 1 "
                                                  "holds [3, 6)"));
  }
  SECTION("elements in no rank's file") {
    rewrite_rank(dir, 1, 2, {slice(w, 5, 6)});
    CHECK_THAT(load_error(dir), ContainsSubstring("elements [4, 5) of \"model/w\" (shape [6]) are in no rank's file"));
  }
  SECTION("a shape differing between ranks") {
    TensorShard other{"model/w", {2, 3}, at::kFloat, 4, torch::arange(4, 6, torch::kFloat)};
    rewrite_rank(dir, 1, 2, {other});
    CHECK_THAT(load_error(dir), ContainsSubstring("\"model/w\" is a Float tensor of shape [6] on rank 0, but a Float "
                                                  "tensor of shape [2, 3] on rank 1"));
  }
  SECTION("a dtype differing between ranks") {
    TensorShard other{"model/w", {6}, at::kDouble, 4, torch::arange(4, 6, torch::kDouble)};
    rewrite_rank(dir, 1, 2, {other});
    CHECK_THAT(load_error(dir), ContainsSubstring("but a Double tensor"));
  }
  SECTION("a missing rank") {
    fs::remove(rank_file(dir, 1, 2));
    CHECK_THAT(load_error(dir), ContainsSubstring("has no file for rank 1 (rank-00001-of-00002.safetensors)"));
  }
  SECTION("files of another world size") {
    fs::copy_file(rank_file(dir, 1, 2), rank_file(dir, 1, 3));
    CHECK_THAT(load_error(dir), ContainsSubstring("written by 2 ranks, but it holds the files "
                                                  "rank-00001-of-00003.safetensors of another world size"));
  }
  SECTION("a rank file of another rank") {
    fs::copy_file(rank_file(dir, 0, 2), rank_file(dir, 1, 2), fs::copy_options::overwrite_existing);
    CHECK_THAT(load_error(dir), ContainsSubstring("it says it is rank 0 of 2, expected rank 1 of 2"));
  }
  SECTION("a corrupt shard: its CRC-32C names the entry") {
    auto bytes = original;
    bytes[bytes.size() - 3] ^= 0x10;
    write_bytes(rank_file(dir, 1, 2), bytes);
    CHECK_THAT(load_error(dir), ContainsSubstring("the shard of \"model/w\" in") && ContainsSubstring("is corrupt"));
    std::vector<TensorShard> rank0{{"model/w", {6}, at::kFloat, 0, at::zeros({4})}};
    CHECK_NOTHROW(fabric::detail::load_shards(dir, rank0, true));  // rank 0's range is intact
  }
  SECTION("a truncated rank file") {
    write_bytes(rank_file(dir, 1, 2), original.substr(0, original.size() - 4));
    CHECK_THAT(load_error(dir), ContainsSubstring("invalid safetensors file"));
    write_bytes(rank_file(dir, 1, 2), original.substr(0, 5));
    CHECK_THAT(load_error(dir), ContainsSubstring("expected at least 8"));
  }
  SECTION("a safetensors file that is not a rank file") {
    fabric::SafetensorsCheckpointIO{}.save_checkpoint(step_meta(3), rank_file(dir, 1, 2));
    CHECK_THAT(load_error(dir), ContainsSubstring("no \"fabric_sharded\" metadata"));
  }
  SECTION("hostile shard lists") {
    // Edits the shard list (JSON in the header's JSON) and the header length before it.
    auto edit = [&](const std::string& from, const std::string& to) {
      auto bytes = original;
      const auto at = bytes.find(from);
      REQUIRE(at != std::string::npos);
      bytes.replace(at, from.size(), to);
      std::uint64_t length = 0;
      for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(bytes[i]);
      length += to.size() - from.size();
      for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
      write_bytes(rank_file(dir, 1, 2), bytes);
      return load_error(dir);
    };
    CHECK_THAT(edit("\\\"begin\\\":4", "\\\"begin\\\":5"), ContainsSubstring("elements [5, 7) lie outside"));
    restore();
    CHECK_THAT(edit("\\\"shape\\\":[6]", "\\\"shape\\\":[-6]"), ContainsSubstring("non-negative dimensions"));
    restore();
    CHECK_THAT(edit("\\\"begin\\\":4", "\\\"begin\\\":-4"), ContainsSubstring("elements [-4, -2) lie outside"));
    restore();
    CHECK_THAT(edit("\\\"shape\\\":[6]", "\\\"shape\\\":[4294967296,4294967296]"),
               ContainsSubstring("the element count of the shape [4294967296, 4294967296] overflows"));
    restore();
    CHECK_THAT(edit("\\\"crc32c\\\":", "\\\"crc32c\\\":4294967296,\\\"x\\\":"),
               ContainsSubstring("not a 32-bit checksum"));
    restore();
    CHECK_THAT(edit("\\\"format\\\":1", "\\\"format\\\":2"), ContainsSubstring("upgrade fabric"));
    restore();
    CHECK_THAT(edit("{\\\"key\\\"", "{\\\"key\\\":1,\\\"k\\\""), ContainsSubstring("has no \"key\" string"));
    restore();
    CHECK_THAT(edit("\\\"rank\\\":1", "\\\"rank\\\":0"), ContainsSubstring("expected rank 1 of 2"));
    restore();
    CHECK_THAT(edit("\\\"key\\\":\\\"model/w\\\"", "\\\"key\\\":\\\"model/v\\\""),
               ContainsSubstring("shard \"model/v\" has no tensor in the file"));
    restore();
    CHECK_THAT(edit("\\\"crc32c\\\":", "\\\"crc32c\\\" "), ContainsSubstring("not JSON"));
  }
  SECTION("a corrupt metadata file") {
    auto meta = read_bytes(dir / "fabric-meta.ckpt");
    // NOTE: a byte of the pickled index (a byte in the middle of the file can fall into the padding LibTorch
    // 2.x aligns entries with, which changes no value).
    const std::string_view index = "__fabric_sharded__";
    const auto at = std::search(meta.begin(), meta.end(), index.begin(), index.end());
    REQUIRE(at != meta.end());
    at[2] ^= 0x01;
    write_bytes(dir / "fabric-meta.ckpt", meta);
    CHECK_THAT(load_error(dir), ContainsSubstring("fabric-meta.ckpt"));
  }
  SECTION("metadata without the index") {
    fabric::NativeCheckpointIO{}.save_checkpoint(step_meta(1), dir / "fabric-meta.ckpt");
    CHECK_THAT(load_error(dir), ContainsSubstring("expected the index \"__fabric_sharded__\""));
  }
  SECTION("no metadata file, or no directory") {
    fs::remove(dir / "fabric-meta.ckpt");
    CHECK_FALSE(fabric::is_sharded_checkpoint(dir));
    CHECK_THAT(load_error(dir), ContainsSubstring("without its metadata file fabric-meta.ckpt"));
    CHECK_THAT(load_error(tmp / "nothing"), ContainsSubstring("found nothing"));
  }
}

TEST_CASE("sharded saves replace the previous checkpoint atomically and follow Lightning's overwrite rules",
          "[sharded]") {
  TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  const Full small{"model/w", torch::arange(4, torch::kFloat)};
  save_even(dir, 2, {small}, step_meta(1));
  const Full larger{"model/w", torch::arange(10, torch::kFloat)};
  save_even(fs::path(dir.string() + "/"), 3, {larger}, step_meta(2));  // a trailing '/' names the same checkpoint
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 2);
  CHECK_FALSE(fs::exists(rank_file(dir, 0, 2)));  // the previous checkpoint's files are gone
  CHECK(fs::exists(rank_file(dir, 2, 3)));
  CHECK_FALSE(fs::exists(tmp / "ckpt.staging"));

  // Lightning's sharded save replaces a file at the path (fsdp.py: _prepare_directory_checkpoint).
  const fs::path file = tmp / "was-a-file";
  std::ofstream(file) << "a full checkpoint";
  save_even(file, 1, {small}, step_meta(3));
  CHECK(fabric::is_sharded_checkpoint(file));
  // A directory that is not a checkpoint is refused: its files would be replaced.
  fs::create_directories(tmp / "mine");
  std::ofstream(tmp / "mine" / "notes.txt") << "keep";
  CHECK_THAT(error_of([&] { fabric::detail::prepare_sharded_save(tmp / "mine"); }),
             ContainsSubstring("a directory that is not a sharded checkpoint"));
  CHECK(fs::exists(tmp / "mine" / "notes.txt"));
  CHECK_FALSE(fabric::is_sharded_checkpoint(tmp / "mine"));
  CHECK_FALSE(fabric::is_sharded_checkpoint(tmp / "mine" / "notes.txt"));
  fs::create_directories(tmp / "empty");
  save_even(tmp / "empty", 1, {small}, step_meta(4));
  CHECK(fabric::is_sharded_checkpoint(tmp / "empty"));

  // Stale staging of a dead writer (no lock held) is removed by the next load and by the next save.
  fs::create_directories(tmp / "ckpt.staging");
  std::ofstream(tmp / "ckpt.staging" / ".lock") << "";
  std::ofstream(tmp / "ckpt.staging" / "rank-00000-of-00001.safetensors") << "half";
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 2);
  CHECK_FALSE(fs::exists(tmp / "ckpt.staging"));
  fs::create_directories(tmp / "ckpt.staging");
  save_even(dir, 1, {small}, step_meta(5));
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 5);
  // A writer killed while making its staging directory (its process is gone) leaves `<staging>.tmp-<pid>`.
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  REQUIRE(::waitpid(child, nullptr, 0) == child);
  const fs::path dead = fmt::format("{}/ckpt.staging.tmp-{}", tmp.path().string(), child);
  const fs::path live = fmt::format("{}/ckpt.staging.tmp-{}", tmp.path().string(), ::getppid());
  fs::create_directories(dead);
  fs::create_directories(live);
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 5);
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(live));
  // A commit without RENAME_EXCHANGE killed between its two renames: the previous checkpoint comes back.
  fs::rename(dir, tmp / "ckpt.staging.previous");
  CHECK(fabric::detail::read_sharded_meta(dir).at("step").toInt() == 5);
  CHECK_FALSE(fs::exists(tmp / "ckpt.staging.previous"));
}

TEST_CASE("sharded saves killed with SIGKILL at random moments: the previous checkpoint loads, staging is cleaned",
          "[sharded]") {
  TempDir tmp;
  const fs::path dir = tmp / "killed";
  const Full first{"model/w", torch::full({8}, 0.25F)};
  save_even(dir, 2, {first}, step_meta(0));
  // Built before fork: the child only writes.
  const Full big{"model/w", torch::full({3'000'000}, 0.5F)};  // 12 MB over 3 ranks
  // The kills land within a few saves' time of the child starting, whatever the machine's speed.
  const auto started = std::chrono::steady_clock::now();
  save_even(tmp / "timed", 3, {big}, step_meta(1));
  const auto one_save =
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
  INFO("one save takes " << one_save.count() << " us");
  std::mt19937 rng(18);
  int interrupted = 0;
  for (int kill = 0; kill < 20; ++kill) {
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(ready[0]);
      // NOTE: one thread, as PyTorch's DataLoader workers: a forked child of a process whose OpenMP pool ran
      // never finished a parallel copy on the GPU machine (LibTorch 2.11, 16 cores: no save in 20 s, against
      // 18 ms in the parent); fabric's launchers start processes with exec, not fork.
      at::set_num_threads(1);
      try {
        for (std::int64_t i = 1;; ++i) {
          save_even(dir, 3, {big}, step_meta(i));
          if (i == 1) (void)!::write(ready[1], "s", 1);  // the first save finished: the next ones are killed
        }
      } catch (...) {
        ::_exit(3);
      }
    }
    ::close(ready[1]);
    pollfd wait_ready{ready[0], POLLIN, 0};
    const int polled = ::poll(&wait_ready, 1, 20'000);
    ::close(ready[0]);
    if (polled != 1) ::kill(pid, SIGKILL);
    REQUIRE(polled == 1);  // else the child did not finish a save in 20 s
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % (3 * one_save.count() + 1)));
    ::kill(pid, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    if (fs::exists(tmp / "killed.staging")) ++interrupted;
    INFO("kill " << kill);
    const auto checkpoint = fabric::detail::consolidate_sharded(dir);  // the previous checkpoint, whole
    const at::Tensor w = checkpoint.at("model").toGenericDict().at("w").toTensor();
    if (checkpoint.at("step").toInt() == 0) {
      CHECK(torch::equal(w, first.tensor));
    } else {
      CHECK(torch::equal(w, big.tensor));
    }
    CHECK_FALSE(fs::exists(tmp / "killed.staging"));  // the load removed the dead writer's staging
  }
  INFO(interrupted << " of 20 kills left a staging directory behind");
  CHECK(interrupted > 0);
}

// ---- consolidation -------------------------------------------------------------------------------------------

torch::nn::Sequential make_model() {
  return torch::nn::Sequential(torch::nn::Linear(3, 4), torch::nn::BatchNorm1d(4), torch::nn::Linear(4, 2));
}

struct Run {
  torch::nn::Sequential model = make_model();
  torch::nn::Sequential model2 = make_model();
  torch::optim::AdamW adamw{model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.1)};
  torch::optim::SGD sgd{model2->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01)};
  std::int64_t step = 7;
  fabric::State state() {
    return {{"model", model}, {"optimizer", adamw}, {"model2", model2}, {"optimizer2", sgd}, {"step", std::ref(step)}};
  }
  void train() {
    const at::Tensor x = torch::arange(6, torch::kFloat).reshape({2, 3}) / 10;
    adamw.zero_grad();
    model->forward(x).pow(2).sum().backward();
    adamw.step();
    sgd.zero_grad();
    model2->forward(x).pow(2).sum().backward();
    sgd.step();
  }
};

fabric::Fabric<fabric::CPU> torch_fabric() {
  return fabric::Fabric<fabric::CPU>({}, fabric::SingleDevice({.checkpoint_io = fabric::TorchCheckpointIO{}}),
                                     fabric::FP32{});
}

/// Writes `run`'s state (with "name" and "nested" as tests/python/check_ckpt.py expects) as TorchCheckpointIO does
/// (`full`) and as a sharded checkpoint of `world` ranks (`dir`), each tensor cut at random points (some ranks hold
/// nothing of it).
void write_both(Run& run, const fs::path& full, const fs::path& dir, int world, unsigned seed) {
  auto state = run.state();
  state.emplace("name", std::string("run"));
  state.emplace("nested", fabric::StateEntry(c10::IValue(c10::List<double>({1.5, 2.5}))));
  torch_fabric().save(full, state);
  const auto whole = fabric::TorchCheckpointIO::read(full).toGenericDict();
  auto [meta, tensors] = fabric::detail::split_for_sharding(whole);
  std::mt19937 rng(seed);
  std::vector<std::vector<TensorShard>> shards(world);
  for (const auto& [key, tensor] : tensors) {
    const std::int64_t n = tensor.numel();
    std::vector<std::int64_t> cuts{0, n};
    for (int r = 1; r < world; ++r) cuts.push_back(static_cast<std::int64_t>(rng() % (n + 1)));
    std::sort(cuts.begin(), cuts.end());
    for (int r = 0; r < world; ++r) shards[r].push_back(slice({key, tensor}, cuts[r], cuts[r + 1]));
  }
  save(dir, world, shards, meta);
}

TEST_CASE("consolidate_checkpoint writes, bit for bit, what TorchCheckpointIO writes for the same state",
          "[sharded][consolidate]") {
  const int world = GENERATE(1, 2, 3);
  TempDir tmp;
  torch::manual_seed(2);
  Run run;
  for (int i = 0; i < 2; ++i) run.train();
  write_both(run, tmp / "full.ckpt", tmp / "sharded", world, 40U + static_cast<unsigned>(world));
  fabric::consolidate_checkpoint(tmp / "sharded");
  REQUIRE(fs::exists(tmp / "sharded.consolidated"));
  CHECK(read_bytes(tmp / "sharded.consolidated") == read_bytes(tmp / "full.ckpt"));
  CHECK_THAT(error_of([&] { fabric::consolidate_checkpoint(tmp / "sharded"); }),
             ContainsSubstring("already exists: " + (tmp / "sharded.consolidated").string()));
  fabric::consolidate_checkpoint(tmp / "sharded/", tmp / "out" / "model.pt");
  CHECK(read_bytes(tmp / "out" / "model.pt") == read_bytes(tmp / "full.ckpt"));

  // The consolidated file resumes single-device training: model, AdamW and SGD continue exactly.
  Run resumed;
  resumed.step = 0;
  auto fabric = fabric::Fabric<fabric::CPU>();
  auto state = resumed.state();
  (void)fabric.load(tmp / "sharded.consolidated", state, false);
  CHECK(resumed.step == 7);
  run.train();
  resumed.train();
  for (const auto& [a, b] : {std::pair{run.model, resumed.model}, std::pair{run.model2, resumed.model2}}) {
    const auto pa = a->named_parameters(true);
    const auto pb = b->named_parameters(true);
    for (const auto& item : pa) CHECK(torch::equal(item.value(), pb[item.key()]));
    const auto ba = a->named_buffers(true);
    const auto bb = b->named_buffers(true);
    for (const auto& item : ba) CHECK(torch::equal(item.value(), bb[item.key()]));
  }
}

TEST_CASE("consolidate_sharded nests '/'-keys, keeps the metadata's order and PyTorch's optimizer state keys",
          "[sharded][consolidate]") {
  TempDir tmp;
  auto meta = empty_meta();
  meta.insert("model", c10::impl::GenericDict(c10::StringType::get(), c10::AnyType::get()));  // keeps its place
  c10::impl::GenericList groups(c10::AnyType::get());
  c10::impl::GenericDict group(c10::StringType::get(), c10::AnyType::get());
  group.insert("lr", 0.5);
  group.insert("params", c10::List<std::int64_t>({0, 1}));
  groups.push_back(group);
  meta.insert("optimizer/state/1/step", at::scalar_tensor(3.0F));
  meta.insert("optimizer/param_groups", groups);
  meta.insert("epoch", std::int64_t{2});
  const std::vector<Full> tensors{{"optimizer/state/0/momentum_buffer", torch::ones({3})},
                                  {"model/b", torch::arange(2, torch::kFloat)},
                                  {"optimizer/state/1/momentum_buffer", torch::ones({2})}};
  save_even(tmp / "ckpt", 2, tensors, meta);
  const auto checkpoint = fabric::detail::consolidate_sharded(tmp / "ckpt");
  std::vector<std::string> keys;
  for (const auto& item : checkpoint) keys.push_back(item.key().toStringRef());
  CHECK(keys == std::vector<std::string>{"model", "optimizer", "epoch"});
  const auto optimizer = checkpoint.at("optimizer").toGenericDict();
  const auto state = optimizer.at("state").toGenericDict();
  CHECK(state.keyType()->kind() == c10::TypeKind::IntType);
  std::vector<std::int64_t> indices;
  for (const auto& item : state) indices.push_back(item.key().toInt());
  CHECK(indices == std::vector<std::int64_t>{1, 0});
  const auto one = state.at(std::int64_t{1}).toGenericDict();
  std::vector<std::string> fields;
  for (const auto& item : one) fields.push_back(item.key().toStringRef());
  CHECK(fields == std::vector<std::string>{"step", "momentum_buffer"});
  CHECK(torch::equal(checkpoint.at("model").toGenericDict().at("b").toTensor(), torch::arange(2, torch::kFloat)));
  CHECK(checkpoint.at("epoch").toInt() == 2);

  auto clash = empty_meta();
  clash.insert("model", std::int64_t{1});
  save_even(tmp / "clash", 1, {{"model/w", torch::ones({1})}}, clash);
  CHECK_THAT(load_error(tmp / "clash"), ContainsSubstring("\"model\" is an integer, not a dictionary"));
}

// Lightning: tests_fabric/utilities/test_consolidate_checkpoint.py::test_process_cli_args
TEST_CASE("consolidate_checkpoint refuses what Lightning's fabric consolidate refuses", "[sharded][consolidate]") {
  TempDir tmp;
  CHECK_THAT(error_of([&] { fabric::consolidate_checkpoint(tmp / "does/not/exist"); }),
             ContainsSubstring("checkpoint folder to consolidate does not exist"));
  std::ofstream(tmp / "checkpoint_file") << "x";
  CHECK_THAT(error_of([&] { fabric::consolidate_checkpoint(tmp / "checkpoint_file"); }),
             ContainsSubstring("must be a folder, containing the checkpoint shards"));
  fs::create_directories(tmp / "checkpoint_folder");
  CHECK_THAT(error_of([&] { fabric::consolidate_checkpoint(tmp / "checkpoint_folder"); }),
             ContainsSubstring("only sharded checkpoints saved with fabric can be consolidated"));
  save_even(tmp / "checkpoint_folder", 1, {{"model/w", torch::ones({2})}}, empty_meta());
  std::ofstream(tmp / "output_file") << "x";
  CHECK_THAT(error_of([&] { fabric::consolidate_checkpoint(tmp / "checkpoint_folder", tmp / "output_file"); }),
             ContainsSubstring("the path for the consolidated checkpoint already exists"));
  CHECK(read_bytes(tmp / "output_file") == "x");
}

// Writes the sample the fabric-consolidate CTest (tools/fabric_consolidate/consolidate_test.cmake, "consolidate.cli")
// consolidates: FABRIC_SHARDED_SAMPLE_DIR/{sharded/, full.ckpt}; that test runs the command line as Lightning's does.
// Lightning: tests_fabric/utilities/test_consolidate_checkpoint.py::test_parse_cli_args
TEST_CASE("sharded checkpoints: a sample for the fabric-consolidate test", "[.sharded_sample]") {
  const char* out = std::getenv("FABRIC_SHARDED_SAMPLE_DIR");
  REQUIRE(out != nullptr);
  fs::create_directories(out);
  torch::manual_seed(4);
  Run run;
  run.train();
  write_both(run, fs::path(out) / "full.ckpt", fs::path(out) / "sharded", 3, 9U);
}

TEST_CASE("Python's torch.load(weights_only=True) reads a consolidated checkpoint and resumes from it",
          "[sharded][consolidate][python]") {
  const char* python = "/usr/bin/python3";
  if (std::system(fmt::format("{} -c 'import torch' 2>/dev/null", python).c_str()) != 0) {
    SKIP("no torch for /usr/bin/python3 (Debian package python3-torch)");
  }
  TempDir tmp;
  torch::manual_seed(5);
  Run run;
  for (int i = 0; i < 2; ++i) run.train();
  write_both(run, tmp / "full.ckpt", tmp / "sharded", 3, 11U);
  fabric::consolidate_checkpoint(tmp / "sharded", tmp / "run.ckpt");
  run.train();  // the step Python must reproduce
  std::ofstream out(tmp / "expected.txt");
  for (const auto& [label, model] : {std::pair{"model", run.model}, std::pair{"model2", run.model2}}) {
    for (const auto& item : model->named_parameters(true)) {
      out << label << '|' << item.key();
      const at::Tensor flat = item.value().detach().reshape({-1}).to(at::kDouble);
      for (std::int64_t i = 0; i < flat.numel(); ++i) out << fmt::format("|{:a}", flat[i].item<double>());
      out << '\n';
    }
  }
  out.close();
  const std::string command = fmt::format("{} {} {} {}", python, (python_dir / "check_ckpt.py").string(),
                                          (tmp / "run.ckpt").string(), (tmp / "expected.txt").string());
  CHECK(std::system(command.c_str()) == 0);
}

}  // namespace
