#pragma once
// fabric.launch()'s launcher: the process that calls it becomes local rank 0 and re-executes the program
// for the other local ranks of its node, as Lightning's subprocess script launcher does. Torch-free
// (fmt, std, POSIX; Linux).

#include "fabric/core/config.hpp"
#include "fabric/core/error.hpp"
#include "fabric/strategies/environments/environment.hpp"
#include "fabric/strategies/launchers/process_set.hpp"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace fabric::detail {

/// Binds port 0 on 127.0.0.1 and returns the port the system chose (free at the time of the call).
inline int find_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    raise("expected to open a socket to find a free port, found error {}; set MASTER_PORT", std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = 0;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    int error = errno;
    ::close(fd);
    raise("expected to bind a free port on 127.0.0.1, found error {}; set MASTER_PORT", std::strerror(error));
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

/// The processes this process launched, shared by every launcher and the exit handler (one launch per process).
struct LaunchState {
  /// Guards the fields below.
  std::mutex mutex;
  /// Whether this process has launched its local ranks.
  bool launched = false;
  /// The environment after the launch (port chosen).
  Topology environment;
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
  void launch(Topology& env, int devices, int num_nodes) {
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

  /// Stops the started processes (SIGTERM, then SIGKILL after 2 s) and returns once they are gone: what
  /// teardown does after a failed collective, so that a hung peer cannot keep this process waiting.
  void stop_children() {
    if (!owner_) return;
    launch_state().stop_requested = true;
    launch_state().join();
  }

 private:
  bool owner_ = false;
  int uncaught_ = 0;
};

}  // namespace fabric::detail
