// Trains GPT-2 small with fabric in bf16-mixed precision, on the GPU when there is one, else on the
// CPU, on one batch of random tokens drawn once (the model learns it by heart, so the loss falls).
// It shows the training loop; bench/race.cpp times the same loop against others.
//
//     gpt2 --steps 50                                   # GPT-2 small, batch 8 x 1024 tokens
//     gpt2 --tiny --steps 3 --expect-loss-decrease      # a tiny GPT on the CPU (the smoke test)
//     gpt2 --help

#include "gpt2/gpt2.hpp"

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

/// A bad command line: the message says what was expected and what was found.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The command-line settings of a run.
struct Settings {
  int steps = 20;
  int batch_size = 0;  // 0: 8 for GPT-2 small, 4 for --tiny
  double lr = 6e-4;
  std::uint64_t seed = 42;
  bool tiny = false;
  bool expect_loss_decrease = false;
  bool help = false;
};

constexpr std::string_view usage = R"(usage: gpt2 [flags]

Trains GPT-2 small (12 layers, 12 heads, width 768, context 1024, vocabulary 50304; 124.5 M
parameters) with fabric::Fabric<Auto, SingleDevice, BF16Mixed> and AdamW (weight decay 0.1) on one
batch of random tokens, and prints the loss, time and tokens per second of each step.

flags:
  --steps N                optimizer steps (default 20)
  --batch-size N           sequences per batch (default 8; 4 with --tiny)
  --lr X                   learning rate of AdamW (default 0.0006; 0.001 with --tiny)
  --seed N                 seed of the weights and the tokens (default 42)
  --tiny                   a tiny GPT (2 layers, 2 heads, width 64, 32 positions, 256 tokens)
  --expect-loss-decrease   exit with status 1 unless the last loss is below the first (a smoke test)
  --help                   print this and exit
)";

template <class T>
T parse_number(std::string_view flag, std::string_view text) {
  T value{};
  const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc{} || end != text.data() + text.size() || value <= T{}) {
    throw UsageError(fmt::format("expected a positive number after {}, found \"{}\"", flag, text));
  }
  return value;
}

Settings parse_args(int argc, char** argv) {
  Settings s;
  bool lr_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    const auto value = [&]() -> std::string_view {
      if (i + 1 >= argc) throw UsageError(fmt::format("expected a value after {}, found none", flag));
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      s.help = true;
    } else if (flag == "--steps") {
      s.steps = parse_number<int>(flag, value());
    } else if (flag == "--batch-size") {
      s.batch_size = parse_number<int>(flag, value());
    } else if (flag == "--lr") {
      const std::string text(value());
      try {
        std::size_t used = 0;
        s.lr = std::stod(text, &used);
        if (used != text.size() || !(s.lr > 0)) throw std::invalid_argument(text);
      } catch (const std::exception&) {
        throw UsageError(fmt::format("expected a positive number after --lr, found \"{}\"", text));
      }
      lr_given = true;
    } else if (flag == "--seed") {
      s.seed = parse_number<std::uint64_t>(flag, value());
    } else if (flag == "--tiny") {
      s.tiny = true;
    } else if (flag == "--expect-loss-decrease") {
      s.expect_loss_decrease = true;
    } else {
      throw UsageError(fmt::format("unknown flag \"{}\"; run gpt2 --help for the list", flag));
    }
  }
  if (s.batch_size == 0) s.batch_size = s.tiny ? 4 : 8;
  if (s.tiny && !lr_given) s.lr = 1e-3;
  return s;
}

int train(const Settings& s) {
  fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  fabric.seed_everything(s.seed);

  const gpt2::Config config = s.tiny ? gpt2::Config::tiny() : gpt2::Config{};
  gpt2::GPT net(config);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(s.lr).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  fabric.print("gpt2: {} parameters, {} layers, width {}, on {}, bf16-mixed, batch {} x {} tokens",
               net->num_parameters(), config.n_layer, config.n_embd, fabric.device().str(), s.batch_size,
               config.block_size);

  // One batch of random tokens, drawn once on the device; the targets are the inputs shifted by one.
  const at::Tensor tokens = torch::randint(config.vocab_size, {s.batch_size, config.block_size + 1},
                                           torch::TensorOptions().dtype(torch::kLong).device(fabric.device()));
  const at::Tensor x = tokens.narrow(1, 0, config.block_size);
  const at::Tensor y = tokens.narrow(1, 1, config.block_size);
  const double tokens_per_step = static_cast<double>(s.batch_size * config.block_size);

  double first_loss = 0.0, last_loss = 0.0;
  for (int step = 0; step < s.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    const at::Tensor loss = gpt2::loss(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    last_loss = loss.item<double>();  // waits for the step to finish
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (step == 0) first_loss = last_loss;
    fabric.print("step {:4d}  loss {:.4f}  {:8.1f} ms  {:10.0f} tokens/s", step, last_loss, seconds * 1e3,
                 tokens_per_step / seconds);
  }
  if (s.expect_loss_decrease && !(last_loss < first_loss)) {
    fabric.print("gpt2: expected the loss to fall, found {:.4f} at the first step and {:.4f} at the last", first_loss,
                 last_loss);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Settings settings = parse_args(argc, argv);
    if (settings.help) {
      std::fputs(usage.data(), stdout);
      return 0;
    }
    return train(settings);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "gpt2: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt2: %s\n", e.what());
    return 1;
  }
}
