// fabric-run: starts the local processes of a distributed job with torchrun's environment variables, like
// `fabric run` / `torchrun`, and stops them all when one fails. Links fmt and CLI11 only (no LibTorch).

#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/launchers/subprocess.hpp>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr std::string_view description = R"(usage: fabric-run [options] [--] PROGRAM [ARGS...]

Starts --devices copies of PROGRAM on this node with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RUN_ID), so that fabric detects the
"torchelastic" environment; NCCL_NVLS_ENABLE=0 and OMP_NUM_THREADS=<cores / N> unless they are set. Run it once on
every node. The program's fabric.launch() starts nothing more under it. When one process fails, the others are
stopped and fabric-run exits with its code; SIGINT and SIGTERM are passed on to the processes.)";

/// CLI11's help with the usage line first (it opens the description), then the options.
class Help : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override { return {}; }
};

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

/// Parses the command line with CLI11: the options end at the first argument that is not one (or at --), where
/// the program's command line starts. Exits with 2 when it is bad, with 0 after printing the help.
Arguments parse(int argc, char** argv) {
  Arguments args;
  CLI::App app(std::string(description), "fabric-run");
  app.formatter(std::make_shared<Help>());
  app.get_formatter()->column_width(22);
  app.option_defaults()->group("options (also --name=value)")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // An integer option in [low, high]; a bad value is refused in fabric's words (a CLI::ValidationError thrown in
  // an option's callback reaches CLI::App::parse's caller unchanged).
  const auto integer = [&app](const std::string& flag, const char* type, int& into, long long low, long long high,
                              const std::string& help) {
    app.add_option_function<std::string>(
           flag,
           [flag, &into, low, high](const std::string& text) {
             const auto value = fabric::detail::parse_integer(text);
             if (!value) throw CLI::ValidationError(fmt::format("expected an integer for {}, found {:?}", flag, text));
             if (*value < low || *value > high) {
               throw CLI::ValidationError(fmt::format("expected {} in {}..{}, found {}", flag, low, high, *value));
             }
             into = static_cast<int>(*value);
           },
           help)
        ->type_name(type);
  };
  integer("--devices", "N", args.devices, 1, 4096, "processes on this node (default 1)");
  integer("--num-nodes", "M", args.num_nodes, 1, 1 << 20, "number of nodes (default 1)");
  integer("--node-rank", "R", args.node_rank, 0, 1 << 20, "rank of this node, 0..M-1 (default 0)");
  app.add_option_function<std::string>(
         "--main-address",
         [&args](const std::string& text) {
           if (text.empty()) {
             throw CLI::ValidationError("expected a host name or address for --main-address, found an empty value");
           }
           args.main_address = text;
           args.main_address_given = true;
         },
         "address of the node of rank 0 (default 127.0.0.1; required with M > 1)")
      ->type_name("A");
  integer("--main-port", "P", args.main_port, 1, 65535,
          "port of the rendezvous on the main address, 1..65535 (default 29400)");
  // The program and its arguments: everything from the first positional argument on, options included.
  app.add_option("PROGRAM", args.command)->group("");
  app.positionals_at_end();
  app.set_help_flag("-h,--help", "show this help");  // after the others: listed last
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    std::exit(0);
  } catch (const CLI::ExtrasError&) {
    fail(fmt::format("unknown option {:?}", app.remaining().front()));
  } catch (const CLI::ArgumentMismatch&) {
    // NOTE: CLI11 takes whatever follows an option as its value, so only the last argument can lack one.
    fail(fmt::format("expected a value after {}", argv[argc - 1]));
  } catch (const CLI::ParseError& error) {
    fail(error.what());
  }
  // NOTE: CLI11 reads `--name=` as `--name` followed by its value; refuse the empty value that a job script with an
  // empty variable writes instead of taking the next argument.
  for (int i = 1; i < argc - static_cast<int>(args.command.size()); ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--main-address=") fail("expected a host name or address for --main-address, found an empty value");
    if (arg.starts_with("--") && arg.ends_with('=')) {
      fail(fmt::format("expected a value after {}, found an empty one", arg.substr(0, arg.size() - 1)));
    }
  }
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
