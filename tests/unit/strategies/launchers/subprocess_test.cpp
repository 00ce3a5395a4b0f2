// Real processes: launch_worker (SubprocessLauncher) and fabric-run. Each test checks ranks, exit codes, timing,
// and that no process of the run is left behind.

#include <fabric/strategies/launchers/subprocess.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

extern char** environ;

using Catch::Matchers::ContainsSubstring;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

/// A fresh directory under the system's temporary directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "fabric-launch-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

/// This process's environment without the variables that would make a child detect a cluster.
std::vector<std::string> clean_environment(const std::vector<std::string>& extra) {
  static const std::vector<std::string_view> prefixes{"SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_"};
  static const std::set<std::string_view> names{
      "LOCAL_RANK",  "RANK",        "WORLD_SIZE",       "NODE_RANK",       "GROUP_RANK",
      "MASTER_ADDR", "MASTER_PORT", "NCCL_NVLS_ENABLE", "FABRIC_LAUNCHED", "LOCAL_WORLD_SIZE"};
  std::vector<std::string> result;
  for (char** entry = environ; *entry != nullptr; ++entry) {
    std::string_view text(*entry);
    auto name = text.substr(0, text.find('='));
    bool drop = names.count(name) > 0;
    for (auto prefix : prefixes) drop = drop || name.starts_with(prefix);
    if (!drop) result.emplace_back(text);
  }
  result.insert(result.end(), extra.begin(), extra.end());
  return result;
}

/// A started process whose stdout and stderr go to a file.
struct Process {
  pid_t pid = -1;
  fs::path output;
  Clock::time_point start;
};

Process start(const std::vector<std::string>& argv, const fs::path& output, const std::vector<std::string>& env = {}) {
  auto envp_strings = clean_environment(env);
  std::vector<char*> args, envp;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  for (const auto& e : envp_strings) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  Process p{-1, output, Clock::now()};
  int rc = posix_spawn(&p.pid, args[0], &actions, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE(rc == 0);
  return p;
}

/// How a finished process ended.
struct Result {
  int code = -1;
  double seconds = 0;
  std::string output;
};

std::string read_text(const fs::path& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

/// Waits for `p` at most `timeout` seconds (then kills it and fails the test); the code is as a shell reports it.
Result finish(Process& p, double timeout = 10) {
  int status = 0;
  const auto deadline = p.start + std::chrono::duration<double>(timeout);
  while (::waitpid(p.pid, &status, WNOHANG) == 0) {
    if (Clock::now() > deadline) {
      ::kill(p.pid, SIGKILL);
      ::waitpid(p.pid, &status, 0);
      FAIL("the process did not finish within " << timeout << " s; output:\n" << read_text(p.output));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  Result r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.seconds = std::chrono::duration<double>(Clock::now() - p.start).count();
  r.output = read_text(p.output);
  return r;
}

Result run(const std::vector<std::string>& argv, const fs::path& dir, const std::vector<std::string>& env = {},
           double timeout = 10) {
  auto p = start(argv, dir / "output.txt", env);
  return finish(p, timeout);
}

/// What a worker rank wrote: environment name, rank, world size, local rank, port, pid, external, NCCL_NVLS_ENABLE.
struct RankFile {
  std::string name;
  int rank = -1, world = -1, local = -1, port = -1, pid = -1, external = -1;
  std::string nvls;
};

std::map<int, RankFile> read_ranks(const fs::path& dir) {
  std::map<int, RankFile> ranks;
  for (const auto& entry : fs::directory_iterator(dir)) {
    auto file = entry.path().filename().string();
    if (!file.starts_with("rank") || !file.ends_with(".txt")) continue;
    std::ifstream in(entry.path());
    RankFile r;
    in >> r.name >> r.rank >> r.world >> r.local >> r.port >> r.pid >> r.external >> r.nvls;
    REQUIRE(in);
    ranks[r.rank] = r;
  }
  return ranks;
}

/// Whether `pid` is a live process (a zombie counts as gone).
bool alive(int pid) {
  if (::kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  return close == std::string::npos || close + 2 >= line.size() || line[close + 2] != 'Z';
}

/// Waits up to `timeout` seconds for every rank's process to be gone; returns whether they all are.
bool all_gone(const std::map<int, RankFile>& ranks, double timeout = 3) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout);
  while (true) {
    bool any = false;
    for (const auto& [rank, r] : ranks) any = any || alive(r.pid);
    if (!any) return true;
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

/// Waits until `dir` holds `count` rank files.
void wait_for_ranks(const fs::path& dir, int count) {
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (read_ranks(dir).size() < static_cast<std::size_t>(count)) {
    REQUIRE(Clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

const std::string worker = FABRIC_LAUNCH_WORKER;

std::vector<std::string> worker_args(const std::string& mode, const fs::path& dir, int devices) {
  return {worker, mode, dir.string(), std::to_string(devices)};
}

}  // namespace

// Lightning: tests_fabric/strategies/launchers/test_subprocess_script.py::test_subprocess_script_launcher_launch_processes
TEST_CASE("launcher: every local rank runs once, with its own rank and the same port", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("normal", dir.path, 3), dir.path);
  INFO(r.output);
  CHECK(r.code == 0);
  auto ranks = read_ranks(dir.path);
  REQUIRE(ranks.size() == 3);
  for (int rank = 0; rank < 3; ++rank) {
    REQUIRE(ranks.count(rank) == 1);
    const auto& f = ranks[rank];
    CHECK(f.name == "lightning");
    CHECK(f.world == 3);
    CHECK(f.local == rank);
    CHECK(f.port == ranks[0].port);
    CHECK(f.external == (rank == 0 ? 0 : 1));
    CHECK(f.nvls == "0");
  }
  CHECK(ranks[0].port > 0);
  CHECK(std::set<int>{ranks[0].pid, ranks[1].pid, ranks[2].pid}.size() == 3);
  CHECK(all_gone(ranks, 1));
}

TEST_CASE("launcher: the children keep the parent's NCCL_NVLS_ENABLE and MASTER_PORT", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("normal", dir.path, 2), dir.path, {"NCCL_NVLS_ENABLE=1", "MASTER_PORT=23456"});
  INFO(r.output);
  CHECK(r.code == 0);
  auto ranks = read_ranks(dir.path);
  REQUIRE(ranks.size() == 2);
  CHECK(ranks[1].nvls == "1");
  CHECK(ranks[0].port == 23456);
  CHECK(ranks[1].port == 23456);
}

TEST_CASE("launcher: one device starts no other process", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("normal", dir.path, 1), dir.path);
  CHECK(r.code == 0);
  auto ranks = read_ranks(dir.path);
  REQUIRE(ranks.size() == 1);
  CHECK(ranks[0].world == 1);
}

// Lightning: tests_fabric/strategies/launchers/test_subprocess_script.py::test_child_process_observer
TEST_CASE("launcher: a failing rank stops the others and the parent exits with its code", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("fail", dir.path, 3), dir.path);
  INFO(r.output);
  CHECK(r.code == 3);
  CHECK(r.seconds < 5);
  CHECK_THAT(r.output, ContainsSubstring("fabric: local rank 1 (pid ") &&
                           ContainsSubstring("exited with code 3; stopping the other processes"));
  auto ranks = read_ranks(dir.path);
  CHECK(ranks.size() == 3);
  CHECK(all_gone(ranks));
}

TEST_CASE("launcher: a rank killed by a signal ends the parent with 128 + signal", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("kill", dir.path, 2), dir.path);
  INFO(r.output);
  CHECK(r.code == 128 + SIGKILL);
  CHECK(r.seconds < 5);
  CHECK_THAT(r.output, ContainsSubstring("local rank 1") && ContainsSubstring("was killed by signal 9"));
  CHECK(all_gone(read_ranks(dir.path)));
}

TEST_CASE("launcher: the parent waits for its children at exit", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("slow-child", dir.path, 2), dir.path);
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.seconds >= 0.5);
  CHECK(fs::exists(dir.path / "late.txt"));
}

TEST_CASE("launcher: a child failing after the parent's main returned still fails the parent", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("late-fail", dir.path, 2), dir.path);
  INFO(r.output);
  CHECK(r.code == 4);
  CHECK_THAT(r.output, ContainsSubstring("exited with code 4"));
}

TEST_CASE("launcher: the children die with a killed parent", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("parent-dies", dir.path, 3), dir.path);
  CHECK(r.code == 128 + SIGKILL);
  auto ranks = read_ranks(dir.path);
  CHECK(ranks.size() == 3);
  CHECK(all_gone(ranks));
}

TEST_CASE("launcher: an exception through the launcher's scope stops the children", "[launch]") {
  TempDir dir;
  auto r = run(worker_args("throw", dir.path, 2), dir.path);
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(r.seconds < 5);
  CHECK_THAT(r.output, ContainsSubstring("thrown on rank 0"));
  CHECK(all_gone(read_ranks(dir.path)));
}

#ifdef FABRIC_RUN_EXE
namespace {
const std::string fabric_run = FABRIC_RUN_EXE;
}

TEST_CASE("fabric-run: three processes detect torchelastic with ranks 0..2", "[launch]") {
  TempDir dir;
  auto r = run({fabric_run, "--devices", "3", "--main-port=24680", "--", worker, "normal", dir.path.string(), "3"},
               dir.path);
  INFO(r.output);
  CHECK(r.code == 0);
  auto ranks = read_ranks(dir.path);
  REQUIRE(ranks.size() == 3);
  for (int rank = 0; rank < 3; ++rank) {
    REQUIRE(ranks.count(rank) == 1);
    CHECK(ranks[rank].name == "torchelastic");
    CHECK(ranks[rank].external == 1);
    CHECK(ranks[rank].world == 3);
    CHECK(ranks[rank].local == rank);
    CHECK(ranks[rank].port == 24680);
    CHECK(ranks[rank].nvls == "0");
  }
  CHECK(all_gone(ranks, 1));
}

TEST_CASE("fabric-run: bad flags exit with 2 and say why", "[launch]") {
  TempDir dir;
  auto bad = [&](std::vector<std::string> argv, std::string_view expected) {
    argv.insert(argv.begin(), fabric_run);
    auto r = run(argv, dir.path);
    INFO(r.output);
    CHECK(r.code == 2);
    CHECK_THAT(r.output, ContainsSubstring(std::string(expected)) && ContainsSubstring("fabric-run --help"));
  };
  bad({"--devices", "two", "--", worker}, "expected an integer for --devices, found \"two\"");
  bad({"--devices=0", worker}, "expected --devices in 1..4096, found 0");
  bad({"--bogus", "1", worker}, "unknown option \"--bogus\"");
  bad({"--main-port", "70000", worker}, "--main-port in 1..65535");
  bad({"--num-nodes", "2", "--node-rank", "2", "--main-address", "h", worker}, "--node-rank below --num-nodes = 2");
  bad({"--num-nodes", "2", worker}, "--main-address");
  bad({"--devices", "2"}, "expected a program to run");
  bad({"--devices"}, "expected a value after --devices");
  auto help = run({fabric_run, "--help"}, dir.path);
  CHECK(help.code == 0);
  CHECK_THAT(help.output, ContainsSubstring("usage: fabric-run"));
}

TEST_CASE("fabric-run: a failing process stops the others and fabric-run exits with its code", "[launch]") {
  TempDir dir;
  auto r = run({fabric_run, "--devices=3", worker, "fail", dir.path.string(), "3"}, dir.path);
  INFO(r.output);
  CHECK(r.code == 3);
  CHECK(r.seconds < 5);
  CHECK_THAT(r.output, ContainsSubstring("fabric-run: local rank 1 (pid ") && ContainsSubstring("exited with code 3"));
  auto ranks = read_ranks(dir.path);
  CHECK(ranks.size() == 3);
  CHECK(all_gone(ranks));
}

TEST_CASE("fabric-run: SIGTERM is forwarded to the processes", "[launch]") {
  TempDir dir;
  auto p = start({fabric_run, "--devices", "2", worker, "sleep", dir.path.string(), "2"}, dir.path / "output.txt");
  wait_for_ranks(dir.path, 2);
  ::kill(p.pid, SIGTERM);
  auto r = finish(p);
  INFO(r.output);
  CHECK(r.code == 128 + SIGTERM);
  CHECK_THAT(r.output, ContainsSubstring("killed by signal 15"));
  CHECK(all_gone(read_ranks(dir.path)));
}

TEST_CASE("fabric-run: a program that cannot be executed", "[launch]") {
  TempDir dir;
  auto r = run({fabric_run, (dir.path / "no-such-program").string()}, dir.path);
  CHECK(r.code == 127);
  CHECK_THAT(r.output, ContainsSubstring("could not execute"));
}
#endif

TEST_CASE("find_free_port returns a bindable port", "[launch]") {
  int port = fabric::detail::find_free_port();
  CHECK(port > 0);
  CHECK(port <= 65535);
}

// Lightning: tests_fabric/strategies/launchers/test_subprocess_script.py::test_subprocess_script_launcher_external_processes
TEST_CASE("launcher: processes started outside (torchrun, srun, ...) start nothing more", "[launch]") {
  fabric::Topology env;
  env.creates_processes_externally = true;
  env.world_size = 8;
  env.local_rank = 1;
  fabric::detail::SubprocessLauncher launcher;
  launcher.launch(env, 4, 2);
  CHECK(launcher.child_pids().empty());
  CHECK(env.main_port == 0);  // nothing chosen or exported: the launcher outside did that
}

// Lightning: tests_fabric/strategies/launchers/test_subprocess_script.py::test_subprocess_script_launcher_can_launch
TEST_CASE("launcher: only local rank 0 of a world of devices * num_nodes starts processes", "[launch]") {
  fabric::Topology env;
  env.world_size = 2;
  env.local_rank = 1;
  fabric::detail::SubprocessLauncher launcher;
  CHECK_THROWS_WITH(launcher.launch(env, 2, 1),
                    ContainsSubstring("expected the launching process to be local rank 0 of a world of devices * "
                                      "num_nodes = 2, found local rank 1 of 2"));
  CHECK(launcher.child_pids().empty());
  // Lightning's launcher refuses to start processes twice; fabric's launch state belongs to the process, and a
  // second launch (a second Fabric) reuses the first one's processes and port (launch_worker's normal mode runs
  // once per process: see "every local rank runs once").
}

// Lightning left out: tests_fabric/strategies/launchers/test_subprocess_script.py::test_subprocess_script_launcher_interactive_compatible - whether a launcher works in a notebook (interactive Python); a C++ program is never interactive
// Lightning left out: tests_fabric/strategies/launchers/test_subprocess_script.py::test_subprocess_script_launcher_hydra_in_use - the child command under Hydra (a Python configuration framework) and its working directory; fabric re-executes /proc/self/exe with the same arguments
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_interactive_compatible - Python multiprocessing start methods in notebooks; fabric's launcher re-executes the program (no fork or spawn of Python functions)
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_forking_on_unsupported_platform - Python multiprocessing's start methods per platform; fabric's launcher re-executes the program
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_start_method - Python multiprocessing's get_context/start_processes; fabric's launcher re-executes the program
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_restore_globals - pickling a snapshot of Python globals to spawned workers; fabric's processes run main() themselves
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_global_state_snapshot - restoring torch's Python-side globals in a spawned worker; re-executed processes set their own (seeds come through PL_GLOBAL_SEED, see utils/seed_test.cpp)
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_check_for_bad_cuda_fork - Python fork after CUDA initialisation; fabric never forks a process that runs on, it execs a new program
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_check_for_bad_cuda_fork_with_is_in_bad_fork - torch.cuda._is_in_bad_fork of Python forked workers; fabric execs a new program instead of forking
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing.py::test_check_for_missing_main_guard - Python's `if __name__ == "__main__"` guard for spawn; a C++ program has main()
// Lightning left out: tests_fabric/strategies/launchers/test_multiprocessing_integration.py::test_memory_sharing_disabled - tensors shared through Python multiprocessing between spawned workers; fabric's processes are separate programs that share no memory
