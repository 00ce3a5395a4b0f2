// fabric's native checkpoint format against hostile and damaged files (issue 14): the zip container is
// validated before LibTorch reads it (every truncation, random bytes, flipped directory bits, entries
// pointing past the end, tensors larger than their bytes, malformed nested archives), checksums catch
// corruption and name the entry, temporaries of writers killed mid-save are removed, and Python's
// OrderedDict state dicts are refused with a plain message. The tests tagged [malformed] also run in a
// binary built with AddressSanitizer (fabric_checkpoint_asan).

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include "fabric_test_config.hpp"
#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <linux/capability.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using fabric_test::TempDir;

std::vector<char> bytes_of(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::vector<char>& bytes, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(size));
}
void write_bytes(const fs::path& path, const std::vector<char>& bytes) { write_bytes(path, bytes, bytes.size()); }

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fabric::Error& e) {
    return e.what();
  }
  return "no fabric::Error";
}

/// Says whether two checkpoint values are equal, tensors by value, dtype and shape.
bool same_value(const c10::IValue& a, const c10::IValue& b) {
  if (a.isTensor() || b.isTensor()) {
    if (!a.isTensor() || !b.isTensor()) return false;
    const auto& x = a.toTensor();
    const auto& y = b.toTensor();
    return x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() && torch::equal(x, y);
  }
  if (a.isGenericDict() || b.isGenericDict()) {
    if (!a.isGenericDict() || !b.isGenericDict()) return false;
    const auto x = a.toGenericDict();
    const auto y = b.toGenericDict();
    if (x.size() != y.size()) return false;
    for (const auto& item : x) {
      if (!y.contains(item.key()) || !same_value(item.value(), y.at(item.key()))) return false;
    }
    return true;
  }
  if (a.isList() || b.isList()) {
    if (!a.isList() || !b.isList()) return false;
    const auto x = a.toListRef();
    const auto y = b.toListRef();
    if (x.size() != y.size()) return false;
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (!same_value(x[i], y[i])) return false;
    }
    return true;
  }
  if (a.isDouble() && b.isDouble()) {
    const double x = a.toDouble();
    const double y = b.toDouble();
    return std::memcmp(&x, &y, sizeof x) == 0;
  }
  return a == b;
}

/// A small checkpoint of a model, an optimizer and plain values, written by fabric.save.
struct Small {
  Small() {
    torch::manual_seed(3);
    fabric.save(path, {{"model", net}, {"optimizer", sgd}, {"step", 7}, {"note", "hello"}, {"lr", 0.25}});
    bytes = bytes_of(path);
    original = io.load_checkpoint(path);
  }
  fabric::Fabric<fabric::CPU> fabric;
  fabric::NativeCheckpointIO io;
  TempDir dir;
  fs::path path = dir / "small.fabric";
  torch::nn::Linear net{torch::nn::LinearOptions(4, 3)};
  torch::optim::SGD sgd{net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9)};
  std::vector<char> bytes;
  fabric::Checkpoint original{c10::StringType::get(), c10::AnyType::get()};
};

std::uint32_t le32(const std::vector<char>& b, std::size_t at) {
  std::uint32_t v = 0;
  std::memcpy(&v, b.data() + at, 4);
  return v;
}
void put32(std::vector<char>& b, std::size_t at, std::uint32_t v) { std::memcpy(b.data() + at, &v, 4); }

/// Where the central directory of a zip file begins (from its end record, which torch writes last).
std::size_t directory_offset(const std::vector<char>& b) { return le32(b, b.size() - 22 + 16); }

}  // namespace

// ---- malformed files: fabric::Error, never a signal ---------------------------------------------------

TEST_CASE("load refuses every truncation of a checkpoint with fabric::Error", "[checkpoint][malformed]") {
  Small s;
  for (std::size_t n = 0; n < s.bytes.size(); ++n) {
    INFO("cut at " << n << " of " << s.bytes.size() << " bytes");
    REQUIRE_THROWS_AS(fabric::detail::check_torch_zip(s.bytes.data(), n, "cut"), fabric::Error);
  }
  // Through the file (every length near the end, where the directory is; every 13th elsewhere).
  const fs::path cut = s.dir / "cut.fabric";
  for (std::size_t n = 1; n<s.bytes.size(); n += n + 400> s.bytes.size() || n < 100 ? 1 : 13) {
    INFO("cut at " << n << " of " << s.bytes.size() << " bytes");
    write_bytes(cut, s.bytes, n);
    const std::string msg = error_of([&] { (void)s.io.load_checkpoint(cut); });
    REQUIRE_THAT(msg, ContainsSubstring("fabric:"));
    REQUIRE_THAT(msg, ContainsSubstring(cut.string()));
  }
  write_bytes(cut, s.bytes);
  CHECK(s.io.load_checkpoint(cut).size() == s.original.size());
}

TEST_CASE("load_raw refuses every truncation of a torch::save file with fabric::Error", "[checkpoint][malformed]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  torch::nn::Linear net(3, 2);
  const fs::path path = dir / "module.pt";
  torch::save(net, path.string());
  const auto bytes = bytes_of(path);
  const fs::path cut = dir / "cut.pt";
  for (std::size_t n = 1; n < bytes.size(); n += (n < 200 || n + 200 > bytes.size()) ? 1 : 7) {
    INFO("cut at " << n << " of " << bytes.size() << " bytes");
    write_bytes(cut, bytes, n);
    REQUIRE_THAT(error_of([&] { fabric.load_raw(cut, net); }), ContainsSubstring(cut.string()));
  }
  torch::nn::Linear other(3, 2);
  fabric.load_raw(path, other);
  CHECK(torch::equal(other->weight, net->weight));
}

TEST_CASE("load refuses random bytes and zip-like noise with fabric::Error", "[checkpoint][malformed]") {
  Small s;
  std::mt19937 rng(14);
  const fs::path noise_path = s.dir / "noise.fabric";
  std::vector<char> noise(64 * 1024);
  for (int round = 0; round < 40; ++round) {
    const std::size_t size = round == 0 ? noise.size() : 1 + rng() % noise.size();
    for (auto& c : noise) c = static_cast<char>(rng() & 0xFF);
    if (round % 4 == 1) std::memcpy(noise.data(), "PK\x03\x04", 4);
    if (round % 4 == 2 && size >= 22) std::memcpy(noise.data() + size - 22, "PK\x05\x06", 4);
    if (round % 4 == 3) {  // a real archive's head with noise after it
      std::memcpy(noise.data(), s.bytes.data(), std::min(size, s.bytes.size() / 2));
    }
    INFO("round " << round << ", " << size << " bytes");
    write_bytes(noise_path, noise, size);
    REQUIRE_THAT(error_of([&] { (void)s.io.load_checkpoint(noise_path); }), ContainsSubstring("fabric:"));
  }
}

TEST_CASE("load refuses a zip whose entries point past the end or overlap", "[checkpoint][malformed]") {
  Small s;
  const std::size_t dir = directory_offset(s.bytes);
  REQUIRE(le32(s.bytes, dir) == 0x02014b50U);
  const fs::path bad = s.dir / "bad.fabric";
  auto refused = [&](std::vector<char> b) {
    write_bytes(bad, b);
    return error_of([&] { (void)s.io.load_checkpoint(bad); });
  };
  SECTION("a local header offset past the end of the file") {
    auto b = s.bytes;
    put32(b, dir + 42, static_cast<std::uint32_t>(b.size() + 100));
    CHECK_THAT(refused(b), ContainsSubstring("no local header"));
  }
  SECTION("an entry size past the end of the file") {
    auto b = s.bytes;
    put32(b, dir + 20, 0x7FFFFFF0U);
    put32(b, dir + 24, 0x7FFFFFF0U);
    CHECK_THAT(refused(b), ContainsSubstring("past the end"));
  }
  SECTION("a directory offset past the end of the file") {
    auto b = s.bytes;
    put32(b, b.size() - 22 + 16, static_cast<std::uint32_t>(b.size() * 3));
    // torch also writes zip64 end records, whose offsets LibTorch's reader takes first.
    const std::size_t locator = b.size() - 22 - 20;
    REQUIRE(le32(b, locator) == 0x07064b50U);
    const std::size_t record = le32(b, locator + 8);
    put32(b, record + 48, static_cast<std::uint32_t>(b.size() * 3));
    CHECK_THAT(refused(b), ContainsSubstring("central directory"));
  }
  SECTION("two entries sharing their bytes") {
    auto b = s.bytes;
    const std::size_t second =
        dir + 46 + (le32(b, dir + 28) & 0xFFFFU) + (le32(b, dir + 30) & 0xFFFFU) + (le32(b, dir + 32) & 0xFFFFU);
    REQUIRE(le32(b, second) == 0x02014b50U);
    put32(b, second + 42, le32(b, dir + 42));
    CHECK_THAT(refused(b), ContainsSubstring("fabric:"));
  }
  SECTION("an entry of an unknown compression method") {
    auto b = s.bytes;
    b[dir + 10] = 12;  // bzip2
    CHECK_THAT(refused(b), ContainsSubstring("compression method 12"));
  }
}

TEST_CASE("bit flips in the central directory are refused or load the same values", "[checkpoint][malformed]") {
  Small s;
  const std::size_t dir = directory_offset(s.bytes);
  const fs::path flipped = s.dir / "flipped.fabric";
  int refused = 0;
  int same = 0;
  for (std::size_t byte = dir; byte < s.bytes.size(); ++byte) {
    for (int bit = 0; bit < 8; bit += 3) {
      auto b = s.bytes;
      b[byte] = static_cast<char>(b[byte] ^ (1 << bit));
      write_bytes(flipped, b);
      INFO("byte " << byte << " bit " << bit);
      try {
        const auto loaded = s.io.load_checkpoint(flipped);
        REQUIRE(same_value(loaded, s.original));
        ++same;
      } catch (const fabric::Error&) {
        ++refused;
      }
    }
  }
  INFO(refused << " refused, " << same << " loaded the same values");
  CHECK(refused > same);
}

TEST_CASE("200 single bit flips anywhere: each refused naming what, or the same values", "[checkpoint][malformed]") {
  Small s;
  std::mt19937 rng(200);
  const fs::path flipped = s.dir / "flipped.fabric";
  int refused = 0;
  int same = 0;
  for (int i = 0; i < 200; ++i) {
    const std::size_t byte = rng() % s.bytes.size();
    const int bit = static_cast<int>(rng() % 8);
    auto b = s.bytes;
    b[byte] = static_cast<char>(b[byte] ^ (1 << bit));
    write_bytes(flipped, b);
    INFO("flip " << i << ": byte " << byte << " bit " << bit);
    try {
      const auto loaded = s.io.load_checkpoint(flipped);
      REQUIRE(same_value(loaded, s.original));
      ++same;
    } catch (const fabric::Error& e) {
      const std::string msg = e.what();
      CHECK_THAT(msg, ContainsSubstring(flipped.string()));
      ++refused;
    }
  }
  INFO(refused << " refused, " << same << " loaded the same values");
  CHECK(refused > 150);
}

TEST_CASE("a corrupt tensor is named by its checkpoint key", "[checkpoint][malformed]") {
  Small s;
  // The weight's 12 floats lie in one zip record; flip a bit in the middle of it.
  const at::Tensor weight = s.net->weight.detach().contiguous();
  const char* first = static_cast<const char*>(weight.data_ptr());
  const auto at = std::search(s.bytes.begin(), s.bytes.end(), first, first + weight.nbytes());
  REQUIRE(at != s.bytes.end());
  auto b = s.bytes;
  b[static_cast<std::size_t>(at - s.bytes.begin()) + 17] ^= 0x10;
  const fs::path bad = s.dir / "bad.fabric";
  write_bytes(bad, b);
  const std::string msg = error_of([&] { (void)s.io.load_checkpoint(bad); });
  CHECK_THAT(msg, ContainsSubstring("the tensor \"model/weight\""));
  CHECK_THAT(msg, ContainsSubstring("corrupt"));
  torch::nn::Linear target(4, 3);
  CHECK_THAT(error_of([&] { s.fabric.load(bad, {{"model", target}}); }), ContainsSubstring("model/weight"));
}

TEST_CASE("load refuses a tensor larger than the bytes stored for it", "[checkpoint][malformed]") {
  TempDir dir;
  // A plain pickle (no fabric checksums) whose tensor of 4 floats is patched to claim 100.
  fabric::Checkpoint plain(c10::StringType::get(), c10::AnyType::get());
  plain.insert("t", torch::arange(4, torch::kFloat32));
  auto bytes = torch::pickle_save(plain);
  // Storage offset 0 and sizes (4,): LibTorch's pickler writes MARK, the sizes, TUPLE.
  const std::string pattern{"K\x00(K\x04t", 6};
  const std::string_view view(bytes.data(), bytes.size());
  const auto at = view.find(pattern);
  REQUIRE(at != std::string_view::npos);
  bytes[at + 4] = 100;
  // Make the zip CRC of data.pkl match again, as a hostile writer would.
  const auto archive = fabric::detail::check_torch_zip(bytes.data(), bytes.size(), "x");
  const auto* pickle = archive.find("data.pkl");
  const std::uint32_t crc = fabric::detail::crc32(bytes.data() + pickle->data_offset, pickle->size);
  std::size_t entry = std::string_view(bytes.data(), bytes.size()).find("PK\x01\x02");
  while (entry != std::string_view::npos &&
         std::string_view(bytes.data() + entry + 46, pickle->name.size()) != pickle->name) {
    entry = std::string_view(bytes.data(), bytes.size()).find("PK\x01\x02", entry + 4);
  }
  REQUIRE(entry != std::string_view::npos);
  std::memcpy(bytes.data() + entry + 16, &crc, 4);
  const fs::path path = dir / "big.fabric";
  write_bytes(path, bytes);
  CHECK_THAT(error_of([&] { (void)fabric::NativeCheckpointIO{}.load_checkpoint(path); }),
             ContainsSubstring("larger than the bytes stored for it"));
}

TEST_CASE("a malformed optimizer archive inside a checkpoint with valid checksums is refused",
          "[checkpoint][malformed]") {
  Small s;
  // Rewrite the checkpoint with the optimizer's archive cut in half: the file's checksums are right.
  auto root = s.original.copy();
  auto optimizer = root.at("optimizer").toGenericDict().copy();
  const at::Tensor blob = optimizer.at("archive").toTensor();
  optimizer.insert_or_assign("archive", blob.slice(0, 0, blob.numel() / 2).clone());
  root.insert_or_assign("optimizer", optimizer);
  const fs::path bad = s.dir / "bad_optimizer.fabric";
  s.io.save_checkpoint(root, bad);
  torch::nn::Linear net(4, 3);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  const std::string msg = error_of([&] { s.fabric.load(bad, {{"model", net}, {"optimizer", sgd}}); });
  CHECK_THAT(msg, ContainsSubstring("optimizer state in the checkpoint"));
}

// ---- checksums ------------------------------------------------------------------------------------

TEST_CASE("save stores checksums that load verifies and removes", "[checkpoint]") {
  Small s;
  CHECK_FALSE(s.original.contains("__fabric_checksums__"));
  const auto raw = torch::pickle_load(s.bytes).toGenericDict();
  REQUIRE(raw.contains("__fabric_checksums__"));
  const auto sums = raw.at("__fabric_checksums__").toGenericDict();
  CHECK(sums.at("algorithm").toStringRef() == "crc32c");
  CHECK(sums.at("tensors").toIntVector().size() == 3);  // weight, bias, the optimizer's archive
  fabric::Checkpoint reserved(c10::StringType::get(), c10::AnyType::get());
  reserved.insert("__fabric_checksums__", 1);
  CHECK_THAT(error_of([&] { s.io.save_checkpoint(reserved, s.dir / "r.fabric"); }), ContainsSubstring("reserves"));
  // A changed value with a stale checksum (a writer that rewrote the pickle but not the sums).
  auto changed = raw.copy();
  changed.insert_or_assign("step", 8);
  const auto bytes = torch::pickle_save(changed);
  const fs::path path = s.dir / "changed.fabric";
  write_bytes(path, std::vector<char>(bytes.begin(), bytes.end()));
  CHECK_THAT(error_of([&] { (void)s.io.load_checkpoint(path); }), ContainsSubstring("metadata"));
}

TEST_CASE("files without fabric's checksums are checked by their zip CRC-32", "[checkpoint][malformed]") {
  TempDir dir;
  fabric::Checkpoint plain(c10::StringType::get(), c10::AnyType::get());
  plain.insert("t", torch::arange(64, torch::kFloat32));
  auto bytes = torch::pickle_save(plain);
  const auto archive = fabric::detail::check_torch_zip(bytes.data(), bytes.size(), "x");
  const fs::path path = dir / "plain.fabric";
  write_bytes(path, std::vector<char>(bytes.begin(), bytes.end()));
  CHECK(torch::equal(fabric::NativeCheckpointIO{}.load_checkpoint(path).at("t").toTensor(), torch::arange(64.0)));
  for (const auto& entry : archive.entries) {
    if (entry.size == 0) continue;
    auto b = bytes;
    b[entry.data_offset + entry.size / 2] ^= 0x01;
    write_bytes(path, std::vector<char>(b.begin(), b.end()));
    INFO(entry.name);
    CHECK_THAT(error_of([&] { (void)fabric::NativeCheckpointIO{}.load_checkpoint(path); }),
               ContainsSubstring(entry.name));
  }
}

// ---- files of Python's torch.save ---------------------------------------------------------------------

TEST_CASE("Python's OrderedDict state dicts are refused saying what the file is and what to do", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  const fs::path fixtures = fs::path(FABRIC_TEST_SOURCE_DIR) / "unit" / "io" / "fixtures";
  const fs::path ordered = fixtures / "ordered_dict_state.pt";
  // NOTE: the default format reads these files through fabric's restricted unpickler (torch_pickle_test.cpp);
  // the native format alone refuses them plainly.
  const std::string msg = error_of([&] { (void)fabric::NativeCheckpointIO{}.load_checkpoint(ordered); });
  CHECK_THAT(msg, ContainsSubstring("collections.OrderedDict"));
  CHECK_THAT(msg, ContainsSubstring("Python's torch.save"));
  CHECK_THAT(msg, ContainsSubstring("dict(model.state_dict())"));
  CHECK_THAT(msg, !ContainsSubstring("INTERNAL ASSERT"));
  // The same tensors saved as a plain dict load (checked by their zip CRC-32).
  const auto plain = fabric.load(fixtures / "plain_dict_state.pt");
  CHECK(plain.at("step").get<std::int64_t>() == 5);
  torch::nn::Linear linear(3, 2);
  fabric.load(fixtures / "plain_dict_state.pt", {{"model", linear}}, false);
  CHECK(linear->weight.sizes() == torch::IntArrayRef({2, 3}));
}

// ---- temporaries of writers killed mid-save -------------------------------------------------------

namespace {

std::vector<fs::path> temporaries(const fs::path& dir, const std::string& leaf) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().starts_with(leaf + ".tmp-")) out.push_back(e.path());
  }
  return out;
}

/// Returns the pid of a process that has exited (and been reaped).
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return pid;
}

}  // namespace

TEST_CASE("save and load remove the temporaries of dead writers, not those of live ones", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "t.fabric";
  auto stale = [&](pid_t pid, int n) {
    const fs::path tmp = dir / fmt::format("t.fabric.tmp-{}-{}", pid, n);
    std::ofstream(tmp) << "half a checkpoint";
    return tmp;
  };
  const fs::path other = dir / "u.fabric.tmp-1-0";  // another file's temporary stays
  std::ofstream(other) << "x";
  const fs::path dead = stale(dead_pid(), 0);
  fabric.save(path, {{"step", 1}});
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(other));
  const fs::path dead_again = stale(dead_pid(), 3);
  CHECK(fabric.load(path).at("step").get<std::int64_t>() == 1);
  CHECK_FALSE(fs::exists(dead_again));

  // A live writer: a process holding the lock on its temporary.
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t writer = ::fork();
  if (writer == 0) {
    const fs::path tmp = dir / fmt::format("t.fabric.tmp-{}-0", ::getpid());
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT, 0644);
    ::flock(fd, LOCK_EX);
    (void)::write(ready[1], "1", 1);
    ::pause();
    ::_exit(0);
  }
  char c = 0;
  REQUIRE(::read(ready[0], &c, 1) == 1);
  const fs::path live = dir / fmt::format("t.fabric.tmp-{}-0", writer);
  fabric.save(path, {{"step", 2}});
  CHECK(fs::exists(live));
  ::kill(writer, SIGKILL);
  int status = 0;
  ::waitpid(writer, &status, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  CHECK(fabric.load(path).at("step").get<std::int64_t>() == 2);
  CHECK_FALSE(fs::exists(live));
}

TEST_CASE("writers killed with SIGKILL at random moments: the previous checkpoint loads, no temporary stays",
          "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path path = dir / "killed.fabric";
  // Built before fork: the child only pickles and writes.
  const torch::Tensor big = torch::full({4'000'000}, 0.5F);  // 16 MB
  fabric.save(path, {{"generation", 0}, {"blob", torch::zeros({8})}});
  std::mt19937 rng(50);
  int interrupted = 0;
  for (int kill = 0; kill < 50; ++kill) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      try {
        for (int i = 1;; ++i) fabric.save(path, {{"generation", i}, {"blob", big}});
      } catch (...) {
        ::_exit(3);
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 150'000));
    ::kill(pid, SIGKILL);
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFSIGNALED(status));
    if (!temporaries(dir.path(), "killed.fabric").empty()) ++interrupted;
    INFO("kill " << kill);
    const auto loaded = fabric.load(path);  // the previous checkpoint, whole
    const auto blob = loaded.at("blob").get<torch::Tensor>();
    if (loaded.at("generation").get<std::int64_t>() == 0) {
      CHECK(blob.numel() == 8);
    } else {
      CHECK(torch::equal(blob, big));
    }
    CHECK(temporaries(dir.path(), "killed.fabric").empty());  // the load removed the dead writer's file
  }
  INFO(interrupted << " of 50 kills left a temporary file behind");
  CHECK(interrupted > 0);
  fabric.save(path, {{"generation", -1}});
  CHECK(temporaries(dir.path(), "killed.fabric").empty());
  CHECK(fabric.load(path).at("generation").get<std::int64_t>() == -1);
}

TEST_CASE("a failed save says whether a previous checkpoint is untouched", "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const torch::Tensor big = torch::zeros({100'000});
  // NOTE: a file size limit makes the write fail even for root (who ignores permissions).
  struct rlimit old_limit {};
  ::getrlimit(RLIMIT_FSIZE, &old_limit);
  auto* old_handler = ::signal(SIGXFSZ, SIG_IGN);
  auto failing_save = [&](const fs::path& path) {
    struct rlimit limit = old_limit;
    limit.rlim_cur = 4096;
    ::setrlimit(RLIMIT_FSIZE, &limit);
    const std::string msg = error_of([&] { fabric.save(path, {{"blob", big}}); });
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    return msg;
  };
  const fs::path fresh = dir / "new" / "folder" / "c.fabric";
  const std::string first = failing_save(fresh);
  CHECK_THAT(first, ContainsSubstring("no checkpoint was written at " + fresh.string()));
  CHECK_THAT(first, !ContainsSubstring("untouched"));
  CHECK_FALSE(fs::exists(fresh));
  fabric.save(fresh, {{"step", 1}});
  const std::string second = failing_save(fresh);
  CHECK_THAT(second, ContainsSubstring("the previous checkpoint at " + fresh.string() + " is untouched"));
  ::signal(SIGXFSZ, old_handler);
  CHECK(fabric.load(fresh).at("step").get<std::int64_t>() == 1);
  CHECK(temporaries(fresh.parent_path(), "c.fabric").empty());
}

namespace {

/// Drops the capabilities that let root write where permissions forbid (CAP_DAC_OVERRIDE,
/// CAP_DAC_READ_SEARCH, CAP_FOWNER) from this thread's effective set and raises them again at the end
/// (they stay permitted); nothing changes for a user who lacks them.
class WithoutPermissionOverride {
 public:
  WithoutPermissionOverride() {
    if (::syscall(SYS_capget, &header_, saved_) != 0) return;
    __user_cap_data_struct dropped[2] = {saved_[0], saved_[1]};
    dropped[0].effective &= ~((1U << CAP_DAC_OVERRIDE) | (1U << CAP_DAC_READ_SEARCH) | (1U << CAP_FOWNER));
    active_ = ::syscall(SYS_capset, &header_, dropped) == 0;
  }
  ~WithoutPermissionOverride() {
    if (active_) ::syscall(SYS_capset, &header_, saved_);
  }
  WithoutPermissionOverride(const WithoutPermissionOverride&) = delete;
  WithoutPermissionOverride& operator=(const WithoutPermissionOverride&) = delete;

 private:
  __user_cap_header_struct header_{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct saved_[2]{};
  bool active_ = false;
};

}  // namespace

TEST_CASE("saving into a directory without write permission says so; the previous checkpoint is untouched",
          "[checkpoint]") {
  fabric::Fabric<fabric::CPU> fabric;
  TempDir dir;
  const fs::path folder = dir / "read-only";
  const fs::path path = folder / "c.fabric";
  fabric.save(path, {{"step", 1}});
  fs::permissions(folder, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                              fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  std::string existing;
  std::string fresh;
  bool writable = false;
  {
    // NOTE: root ignores permissions; without its override capabilities the mode binds root too.
    WithoutPermissionOverride guard;
    const fs::path probe = folder / "probe";
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0644);
    writable = fd >= 0;
    if (fd >= 0) {
      ::close(fd);
      ::unlink(probe.c_str());
    }
    existing = error_of([&] { fabric.save(path, {{"step", 2}}); });
    fresh = error_of([&] { fabric.save(folder / "sub" / "d.fabric", {{"step", 2}}); });
  }
  fs::permissions(folder, fs::perms::owner_all);
  REQUIRE_FALSE(writable);  // the directory was read-only for this process, root or not
  CHECK_THAT(existing, ContainsSubstring("Permission denied"));
  CHECK_THAT(existing, ContainsSubstring("check that the directory is writable"));
  CHECK_THAT(existing, ContainsSubstring("the previous checkpoint at " + path.string() + " is untouched"));
  CHECK_THAT(fresh, ContainsSubstring("could not create the directory " + (folder / "sub").string()));
  CHECK_THAT(fresh, ContainsSubstring("ermission denied"));
  CHECK(fabric.load(path).at("step").get<std::int64_t>() == 1);
  CHECK(temporaries(folder, "c.fabric").empty());
  CHECK_FALSE(fs::exists(folder / "sub"));
}

TEST_CASE("zip64 archives (as torch writes files over 4 GB) pass the validator and load", "[checkpoint]") {
  const fs::path fixtures = fs::path(FABRIC_TEST_SOURCE_DIR) / "unit" / "io" / "fixtures";
  fabric::NativeCheckpointIO io;
  const auto plain = io.load_checkpoint(fixtures / "plain_dict_state.pt");
  const auto zip64 = io.load_checkpoint(fixtures / "zip64_plain_dict_state.pt");
  CHECK(same_value(plain, zip64));
  const auto bytes = bytes_of(fixtures / "zip64_plain_dict_state.pt");
  CHECK(fabric::detail::check_torch_zip(bytes.data(), bytes.size(), "zip64").entries.size() >= 3);
}
