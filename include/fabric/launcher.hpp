#pragma once
// Starting and watching the local processes of a job: the re-executing launcher of `Fabric::launch` and the
// process handling shared with `fabric-run`. Torch-free (fmt, std, POSIX; Linux).

#include "fabric/config.hpp"
#include "fabric/environment.hpp"
#include "fabric/error.hpp"

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
#include <exception>
#include <fstream>
#include <iterator>
#include <mutex>
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
  /// A signal number stored in `forward` is sent to the processes; a true `stop_requested` stops them and returns 0.
  int wait(std::atomic<int>* forward = nullptr, const std::atomic<bool>* stop_requested = nullptr) {
    while (true) {
      if (forward != nullptr) {
        if (int sig = forward->exchange(0); sig != 0) signal_all(sig);
      }
      if (stop_requested != nullptr && stop_requested->load()) {
        stop();
        return 0;
      }
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

/// The processes this process launched, shared by every launcher and the exit handler (one launch per process).
struct LaunchState {
  /// Guards the fields below.
  std::mutex mutex;
  /// Whether this process has launched its local ranks.
  bool launched = false;
  /// The environment after the launch (port chosen).
  ClusterEnvironment environment;
  /// The started local ranks 1..devices-1.
  ProcessSet processes{"fabric"};
  /// Waits on the processes; ends this process with a failed child's code.
  std::thread watcher;
  /// Asks the watcher to stop the processes instead of waiting for them.
  std::atomic<bool> stop_requested{false};

  /// Blocks until the watcher has finished (every child exited, or they were stopped).
  void join() {
    std::lock_guard lock(mutex);
    if (watcher.joinable() && watcher.get_id() != std::this_thread::get_id()) watcher.join();
  }
};

/// Returns the process-wide launch state (never destroyed, so the exit handler can use it).
inline LaunchState& launch_state() {
  static LaunchState* state = new LaunchState();
  return *state;
}

/// Starts local ranks 1..devices-1 by re-executing this program, like Lightning's subprocess script launcher.
///
/// ```
/// auto env = fabric::detail::detect_environment(options.devices, options.num_nodes);
/// fabric::detail::SubprocessLauncher launcher;
/// launcher.launch(env, options.devices, options.num_nodes);  // env.main_port is now set
/// ```
class SubprocessLauncher {
 public:
  /// Creates a launcher that has started nothing yet.
  SubprocessLauncher() = default;
  SubprocessLauncher(const SubprocessLauncher&) = delete;
  SubprocessLauncher& operator=(const SubprocessLauncher&) = delete;

  /// Waits for the started processes (or stops them when an exception is unwinding the stack).
  ~SubprocessLauncher() {
    if (!owner_) return;
    if (std::uncaught_exceptions() > uncaught_) launch_state().stop_requested = true;
    launch_state().join();
  }

  /// Starts the other local ranks unless the environment's launcher did; sets MASTER_ADDR/PORT, NODE_RANK,
  /// WORLD_SIZE, RANK and LOCAL_RANK=0 here and fills in `env.main_port`. Call it from the main thread.
  void launch(ClusterEnvironment& env, int devices, int num_nodes) {
    if (env.creates_processes_externally) return;
    auto& state = launch_state();
    std::lock_guard lock(state.mutex);
    if (state.launched) {
      env = state.environment;
      return;
    }
    if (env.world_size != devices * num_nodes || env.local_rank != 0) {
      raise(
          "expected the launching process to be local rank 0 of a world of devices * num_nodes = {}, found local "
          "rank {} of {}; pass the environment from detect_environment({}, {})",
          devices * num_nodes, env.local_rank, env.world_size, devices, num_nodes);
    }
    if (env.main_port == 0) env.main_port = find_free_port();
    const std::string port = std::to_string(env.main_port);
    const std::string world = std::to_string(env.world_size);
    const std::string node = std::to_string(env.node_rank);
    const std::string nvls = nccl_nvls_value();
    ::setenv("MASTER_ADDR", env.main_address.c_str(), 1);
    ::setenv("MASTER_PORT", port.c_str(), 1);
    ::setenv("NODE_RANK", node.c_str(), 1);
    ::setenv("WORLD_SIZE", world.c_str(), 1);
    ::setenv("RANK", std::to_string(env.node_rank * devices).c_str(), 1);
    ::setenv("LOCAL_RANK", "0", 1);
    ::setenv("NCCL_NVLS_ENABLE", nvls.c_str(), 1);

    if (devices > 1) {
      const auto argv = own_command_line();
      for (int local = 1; local < devices; ++local) {
        auto envp = environment_with({{"LOCAL_RANK", std::to_string(local)},
                                      {"RANK", std::to_string(env.node_rank * devices + local)},
                                      {"WORLD_SIZE", world},
                                      {"NODE_RANK", node},
                                      {"MASTER_ADDR", env.main_address},
                                      {"MASTER_PORT", port},
                                      {"FABRIC_LAUNCHED", "1"},
                                      {"NCCL_NVLS_ENABLE", nvls}});
        pid_t pid = -1;
        try {
          pid = spawn_process("/proc/self/exe", argv, envp);
        } catch (...) {
          state.processes.stop();
          throw;
        }
        state.processes.add(local, pid);
      }
      state.watcher = std::thread([&state] {
        int code = state.processes.wait(nullptr, &state.stop_requested);
        if (code != 0) {
          std::fflush(nullptr);
          ::_exit(code);
        }
      });
      static const bool registered = std::atexit([] { launch_state().join(); }) == 0;
      (void)registered;
    }
    state.launched = true;
    state.environment = env;
    owner_ = true;
    uncaught_ = std::uncaught_exceptions();
  }

  /// Returns the pids of the local ranks this process started (empty where it started none).
  std::vector<pid_t> child_pids() const {
    std::vector<pid_t> pids;
    for (const auto& child : launch_state().processes.children()) pids.push_back(child.pid);
    return pids;
  }

  /// Blocks until every started process has exited; a failed one has already ended this process with its code.
  void wait_for_children() { launch_state().join(); }

 private:
  bool owner_ = false;
  int uncaught_ = 0;
};

}  // namespace fabric::detail
