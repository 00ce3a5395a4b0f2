// Trains a small CNN on Fashion-MNIST with fabric, on the GPU when there is one, else on the CPU.
//
//     fashion_mnist                                  # the default run: >= 90% test accuracy
//     fashion_mnist --epochs 1 --train-subset 3000 --test-subset 1000 --expect-loss-decrease
//     fashion_mnist --accelerator cuda --precision bf16-mixed
//     fashion_mnist --help

#include "fashion_mnist/fashion_mnist.hpp"

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <fabric/distributed.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <numbers>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

/// A bad command line (exit status 2): the message says what was expected and what was found. A
/// CLI::ValidationError thrown in an option's callback reaches CLI::App::parse's caller unchanged.
using UsageError = CLI::ValidationError;

/// The command-line settings of a run.
struct Config {
  int epochs = 3;
  std::size_t batch_size = 64;
  double lr = 2e-3;
  std::optional<std::size_t> train_subset{};
  std::optional<std::size_t> test_subset{};
  std::filesystem::path data_dir{fashion_mnist::default_data_dir};
  std::uint64_t seed = 42;
  std::optional<std::filesystem::path> checkpoint{};
  std::optional<std::filesystem::path> log_dir{};
  bool progress = true;
  std::optional<int> threads{};
  std::string_view accelerator = "auto";
  std::string_view precision = "32-true";
  int devices = 1;
  bool expect_loss_decrease = false;
  std::optional<double> min_accuracy{};
};

constexpr std::string_view description = R"(usage: fashion_mnist [flags]

Trains a small CNN (conv 32 -> conv 64 with batch norm, ReLU and max-pool, dropout, a linear
head) on Fashion-MNIST with fabric: AdamW with cosine learning-rate decay. Prints the train loss,
test accuracy and seconds of each epoch, then the final test accuracy.)";

/// CLI11's help with the usage line first (it opens the description), then the flags.
class Help : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override { return {}; }
};

template <class T>
T parse_number(std::string_view flag, std::string_view text, std::string_view example) {
  T value{};
  const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc{} || end != text.data() + text.size()) {
    throw UsageError(fmt::format("expected a number after {}, found \"{}\"; e.g. {} {}", flag, text, flag, example));
  }
  return value;
}

template <class T>
T parse_positive(std::string_view flag, std::string_view text, std::string_view example) {
  const auto value = parse_number<T>(flag, text, example);
  if (!(value > 0)) {
    throw UsageError(
        fmt::format("expected a positive number after {}, found {}; e.g. {} {}", flag, text, flag, example));
  }
  return value;
}

/// The parsers of the flags' values: each takes the flag and its text.
template <class T>
auto number(std::string_view example) {
  return [example](std::string_view flag, std::string_view text) { return parse_number<T>(flag, text, example); };
}
template <class T>
auto positive(std::string_view example) {
  return [example](std::string_view flag, std::string_view text) { return parse_positive<T>(flag, text, example); };
}
std::filesystem::path path(std::string_view /*flag*/, std::string_view text) { return text; }

/// The accelerators and precisions of the command line, by Lightning name; the first is the canonical name.
constexpr std::array<std::string_view, 3> accelerator_names = {"cpu", "cuda", "auto"};
constexpr std::array<std::array<std::string_view, 2>, 7> precision_names = {{{"32-true", "32"},
                                                                             {"64-true", "64"},
                                                                             {"bf16-mixed", "bf16"},
                                                                             {"16-mixed", "16"},
                                                                             {"bf16-true", ""},
                                                                             {"16-true", ""},
                                                                             {"bf16-master", ""}}};

std::string_view parse_accelerator(std::string_view /*flag*/, std::string_view text) {
  for (const auto name : accelerator_names) {
    if (text == name) return name;
  }
  throw UsageError(fmt::format("expected --accelerator cpu, cuda or auto, found \"{}\"", text));
}

std::string_view parse_precision(std::string_view /*flag*/, std::string_view text) {
  for (const auto& [name, alias] : precision_names) {
    if (text == name || (!alias.empty() && text == alias)) return name;
  }
  throw UsageError(
      fmt::format("expected --precision 32-true, 64-true, bf16-mixed, 16-mixed, bf16-true, 16-true or bf16-master "
                  "(or 32, 64, bf16, 16), found \"{}\"",
                  text));
}

/// Reads the command line with CLI11; returns nothing when it printed the help (--help).
std::optional<Config> parse_args(int argc, char** argv) {
  Config c;
  CLI::App app(std::string(description), "fashion_mnist");
  app.formatter(std::make_shared<Help>());
  app.get_formatter()->column_width(27);
  app.option_defaults()->group("flags")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // A flag with a value: `parse(flag, text)` reads it into `into`, or refuses it in fabric's words.
  const auto add = [&app](const std::string& flag, const char* type, auto& into, auto parse, const std::string& help) {
    app.add_option_function<std::string>(
           flag, [flag, &into, parse](const std::string& text) { into = parse(flag, text); }, help)
        ->type_name(type);
  };
  add("--accelerator", "NAME", c.accelerator, parse_accelerator,
      "cpu, cuda, or auto: CUDA when a GPU is visible, else the CPU (default auto)");
  add("--precision", "NAME", c.precision, parse_precision,
      "32-true, 64-true, bf16-mixed, 16-mixed, bf16-true, 16-true or bf16-master\n"
      "(bf16 weights, float32 masters in AdamW), or the short names 32, 64, bf16\n"
      "(bf16-mixed), 16 (16-mixed) (default 32-true)");
  add("--devices", "N", c.devices, positive<int>("2"),
      "processes, one per device: with N > 1 the example trains with DDP; the\n"
      "first process starts the others (default 1)");
  add("--epochs", "N", c.epochs, positive<int>("3"), "epochs to train (default 3)");
  add("--batch-size", "N", c.batch_size, positive<std::size_t>("64"), "samples per training batch (default 64)");
  add("--lr", "X", c.lr, positive<double>("0.001"),
      "peak learning rate of AdamW, decayed to 0 by a cosine (default 0.002)");
  add("--train-subset", "N", c.train_subset, positive<std::size_t>("3000"),
      "train on the first N of the 60000 training samples (default: all)");
  add("--test-subset", "N", c.test_subset, positive<std::size_t>("1000"),
      "test on the first N of the 10000 test samples (default: all)");
  add("--data-dir", "PATH", c.data_dir, path,
      "directory of the four *-ubyte.gz files\n(default /usr/share/datasets/fashion-mnist, from "
      "dataset-fashion-mnist)");
  add("--seed", "N", c.seed, number<std::uint64_t>("42"), "seed of every generator (default 42)");
  add("--checkpoint", "PATH", c.checkpoint, path, "save model, optimizer and epoch to PATH at the end of each epoch");
  add("--log-dir", "PATH", c.log_dir, path,
      "write metrics and hyperparameters under PATH with a TensorBoardLogger\n"
      "(PATH/tensorboard) and a CSVLogger (PATH/csv)");
  app.add_flag("!--no-progress", c.progress, "no progress bar (a live bar on a terminal, else a line every 10 s)");
  add("--threads", "N", c.threads, positive<int>("2"), "intra-op threads of LibTorch (default: LibTorch's choice)");
  app.add_flag("--expect-loss-decrease", c.expect_loss_decrease,
               "exit with status 1 unless the mean loss of the last training batches\n"
               "is at least 10% below the loss of the first batch (a smoke test)");
  add("--min-accuracy", "X", c.min_accuracy, number<double>("90"),
      "exit with status 1 unless the final test accuracy is at least X percent");
  app.set_help_flag("-h,--help", "print this and exit");  // after the others: listed last
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return std::nullopt;
  } catch (const CLI::ExtrasError&) {
    throw UsageError(
        fmt::format("unknown flag \"{}\"; run fashion_mnist --help for the list of flags", app.remaining().front()));
  } catch (const CLI::ArgumentMismatch&) {
    // NOTE: CLI11 takes whatever follows a flag as its value, so only the last argument can lack one.
    throw UsageError(fmt::format("expected a value after {}, found none", argv[argc - 1]));
  }
  return c;
}

double mean_of(const std::vector<double>& v, std::size_t first, std::size_t count) {
  return std::accumulate(v.begin() + static_cast<std::ptrdiff_t>(first),
                         v.begin() + static_cast<std::ptrdiff_t>(first + count), 0.0) /
         static_cast<double>(count);
}

/// Trains and tests with the policies of F; returns the exit status.
template <class F>
int train(const Config& config) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  if (config.threads) {
    torch::set_num_threads(*config.threads);
  } else if (config.devices > 1) {
    // NOTE: the processes share the machine's cores.
    torch::set_num_threads(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / config.devices));
  }

  fabric::Options options{.devices = config.devices};
  if (config.log_dir) {
    // The first logger is fabric.logger(); log_dict writes to both.
    options.loggers.push_back(std::make_shared<fabric::TensorBoardLogger>(
        fabric::TensorBoardLogger::Options{.root_dir = *config.log_dir / "tensorboard", .name = "fashion_mnist"}));
    options.loggers.push_back(std::make_shared<fabric::CSVLogger>(
        fabric::CSVLogger::Options{.root_dir = *config.log_dir / "csv", .name = "fashion_mnist"}));
  }
  // The progress bar is a callback: Fabric tells it the rank (it shows on rank zero only) and the
  // metrics given to log_dict; the loop reports the batches through the training hooks.
  F fabric(std::move(options), fabric::ProgressBar({.max_epochs = config.epochs, .enabled = config.progress}));
  fabric.launch();  // with DDP: starts the other processes and connects them; nothing to do on one device
  fabric.seed_everything(config.seed);

  using fashion_mnist::FashionMNIST;
  FashionMNIST train_set({.root = config.data_dir, .split = FashionMNIST::Split::train, .subset = config.train_subset});
  FashionMNIST test_set({.root = config.data_dir, .split = FashionMNIST::Split::test, .subset = config.test_subset});
  const std::size_t train_size = *train_set.size();
  const std::size_t test_size = *test_set.size();
  auto train = fabric.dataloader(train_set.map(torch::data::transforms::Stack<>()),
                                 {.batch_size = config.batch_size, .shuffle = true, .num_workers = 0});
  auto test = fabric.dataloader(test_set.map(torch::data::transforms::Stack<>()), {.batch_size = 1000});

  fashion_mnist::Net net;
  // NOTE: float16 weights need an eps that float16 can hold (AdamW's 1e-8 is zero there).
  const double eps = F::precision_type::param_dtype() == torch::kHalf ? 1e-4 : 1e-8;
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(config.lr).weight_decay(1e-4).eps(eps));
  auto [model, optimizer] = fabric.setup(net, adamw);

  // Under DDP each process trains on its shard of every epoch.
  const std::size_t shard = (train_size + fabric.world_size() - 1) / fabric.world_size();
  const std::size_t batches_per_epoch = (shard + config.batch_size - 1) / config.batch_size;
  const std::size_t total_steps = batches_per_epoch * static_cast<std::size_t>(config.epochs);
  fabric.print("fashion_mnist: {} train / {} test samples, {} epoch{} of {} batches of {}, lr {}, {} thread{}",
               train_size, test_size, config.epochs, config.epochs == 1 ? "" : "s", batches_per_epoch,
               config.batch_size, config.lr, torch::get_num_threads(), torch::get_num_threads() == 1 ? "" : "s");
  fabric.print("fashion_mnist: accelerator {} on {}, precision {}, strategy {} with {} process{}",
               F::accelerator_type::name, fabric.device().str(), F::precision_type::name, F::strategy_type::name,
               fabric.world_size(), fabric.world_size() == 1 ? "" : "es");
  for (const auto& logger : fabric.loggers()) {  // on rank zero only: the loggers see to that
    logger->log_hyperparams({{"epochs", std::to_string(config.epochs)},
                             {"batch_size", std::to_string(config.batch_size)},
                             {"lr", fmt::format("{}", config.lr)},
                             {"train_samples", std::to_string(train_size)},
                             {"seed", std::to_string(config.seed)},
                             {"accelerator", std::string(F::accelerator_type::name)},
                             {"precision", std::string(F::precision_type::name)}});
  }

  double first_loss = 0.0;  // the loss of the first batch, before any update
  std::vector<double> epoch_losses;
  double accuracy = 0.0;
  std::size_t step = 0;
  for (int epoch = 1; epoch <= config.epochs; ++epoch) {
    const auto epoch_start = Clock::now();
    model->train();
    epoch_losses.clear();
    fabric.call(fabric::hooks::on_train_epoch_start, epoch - 1, static_cast<std::int64_t>(batches_per_epoch));
    std::int64_t batch_idx = 0;
    for (auto& batch : train) {
      // Cosine decay of the learning rate from lr to 0 over the whole run, step by step.
      const double progress = static_cast<double>(step) / static_cast<double>(total_steps);
      const double lr = 0.5 * config.lr * (1.0 + std::cos(std::numbers::pi * progress));
      for (auto& group : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);

      const auto loss = torch::nn::functional::cross_entropy(model(batch.data), batch.target);
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();

      const double value = loss.template item<double>();
      epoch_losses.push_back(value);
      if (step == 0) first_loss = value;
      if (step % 50 == 0) fabric.log_dict({{"train_loss", value}, {"lr", lr}}, static_cast<std::int64_t>(step));
      fabric.call(fabric::hooks::on_train_batch_end, batch_idx++);
      ++step;
    }
    fabric.call(fabric::hooks::on_train_epoch_end);
    const double train_loss = mean_of(epoch_losses, 0, epoch_losses.size());

    model->eval();
    std::int64_t correct = 0;
    std::int64_t evaluated = 0;
    {
      torch::NoGradGuard no_grad;
      const std::size_t test_shard = (test_size + fabric.world_size() - 1) / fabric.world_size();
      fabric.call(fabric::hooks::on_validation_epoch_start, static_cast<std::int64_t>((test_shard + 999) / 1000));
      std::int64_t test_idx = 0;
      for (auto& batch : test) {
        correct += model(batch.data).argmax(1).eq(batch.target).sum().template item<std::int64_t>();
        evaluated += batch.target.size(0);
        fabric.call(fabric::hooks::on_validation_batch_end, test_idx++);
      }
      fabric.call(fabric::hooks::on_validation_epoch_end);
    }
    // NOTE: under DDP each rank tests its shard; the shards are padded to equal size, so a few samples
    // may count twice (as in Lightning).
    const auto totals =
        fabric.all_reduce(torch::tensor({correct, evaluated}).to(fabric.device()), fabric::ReduceOp::sum);
    accuracy = 100.0 * totals[0].template item<double>() / totals[1].template item<double>();
    const double seconds = std::chrono::duration<double>(Clock::now() - epoch_start).count();
    fabric.print("epoch {}/{}  train loss {:.4f}  test accuracy {:.2f}%  ({:.1f} s)", epoch, config.epochs, train_loss,
                 accuracy, seconds);
    fabric.log_dict(
        {{"epoch", static_cast<double>(epoch)}, {"epoch_train_loss", train_loss}, {"test_accuracy", accuracy}},
        static_cast<std::int64_t>(step));
    if (config.checkpoint) {
      fabric.save(*config.checkpoint, {{"model", model}, {"optimizer", optimizer}, {"epoch", epoch}});
    }
  }
  for (const auto& logger : fabric.loggers()) logger->finalize("success");

  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  fabric.print("final test accuracy {:.2f}% ({} samples) after {} epoch{}, {:.1f} s in all", accuracy, test_size,
               config.epochs, config.epochs == 1 ? "" : "s", total);

  int status = 0;
  if (config.expect_loss_decrease) {
    // The loss of the very first batch (before any update) against the last batches of the last
    // epoch, which must be at least 10% lower: a run that diverges or learns nothing fails.
    const std::size_t k = std::clamp<std::size_t>(epoch_losses.size() / 4, 1, 10);
    const double first = first_loss;
    const double last = mean_of(epoch_losses, epoch_losses.size() - k, k);
    const bool ok = std::isfinite(last) && last < 0.9 * first;
    fabric.print("loss check: first batch {:.4f}, mean of the last {} batches {:.4f}: {}", first, k, last,
                 ok ? "decreased" : "did NOT decrease by 10% (FAILED)");
    if (!ok) status = 1;
  }
  if (config.min_accuracy && accuracy < *config.min_accuracy) {
    fabric.print("accuracy check: expected at least {:.2f}%, found {:.2f}%", *config.min_accuracy, accuracy);
    status = 1;
  }
  return status;
}

/// The policies the command line picks from, by name. NOTE: each combination instantiates train().
using Accelerators = fabric::TypeList<fabric::Auto, fabric::CPU, fabric::CUDA>;
using Precisions = fabric::TypeList<fabric::FP32, fabric::FP64, fabric::BF16Mixed, fabric::FP16Mixed, fabric::BF16True,
                                    fabric::FP16True, fabric::BF16Master>;

/// Returns fn.template operator()<T>() for the T of the list whose name is `name`.
template <class... Ts, class Fn>
int with_policy(std::string_view name, fabric::TypeList<Ts...> /*list*/, Fn&& fn) {
  int status = -1;
  const bool found = ((Ts::name == name && ((status = fn.template operator()<Ts>()), true)) || ...);
  if (!found) throw std::logic_error(fmt::format("fashion_mnist: no policy named \"{}\"", name));
  return status;
}

/// Picks the policies named on the command line and trains with them: DDP with more than one device.
int run(const Config& config) {
  return with_policy(config.accelerator, Accelerators{}, [&]<class A>() {
    return with_policy(config.precision, Precisions{}, [&]<class P>() {
      if (config.devices > 1) return train<fabric::Fabric<A, fabric::DDP, P, fabric::ProgressBar>>(config);
      return train<fabric::Fabric<A, fabric::SingleDevice, P, fabric::ProgressBar>>(config);
    });
  });
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::optional<Config> config = parse_args(argc, argv);
    return config ? run(*config) : 0;
  } catch (const CLI::ParseError& e) {  // a bad command line
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 1;
  }
}
