// Trains GPT-2 small with fabric in bf16-mixed precision, on the GPU when there is one, else on the
// CPU, on one batch of random tokens drawn once (the model learns it by heart, so the loss falls).
// It shows the training loop; bench/race.cpp times the same loop against others.
//
//     gpt2 --steps 50                                   # GPT-2 small, batch 8 x 1024 tokens
//     gpt2 --tiny --steps 3 --expect-loss-decrease      # a tiny GPT on the CPU (the smoke test)
//     gpt2 --log-every 10 --csv-dir logs                # tokens/s and MFU every 10 steps, also to a CSV file
//     gpt2 --help

#include "gpt2/gpt2.hpp"

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <fabric/fabric.hpp>
#include <fabric/utils/throughput.hpp>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

/// A bad command line (exit status 2): the message says what was expected and what was found. A
/// CLI::ValidationError thrown in an option's callback reaches CLI::App::parse's caller unchanged.
using UsageError = CLI::ValidationError;

/// The command-line settings of a run.
struct Settings {
  int steps = 20;
  int batch_size = 0;  // 0: 8 for GPT-2 small, 4 for --tiny
  double lr = 6e-4;
  std::uint64_t seed = 42;
  int log_every = 10;   // steps between the throughput lines (fabric::ThroughputMonitor)
  std::string csv_dir;  // where a CSVLogger writes the throughput metrics (none: not written)
  bool tiny = false;
  bool expect_loss_decrease = false;
  bool activation_checkpointing = false;
  bool chunked_loss = false;
  std::string precision = "bf16-mixed";  // or "bf16-master": bfloat16 weights, float32 masters in AdamW
};

constexpr std::string_view description = R"(usage: gpt2 [flags]

Trains GPT-2 small (12 layers, 12 heads, width 768, context 1024, vocabulary 50304; 124.5 M
parameters) with fabric::Fabric<Auto, SingleDevice, BF16Mixed> (Linear layers with the bias in the
GEMM; --chunked-loss: bfloat16 logits into fabric::nn::cross_entropy) and AdamW (weight decay 0.1) on one
batch of random tokens, and prints the loss, time and tokens per second of each step; every
--log-every steps fabric::ThroughputMonitor logs (and it prints) the tokens/s, FLOP/s and MFU of
those steps, the FLOPs counted by fabric::transformer_flops.)";

/// CLI11's help with the usage line first (it opens the description), then the flags.
class Help : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override { return {}; }
};

template <class T>
T parse_positive(std::string_view flag, std::string_view text) {
  T value{};
  const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc{} || end != text.data() + text.size() || !(value > T{})) {
    throw UsageError(fmt::format("expected a positive number after {}, found \"{}\"", flag, text));
  }
  return value;
}

/// Reads the command line with CLI11; returns nothing when it printed the help (--help).
std::optional<Settings> parse_args(int argc, char** argv) {
  Settings s;
  CLI::App app(std::string(description), "gpt2");
  app.formatter(std::make_shared<Help>());
  app.get_formatter()->column_width(27);
  app.option_defaults()->group("flags")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // A positive number: read into `into`, or refused in fabric's words.
  const auto positive = [&app](const std::string& flag, auto& into, const std::string& help) {
    return app
        .add_option_function<std::string>(
            flag,
            [flag, &into](const std::string& text) {
              into = parse_positive<std::remove_cvref_t<decltype(into)>>(flag, text);
            },
            help)
        ->type_name("N");
  };
  positive("--steps", s.steps, "optimizer steps (default 20)");
  positive("--batch-size", s.batch_size, "sequences per batch (default 8; 4 with --tiny)");
  const CLI::Option* lr =
      positive("--lr", s.lr, "learning rate of AdamW (default 0.0006; 0.001 with --tiny)")->type_name("X");
  positive("--seed", s.seed, "seed of the weights and the tokens (default 42)");
  positive("--log-every", s.log_every, "steps between throughput lines: tokens/s, FLOP/s, MFU (default 10)");
  app.add_option("--csv-dir", s.csv_dir, "log the throughput metrics with a CSVLogger under DIR")->type_name("DIR");
  app.add_flag("--tiny", s.tiny, "a tiny GPT (2 layers, 2 heads, width 64, 32 positions, 256 tokens)");
  app.add_flag("--activation-checkpointing", s.activation_checkpointing,
               "keep only the blocks' inputs in the forward; recompute each block in backward");
  app.add_flag("--chunked-loss", s.chunked_loss,
               "bfloat16 logits into fabric::nn::cross_entropy: no float32 copy of the logits (less memory; "
               "see the README's Speed section)");
  app.add_option_function<std::string>(
         "--precision",
         [&s](const std::string& text) {
           if (text != "bf16-mixed" && text != "bf16-master") {
             throw UsageError(fmt::format("expected --precision bf16-mixed or bf16-master, found \"{}\"", text));
           }
           s.precision = text;
         },
         "bf16-mixed (float32 weights, autocast) or bf16-master (bfloat16 weights, float32\n"
         "masters in AdamW: fabric::BF16Master) (default bf16-mixed)")
      ->type_name("NAME");
  app.add_flag("--expect-loss-decrease", s.expect_loss_decrease,
               "exit with status 1 unless the last loss is below the first (a smoke test)");
  app.set_help_flag("-h,--help", "print this and exit");  // after the others: listed last
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return std::nullopt;
  } catch (const CLI::ExtrasError&) {
    throw UsageError(fmt::format("unknown flag \"{}\"; run gpt2 --help for the list", app.remaining().front()));
  } catch (const CLI::ArgumentMismatch&) {
    // NOTE: CLI11 takes whatever follows a flag as its value, so only the last argument can lack one.
    throw UsageError(fmt::format("expected a value after {}, found none", argv[argc - 1]));
  }
  if (s.batch_size == 0) s.batch_size = s.tiny ? 4 : 8;
  if (s.tiny && lr->count() == 0) s.lr = 1e-3;
  return s;
}

template <class P>
int train(const Settings& s) {
  std::vector<std::shared_ptr<fabric::Logger>> loggers;
  if (!s.csv_dir.empty()) {
    loggers.push_back(
        std::make_shared<fabric::CSVLogger>(fabric::CSVLogger::Options{.root_dir = s.csv_dir, .name = "gpt2"}));
  }
  // NOTE: --chunked-loss: convert_output = false keeps the logits in bfloat16 and gpt2::loss
  // (fabric::nn::cross_entropy) computes the loss and the logits' gradient from them (one fused kernel on
  // CUDA), so no float32 copy of the 8 x 1024 x 50304 logits is made (2.8 GiB less at the peak on an H200).
  fabric::Fabric<fabric::Auto, fabric::SingleDevice, P> fabric{
      {.loggers = loggers}, fabric::SingleDevice{}, P({.convert_output = !s.chunked_loss})};
  fabric.seed_everything(s.seed);

  const gpt2::Config config = s.tiny ? gpt2::Config::tiny() : gpt2::Config{};
  gpt2::GPT net(config);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(s.lr).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  fabric.print("gpt2: {} parameters, {} layers, width {}, on {}, {}, batch {} x {} tokens", net->num_parameters(),
               config.n_layer, config.n_embd, fabric.device().str(), P::name, s.batch_size, config.block_size);

  if (s.activation_checkpointing) {
    const std::size_t n = fabric::apply_activation_checkpointing(net, fabric::module_types<gpt2::BlockImpl>());
    fabric.print("gpt2: activation checkpointing on for the {} blocks", n);
  }

  // One batch of random tokens, drawn once on the device; the targets are the inputs shifted by one.
  const at::Tensor tokens = torch::randint(config.vocab_size, {s.batch_size, config.block_size + 1},
                                           torch::TensorOptions().dtype(torch::kLong).device(fabric.device()));
  const at::Tensor x = tokens.narrow(1, 0, config.block_size);
  const at::Tensor y = tokens.narrow(1, 1, config.block_size);
  const std::int64_t tokens_per_step = s.batch_size * config.block_size;

  // Throughput: FLOPs per step by the 6 N + attention rule, the peak from fabric's table for this GPU in
  // bfloat16; the window holds the last --log-every steps (plus the update at time 0 before them).
  const double flops_per_step = fabric::transformer_flops({.parameters = net->num_parameters(),
                                                           .layers = config.n_layer,
                                                           .width = config.n_embd,
                                                           .context = config.block_size},
                                                          tokens_per_step);
  fabric::ThroughputMonitor monitor(fabric, {.window_size = s.log_every + 1, .using_sparse_model = false});
  const std::string device_name = fabric::cuda_device_name(fabric.device()).value_or(fabric.device().str());
  if (const auto peak = monitor.available_flops()) {
    fabric.print("gpt2: {:.3g} TFLOP per step; {} peaks at {:.1f} TFLOP/s in bfloat16 (MFU's denominator)",
                 flops_per_step / 1e12, device_name, *peak / 1e12);
  } else {
    fabric.print("gpt2: {:.3g} TFLOP per step; no peak FLOP/s known for {}, so no MFU", flops_per_step / 1e12,
                 device_name);
  }

  double first_loss = 0.0, last_loss = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  monitor.update({.time = 0, .batches = 0, .samples = 0, .lengths = 0, .flops = 0});
  for (int step = 0; step < s.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    const at::Tensor loss = s.chunked_loss ? gpt2::loss(model(x), y) : gpt2::float32_loss(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    last_loss = loss.item<double>();  // waits for the step to finish
    const auto end = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(end - start).count();
    if (step == 0) first_loss = last_loss;
    fabric.print("step {:4d}  loss {:.4f}  {:8.1f} ms  {:10.0f} tokens/s", step, last_loss, seconds * 1e3,
                 static_cast<double>(tokens_per_step) / seconds);

    const std::int64_t done = step + 1;
    monitor.update({.time = std::chrono::duration<double>(end - t0).count(),
                    .batches = done,
                    .samples = done * s.batch_size,
                    .lengths = done * tokens_per_step,
                    .flops = flops_per_step});
    if (done % s.log_every == 0) {
      const fabric::Metrics m = monitor.compute_and_log(done);
      std::string line = fmt::format("throughput of steps {}-{}: {:.0f} tokens/s, {:.3g} TFLOP/s", done - s.log_every,
                                     done - 1, m.at("device/items_per_sec"), m.at("device/flops_per_sec") / 1e12);
      if (const auto mfu = m.find("device/mfu"); mfu != m.end()) line += fmt::format(", MFU {:.3f}", mfu->second);
      fabric.print("{}", line);
    }
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
    const std::optional<Settings> settings = parse_args(argc, argv);
    if (!settings) return 0;
    return settings->precision == "bf16-master" ? train<fabric::BF16Master>(*settings)
                                                : train<fabric::BF16Mixed>(*settings);
  } catch (const CLI::ParseError& e) {  // a bad command line
    std::fprintf(stderr, "gpt2: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt2: %s\n", e.what());
    return 1;
  }
}
