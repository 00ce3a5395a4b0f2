#pragma once
// Starting and watching the processes of one node: what the re-executing launcher of `Fabric::launch`
// and `fabric-run` share. Torch-free (fmt, std, POSIX; Linux).

#include "fabric/core/config.hpp"
#include "fabric/core/error.hpp"

#include <fmt/format.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

extern char** environ;

namespace fabric::detail {

/// Converts a wait status into the exit code a shell reports: the code, or 128 + the signal.
inline int shell_exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

/// Describes how a process ended: "exited with code 3" or "was killed by signal 9 (Killed)".
inline std::string describe_exit(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  return fmt::format("ended with wait status {}", status);
}

/// Returns this process's environment as NAME=value strings, with `overrides` replacing or adding variables.
inline std::vector<std::string> environment_with(const std::vector<std::pair<std::string, std::string>>& overrides) {
  std::vector<std::string> result;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    std::string_view text(*entry);
    auto name = text.substr(0, text.find('='));
    bool replaced = false;
    for (const auto& [key, value] : overrides) replaced = replaced || key == name;
    if (!replaced) result.emplace_back(text);
  }
  for (const auto& [key, value] : overrides) result.push_back(key + "=" + value);
  return result;
}

/// Returns the value NCCL_NVLS_ENABLE should have in started processes: the parent's, else 0 (no NVLink multicast).
inline std::string nccl_nvls_value() {
  const char* value = std::getenv("NCCL_NVLS_ENABLE");
  return value != nullptr ? value : "0";
}

/// Finds `program` on PATH unless it contains a slash; returns it unchanged when no executable file is found.
inline std::string find_program(std::string_view program) {
  if (program.find('/') != std::string_view::npos) return std::string(program);
  const char* path = std::getenv("PATH");
  std::string_view dirs = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    auto colon = dirs.find(':');
    auto dir = dirs.substr(0, colon);
    auto candidate = fmt::format("{}/{}", dir.empty() ? "." : dir, program);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  return std::string(program);
}

/// Reads this process's original command line (argv) from /proc/self/cmdline.
inline std::vector<std::string> own_command_line() {
  std::ifstream file("/proc/self/cmdline", std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (text.empty())
    raise(
        "expected to read this process's command line from /proc/self/cmdline, found nothing; "
        "fabric.launch() re-executes the program and needs Linux's /proc");
  std::vector<std::string> argv;
  std::size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\0', start);
    if (end == std::string::npos) end = text.size();
    argv.emplace_back(text.substr(start, end - start));
    start = end + 1;
  }
  return argv;
}

/// Starts `path` with `argv` and `envp` (fork + execve); the child gets SIGKILL when the calling thread ends.
inline pid_t spawn_process(const std::string& path, const std::vector<std::string>& argv,
                           const std::vector<std::string>& envp) {
  // NOTE: between fork and exec in a multithreaded process only async-signal-safe calls are allowed, so every
  // string and pointer array is prepared here, before forking.
  std::vector<char*> argv_ptrs;
  for (const auto& arg : argv) argv_ptrs.push_back(const_cast<char*>(arg.c_str()));
  argv_ptrs.push_back(nullptr);
  std::vector<char*> envp_ptrs;
  for (const auto& var : envp) envp_ptrs.push_back(const_cast<char*>(var.c_str()));
  envp_ptrs.push_back(nullptr);
  const std::string failure = fmt::format("fabric: could not execute {}\n", path);
  const pid_t parent = ::getpid();
  sigset_t empty;
  sigemptyset(&empty);

  const pid_t pid = ::fork();
  if (pid < 0) raise("expected to start a process for {}, found fork error: {}", path, std::strerror(errno));
  if (pid == 0) {
    // NOTE: PR_SET_PDEATHSIG fires when the forking *thread* ends; the parent may already be gone before the call.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::kill(::getpid(), SIGKILL);
    ::sigprocmask(SIG_SETMASK, &empty, nullptr);
#ifdef SYS_close_range
    ::syscall(SYS_close_range, 3u, ~0u, 0u);
#endif
    ::execve(path.c_str(), argv_ptrs.data(), envp_ptrs.data());
    [[maybe_unused]] auto written = ::write(STDERR_FILENO, failure.data(), failure.size());
    ::_exit(127);
  }
  return pid;
}

/// One started process: its local rank, its pid, and whether it has been waited for.
struct ChildProcess {
  /// The local rank the process runs as.
  int local_rank = 0;
  /// Its process id.
  pid_t pid = -1;
  /// Whether it has exited and been reaped.
  bool done = false;
};

/// Watches the started processes of one node: waits for them all, or stops them all at the first failure.
class ProcessSet {
 public:
  /// Creates an empty set whose messages start with `who` ("fabric", "fabric-run").
  explicit ProcessSet(std::string who = "fabric") : who_(std::move(who)) {}

  /// Adds a started process.
  void add(int local_rank, pid_t pid) { children_.push_back({local_rank, pid, false}); }

  /// Returns the processes added so far.
  const std::vector<ChildProcess>& children() const { return children_; }

  /// Sends `signal` to every process not yet reaped.
  void signal_all(int signal) {
    for (const auto& child : children_) {
      if (!child.done) ::kill(child.pid, signal);
    }
  }

  /// Sends SIGTERM to the running processes, SIGKILL to those alive after `grace`, and reaps them all.
  void stop(std::chrono::milliseconds grace = std::chrono::seconds(2)) {
    signal_all(SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + grace;
    while (reap_finished() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(poll_interval);
    }
    signal_all(SIGKILL);
    for (auto& child : children_) {
      if (child.done) continue;
      int status = 0;
      while (::waitpid(child.pid, &status, 0) < 0 && errno == EINTR) {
      }
      child.done = true;
    }
  }

  /// Waits for every process; returns 0 when all exit with 0, else stops the others and returns the failure's code.
  /// A signal number stored in `forward` is sent to the processes; a true `stop_requested` stops them and returns 0
  /// (a process that had already failed is still reported first, with its code).
  int wait(std::atomic<int>* forward = nullptr, const std::atomic<bool>* stop_requested = nullptr) {
    while (true) {
      if (forward != nullptr) {
        if (int sig = forward->exchange(0); sig != 0) signal_all(sig);
      }
      // NOTE: read the request before reaping, so that a failure that happened before it is reported.
      const bool stopping = stop_requested != nullptr && stop_requested->load();
      bool running = false;
      for (auto& child : children_) {
        if (child.done) continue;
        int status = 0;
        pid_t got = ::waitpid(child.pid, &status, WNOHANG);
        if (got == 0 || (got < 0 && errno == EINTR)) {
          running = true;
          continue;
        }
        child.done = true;
        if (got < 0 || (WIFEXITED(status) && WEXITSTATUS(status) == 0)) continue;
        std::fprintf(stderr, "%s: local rank %d (pid %d) %s; stopping the other processes\n", who_.c_str(),
                     child.local_rank, static_cast<int>(child.pid), describe_exit(status).c_str());
        std::fflush(stderr);
        stop();
        return shell_exit_code(status);
      }
      if (!running) return 0;
      if (stopping) {
        stop();
        return 0;
      }
      std::this_thread::sleep_for(poll_interval);
    }
  }

  /// How often `wait` and `stop` look at the processes.
  static constexpr std::chrono::milliseconds poll_interval{20};

 private:
  /// Reaps the processes that have exited; returns how many are still running.
  int reap_finished() {
    int running = 0;
    for (auto& child : children_) {
      if (child.done) continue;
      int status = 0;
      pid_t got = ::waitpid(child.pid, &status, WNOHANG);
      if (got == 0 || (got < 0 && errno == EINTR)) {
        ++running;
      } else {
        child.done = true;
      }
    }
    return running;
  }

  std::string who_;
  std::vector<ChildProcess> children_;
};

}  // namespace fabric::detail
