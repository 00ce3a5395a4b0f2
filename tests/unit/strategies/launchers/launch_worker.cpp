// A program for the launch tests: detects its environment, launches its local ranks with SubprocessLauncher and
// then behaves as the mode says.
//
// usage: launch_worker MODE DIR DEVICES
//   normal      every rank writes DIR/rank<R>.txt and exits 0
//   fail        rank 1 exits with 3, the others wait 30 s (as if blocked in a collective)
//   kill        rank 1 kills itself with SIGKILL, the others wait 30 s
//   late-fail   rank 0 returns at once, rank 1 exits with 4 after 0.5 s (the parent is already exiting)
//   slow-child  rank 0 returns at once, rank 1 writes DIR/late.txt after 0.5 s and exits 0
//   parent-dies rank 0 kills itself with SIGKILL once the others wrote their files; the others wait 30 s
//   sleep       every rank waits 30 s (to be stopped from outside)
//   throw       rank 0 throws through the launcher's scope, the others wait 30 s

#include <fabric/core/error.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/launchers/subprocess.hpp>

#include <fmt/format.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>

namespace {

/// Writes `text` to `path` atomically (write, then rename).
void write_file(const std::filesystem::path& path, const std::string& text) {
  auto tmp = path;
  tmp += ".tmp";
  std::ofstream(tmp) << text;
  std::filesystem::rename(tmp, path);
}

/// Waits until `dir` holds `count` rank files (at most 10 s).
void wait_for_files(const std::filesystem::path& dir, int count) {
  for (int i = 0; i < 500; ++i) {
    int found = 0;
    for (int r = 0; r < count; ++r) found += std::filesystem::exists(dir / fmt::format("rank{}.txt", r));
    if (found == count) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void sleep_seconds(double s) { std::this_thread::sleep_for(std::chrono::duration<double>(s)); }

int run(std::string_view mode, const std::filesystem::path& dir, int devices) {
  auto env = fabric::detail::detect_environment(devices, 1);
  fabric::detail::SubprocessLauncher launcher;
  launcher.launch(env, devices, 1);
  write_file(dir / fmt::format("rank{}.txt", env.global_rank),
             fmt::format("{} {} {} {} {} {} {} {}\n", env.name, env.global_rank, env.world_size, env.local_rank,
                         env.main_port, ::getpid(), env.creates_processes_externally ? 1 : 0,
                         std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "unset"));
  const int rank = env.global_rank;
  if (mode == "normal") return 0;
  if (mode == "fail" || mode == "kill") {
    if (rank == 1) {
      wait_for_files(dir, devices);
      if (mode == "kill") ::raise(SIGKILL);
      return 3;
    }
    sleep_seconds(30);
    return 0;
  }
  if (mode == "sleep") {
    sleep_seconds(30);
    return 0;
  }
  if (mode == "late-fail") {
    if (rank == 1) {
      sleep_seconds(0.5);
      return 4;
    }
    return 0;
  }
  if (mode == "slow-child") {
    if (rank == 1) {
      sleep_seconds(0.5);
      write_file(dir / "late.txt", "late\n");
    }
    return 0;
  }
  if (mode == "parent-dies") {
    if (rank == 0) {
      wait_for_files(dir, devices);
      ::raise(SIGKILL);
    }
    sleep_seconds(30);
    return 0;
  }
  if (mode == "throw") {
    if (rank == 0) {
      wait_for_files(dir, devices);
      throw std::runtime_error("worker: thrown on rank 0");
    }
    sleep_seconds(30);
    return 0;
  }
  std::fprintf(stderr, "launch_worker: unknown mode %s\n", std::string(mode).c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: launch_worker MODE DIR DEVICES\n");
    return 2;
  }
  try {
    return run(argv[1], argv[2], std::stoi(argv[3]));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return 1;
  }
}
