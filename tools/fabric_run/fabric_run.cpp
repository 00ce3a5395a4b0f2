// fabric-run: starts the local processes of a distributed job with torchrun's environment variables, like
// `fabric run` / `torchrun`, and stops them all when one fails. Links fmt only (no LibTorch).

#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/launchers/subprocess.hpp>

#include <fmt/format.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr std::string_view usage = R"(usage: fabric-run [options] [--] PROGRAM [ARGS...]

Starts --devices copies of PROGRAM on this node with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID), so that fabric detects the
"torchelastic" environment; NCCL_NVLS_ENABLE=0 and OMP_NUM_THREADS=<cores / N> unless they are set. Run it once on
every node. The program's fabric.launch() starts nothing more under it. When one process fails, the others are
stopped and fabric-run exits with its code; SIGINT and SIGTERM are passed on to the processes.

options (also --name=value):
  --devices N         processes on this node (default 1)
  --num-nodes M       number of nodes (default 1)
  --node-rank R       rank of this node, 0..M-1 (default 0)
  --main-address A    address of the node of rank 0 (default 127.0.0.1; required with M > 1)
  --main-port P       port of the rendezvous on the main address, 1..65535 (default 29400)
  -h, --help          show this help
)";

/// The parsed command line.
struct Arguments {
  int devices = 1;
  int num_nodes = 1;
  int node_rank = 0;
  std::string main_address = "127.0.0.1";
  bool main_address_given = false;
  int main_port = 29400;
  std::vector<std::string> command;
};

/// Reports a bad command line and exits with 2.
[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "fabric-run: %s\nRun `fabric-run --help` for the options.\n", message.c_str());
  std::exit(2);
}

/// Parses an integer flag value in [low, high].
int parse_flag(std::string_view flag, std::string_view text, long long low, long long high) {
  auto value = fabric::detail::parse_integer(text);
  if (!value) fail(fmt::format("expected an integer for {}, found {:?}", flag, text));
  if (*value < low || *value > high) fail(fmt::format("expected {} in {}..{}, found {}", flag, low, high, *value));
  return static_cast<int>(*value);
}

Arguments parse(int argc, char** argv) {
  Arguments args;
  int i = 1;
  for (; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg == "-h" || arg == "--help") {
      std::fputs(usage.data(), stdout);
      std::exit(0);
    }
    if (!arg.starts_with("-")) break;
    std::string_view name = arg;
    std::optional<std::string_view> value;
    if (auto eq = arg.find('='); eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const bool known = name == "--devices" || name == "--num-nodes" || name == "--node-rank" ||
                       name == "--main-address" || name == "--main-port";
    if (!known) fail(fmt::format("unknown option {:?}", std::string(name)));
    if (!value) {
      if (i + 1 >= argc) fail(fmt::format("expected a value after {}", name));
      value = argv[++i];
    }
    if (name == "--devices") args.devices = parse_flag(name, *value, 1, 4096);
    if (name == "--num-nodes") args.num_nodes = parse_flag(name, *value, 1, 1 << 20);
    if (name == "--node-rank") args.node_rank = parse_flag(name, *value, 0, 1 << 20);
    if (name == "--main-port") args.main_port = parse_flag(name, *value, 1, 65535);
    if (name == "--main-address") {
      if (value->empty()) fail("expected a host name or address for --main-address, found an empty value");
      args.main_address = std::string(*value);
      args.main_address_given = true;
    }
  }
  for (; i < argc; ++i) args.command.emplace_back(argv[i]);
  if (args.command.empty()) fail("expected a program to run, found none; write it after the options (or after --)");
  if (args.node_rank >= args.num_nodes) {
    fail(fmt::format("expected --node-rank below --num-nodes = {}, found {}", args.num_nodes, args.node_rank));
  }
  if (args.num_nodes > 1 && !args.main_address_given) {
    fail(fmt::format("expected --main-address (the host of node rank 0) for a job on {} nodes, found none",
                     args.num_nodes));
  }
  return args;
}

/// The signal (SIGINT, SIGTERM) to forward to the processes; the wait loop sends it.
std::atomic<int> forwarded_signal{0};

extern "C" void forward_signal(int signal) { forwarded_signal.store(signal); }

}  // namespace

int main(int argc, char** argv) {
  const Arguments args = parse(argc, argv);
  const std::string program = fabric::detail::find_program(args.command.front());
  const int world = args.devices * args.num_nodes;
  const std::string run_id = fmt::format("fabric-run-{}", ::getpid());
  const std::string nvls = fabric::detail::nccl_nvls_value();
  // NOTE: like Lightning's CLI, share the cores between the local processes unless OMP_NUM_THREADS is set.
  const char* omp = std::getenv("OMP_NUM_THREADS");
  const std::string threads =
      omp != nullptr ? omp : std::to_string(std::max(1u, std::thread::hardware_concurrency() / args.devices));

  struct sigaction action {};
  action.sa_handler = forward_signal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);

  fabric::detail::ProcessSet processes("fabric-run");
  for (int local = 0; local < args.devices; ++local) {
    auto envp = fabric::detail::environment_with({
        {"RANK", std::to_string(args.node_rank * args.devices + local)},
        {"LOCAL_RANK", std::to_string(local)},
        {"WORLD_SIZE", std::to_string(world)},
        {"LOCAL_WORLD_SIZE", std::to_string(args.devices)},
        {"GROUP_RANK", std::to_string(args.node_rank)},
        {"NODE_RANK", std::to_string(args.node_rank)},
        {"MASTER_ADDR", args.main_address},
        {"MASTER_PORT", std::to_string(args.main_port)},
        {"TORCHELASTIC_RUN_ID", run_id},
        {"NCCL_NVLS_ENABLE", nvls},
        {"OMP_NUM_THREADS", threads},
    });
    try {
      processes.add(local, fabric::detail::spawn_process(program, args.command, envp));
    } catch (const std::exception& error) {
      std::fprintf(stderr, "%s\n", error.what());
      processes.stop();
      return 1;
    }
  }
  return processes.wait(&forwarded_signal);
}
