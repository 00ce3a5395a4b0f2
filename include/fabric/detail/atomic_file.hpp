#pragma once
// Files written atomically and read whole: what the checkpoint formats build on. Torch-free (fmt, std,
// POSIX file calls). A writer's temporary file is named `<file>.tmp-<pid>-<n>` and locked (flock) while it
// is written, so the next save or load of the file can tell the temporaries of dead writers (killed
// mid-write: the lock is gone and so is the process) and remove them.

#include "fabric/core/error.hpp"

#include <fmt/format.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fabric::detail {

/// Says whether name is that of a temporary of write_atomically for the file `file`, and gives its writer's pid.
inline bool parse_temporary_name(std::string_view name, std::string_view file, long& pid) {
  if (!name.starts_with(file) || !name.substr(file.size()).starts_with(".tmp-")) return false;
  const auto rest = name.substr(file.size() + 5);
  const auto dash = rest.find('-');
  if (dash == std::string_view::npos || dash == 0 || dash > 9 || dash + 1 == rest.size()) return false;
  auto digits = [](std::string_view v) { return v.find_first_not_of("0123456789") == std::string_view::npos; };
  if (!digits(rest.substr(0, dash)) || !digits(rest.substr(dash + 1)) || rest.size() - dash - 1 > 10) return false;
  pid = std::stol(std::string(rest.substr(0, dash)));
  return true;
}

/// Removes the temporaries that dead writers of path left beside it (a save killed mid-write): those whose
/// lock nobody holds and whose writer process is gone. Those of live writers stay; errors are ignored (a
/// read-only directory keeps its files). Returns how many were removed.
inline int remove_stale_temporaries(const std::filesystem::path& path) {
  // NOTE: POSIX calls rather than std::filesystem: a program linked through LibTorch's CMake targets can
  // bind std::filesystem to the copies libtorch.so exports (see issue 14).
  const std::string file = path.filename().string();
  const std::string parent = path.has_parent_path() ? path.parent_path().string() : std::string(".");
  if (file.empty()) return 0;
  DIR* dir = ::opendir(parent.c_str());
  if (dir == nullptr) return 0;
  int removed = 0;
  while (const dirent* entry = ::readdir(dir)) {
    long pid = 0;
    if (!parse_temporary_name(entry->d_name, file, pid)) continue;
    const std::string tmp = parent + "/" + entry->d_name;
    const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) continue;
    struct stat opened {};
    struct stat named {};
    // A live writer holds the lock; a writer between its open and its lock is alive (its pid exists).
    const bool dead = ::fstat(fd, &opened) == 0 && S_ISREG(opened.st_mode) && ::flock(fd, LOCK_EX | LOCK_NB) == 0 &&
                      pid != static_cast<long>(::getpid()) && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
    if (dead && ::lstat(tmp.c_str(), &named) == 0 && named.st_ino == opened.st_ino && named.st_dev == opened.st_dev &&
        ::unlink(tmp.c_str()) == 0) {
      ++removed;
    }
    ::close(fd);
  }
  ::closedir(dir);
  return removed;
}

/// A run of bytes of a file that write_atomically writes in pieces.
struct FilePiece {
  const char* data = nullptr;
  std::size_t size = 0;
};

/// Writes the pieces one after another to path atomically (see the overload for one buffer): a file made of
/// large parts (a header and tensors) is written without first being copied into one buffer.
inline void write_atomically(const std::filesystem::path& path, const std::vector<FilePiece>& pieces) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    raise("expected a file path for the checkpoint, found the directory {}; add a file name", path.string());
  }
  const auto parent = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  std::filesystem::create_directories(parent, ec);
  if (ec) raise("could not create the directory {} for the checkpoint: {}", parent.string(), ec.message());
  (void)remove_stale_temporaries(path);
  struct stat before {};
  const bool had_previous = ::stat(path.c_str(), &before) == 0;
  const std::string previous = had_previous ? fmt::format("the previous checkpoint at {} is untouched", path.string())
                                            : fmt::format("no checkpoint was written at {}", path.string());
  static std::atomic<unsigned> counter{0};
  std::filesystem::path tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = fmt::format("{}.tmp-{}-{}", path.string(), static_cast<long>(::getpid()), counter.fetch_add(1));
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    raise("could not create {}: {}; check that the directory is writable ({})", tmp.string(), std::strerror(errno),
          previous);
  }
  auto fail = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    raise("could not {} {}: {}; {}", what, tmp.string(), std::strerror(err), previous);
  };
  if (::flock(fd, LOCK_EX) != 0) fail("lock");
  for (const auto& [data, size] : pieces) {
    std::size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd, data + done, size - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        fail("write");
      }
      done += static_cast<std::size_t>(n);
    }
  }
  if (::fsync(fd) != 0) fail("flush");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("move into place");
  ::close(fd);
  const int dir = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

/// Writes bytes to path atomically: a temporary file beside it is written (locked, under a name that
/// carries the writer's pid), flushed to disk and renamed over the target, so a crash leaves either the old
/// file or the new one, never a mix; temporaries left by dead writers are removed first.
inline void write_atomically(const std::filesystem::path& path, const char* data, std::size_t size) {
  write_atomically(path, std::vector<FilePiece>{{data, size}});
}

/// Reads a whole checkpoint file; raises when it is missing, not a regular file or empty. Temporaries that
/// dead writers left beside it are removed.
inline std::vector<char> read_file(const std::filesystem::path& path) {
  (void)remove_stale_temporaries(path);
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
