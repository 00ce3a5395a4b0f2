#pragma once
// Files written atomically and read whole: what the checkpoint formats build on. Torch-free (fmt, std,
// POSIX file calls).

#include "fabric/core/error.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <system_error>
#include <vector>

namespace fabric::detail {

/// Writes bytes to path atomically: a temporary file beside it is written, flushed to disk and
/// renamed over the target, so a crash leaves either the old file or the new one, never a mix.
inline void write_atomically(const std::filesystem::path& path, const char* data, std::size_t size) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    raise("expected a file path for the checkpoint, found the directory {}; add a file name", path.string());
  }
  const auto parent = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::filesystem::create_directories(parent, ec);
  if (ec) raise("could not create the directory {} for the checkpoint: {}", parent.string(), ec.message());
  static std::atomic<unsigned> counter{0};
  const auto tmp = std::filesystem::path(
      fmt::format("{}.tmp-{}-{}", path.string(), static_cast<long>(::getpid()), counter.fetch_add(1)));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    raise("could not create {}: {}; check that the directory is writable", tmp.string(), std::strerror(errno));
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    raise("could not {} {}: {}; the previous checkpoint at {} is untouched", what, tmp.string(), std::strerror(err),
          path.string());
  };
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("write");
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) fail("flush");
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    raise("could not close {}: {}", tmp.string(), std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    raise("could not move {} to {}: {}", tmp.string(), path.string(), std::strerror(err));
  }
  const int dir = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

/// Reads a whole checkpoint file; raises when it is missing, not a regular file or empty.
inline std::vector<char> read_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    raise("expected a checkpoint file at {}, found {}; check the path", path.string(),
          std::filesystem::exists(path, ec) ? "something that is not a regular file" : "nothing");
  }
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.eof() && in.fail()) raise("could not read {}", path.string());
  if (bytes.empty()) {
    raise(
        "expected a checkpoint at {}, found an empty file; it was not written by fabric's save (which never "
        "leaves an empty file)",
        path.string());
  }
  return bytes;
}

}  // namespace fabric::detail
