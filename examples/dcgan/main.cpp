// Trains a small DCGAN on Fashion-MNIST with fabric: a generator and a discriminator, each with its own
// Adam, set up together; one checkpoint holds both models, both optimizers, the step and the noise
// generator's state, so a resumed run continues exactly where the saved one stopped.
//
//     dcgan                                                    # 300 steps, samples.pgm at the end
//     dcgan --steps 200 --checkpoint run/last.ckpt --checkpoint-every 100
//     dcgan --steps 400 --resume run/last.ckpt --checkpoint run/last.ckpt
//     dcgan --help

#include "fashion_mnist/fashion_mnist.hpp"

#include <torch/torch.h>
#include <CLI/CLI.hpp>
#include <fabric/fabric.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

/// A bad command line (exit status 2): the message says what was expected and what was found. A
/// CLI::ValidationError thrown in an option's callback reaches CLI::App::parse's caller unchanged.
using UsageError = CLI::ValidationError;

/// The command-line settings of a run.
struct Config {
  std::int64_t steps = 300;
  std::size_t batch_size = 64;
  double lr = 2e-4;
  std::int64_t latent = 32;
  std::optional<std::size_t> train_subset{};
  std::filesystem::path data_dir{fashion_mnist::default_data_dir};
  std::uint64_t seed = 42;
  std::int64_t print_every = 50;
  std::optional<std::filesystem::path> checkpoint{};
  std::optional<std::int64_t> checkpoint_every{};
  std::optional<std::filesystem::path> resume{};
  std::optional<std::filesystem::path> samples{};
  bool progress = true;
  std::optional<int> threads{};
  bool expect_learning = false;
};

constexpr std::string_view description = R"(usage: dcgan [flags]

Trains a small DCGAN on Fashion-MNIST with fabric::Fabric<Auto, SingleDevice, FP32>: a generator
(latent vector -> transposed convs 7x7 -> 14x14 -> 28x28 with batch norm, tanh) and a discriminator
(convs 28x28 -> 14x14 -> 7x7 -> a logit, batch norm, leaky ReLU), each with Adam (betas 0.5, 0.999).
Prints the losses every --print-every steps; --checkpoint saves both models, both optimizers, the
step and the noise generator in one file, --resume continues from one; --samples writes a grid of
64 generated images as a PGM file.)";

/// CLI11's help with the usage line first (it opens the description), then the flags.
class Help : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override { return {}; }
};

template <class T>
T parse_number(std::string_view flag, std::string_view text) {
  T value{};
  const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (err != std::errc{} || end != text.data() + text.size()) {
    throw UsageError(fmt::format("expected a number after {}, found \"{}\"", flag, text));
  }
  return value;
}

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
std::optional<Config> parse_args(int argc, char** argv) {
  Config c;
  CLI::App app(std::string(description), "dcgan");
  app.formatter(std::make_shared<Help>());
  app.get_formatter()->column_width(27);
  app.option_defaults()->group("flags")->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  // A flag with a value: `parse(flag, text)` reads it into `into`, or refuses it in fabric's words.
  const auto add = [&app](const std::string& flag, const char* type, auto& into, auto parse, const std::string& help) {
    app.add_option_function<std::string>(
           flag, [flag, &into, parse](const std::string& text) { into = parse(flag, text); }, help)
        ->type_name(type);
  };
  const auto path = [](std::string_view /*flag*/, std::string_view text) { return std::filesystem::path(text); };
  add("--steps", "N", c.steps, parse_positive<std::int64_t>,
      "train until step N; a resumed run counts from the checkpoint's step (default 300)");
  add("--batch-size", "N", c.batch_size, parse_positive<std::size_t>, "real images per step (default 64)");
  add("--lr", "X", c.lr, parse_positive<double>, "learning rate of both Adams (default 0.0002)");
  add("--latent", "N", c.latent, parse_positive<std::int64_t>, "size of the generator's noise vector (default 32)");
  add("--train-subset", "N", c.train_subset, parse_positive<std::size_t>,
      "train on the first N of the 60000 training images (default: all)");
  add("--data-dir", "PATH", c.data_dir, path,
      "directory of the Fashion-MNIST *-ubyte.gz files\n(default /usr/share/datasets/fashion-mnist)");
  add("--seed", "N", c.seed, parse_number<std::uint64_t>, "seed of the weights, data order and noise (default 42)");
  add("--print-every", "N", c.print_every, parse_positive<std::int64_t>, "print the losses every N steps (default 50)");
  add("--checkpoint", "PATH", c.checkpoint, path,
      "save both models, both optimizers, the step and the noise generator to\nPATH at the end (and every "
      "--checkpoint-every steps)");
  add("--checkpoint-every", "N", c.checkpoint_every, parse_positive<std::int64_t>,
      "also save the checkpoint every N steps (needs --checkpoint)");
  add("--resume", "PATH", c.resume, path, "continue from a checkpoint written by --checkpoint");
  add("--samples", "PATH", c.samples, path, "write an 8x8 grid of generated images to PATH (plain PGM)");
  app.add_flag("!--no-progress", c.progress, "no progress bar");
  add("--threads", "N", c.threads, parse_positive<int>, "intra-op threads of LibTorch (default: LibTorch's choice)");
  app.add_flag("--expect-learning", c.expect_learning,
               "exit with status 1 unless the discriminator's loss moved: the mean of the\n"
               "last quarter of the steps at least 10% away from the first step's (a smoke test)");
  app.set_help_flag("-h,--help", "print this and exit");  // after the others: listed last
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::fputs(app.help().c_str(), stdout);
    return std::nullopt;
  } catch (const CLI::ExtrasError&) {
    throw UsageError(fmt::format("unknown flag \"{}\"; run dcgan --help for the list", app.remaining().front()));
  } catch (const CLI::ArgumentMismatch&) {
    // NOTE: CLI11 takes whatever follows a flag as its value, so only the last argument can lack one.
    throw UsageError(fmt::format("expected a value after {}, found none", argv[argc - 1]));
  }
  if (c.checkpoint_every && !c.checkpoint) {
    throw UsageError("expected --checkpoint PATH with --checkpoint-every, found none");
  }
  return c;
}

/// The channels of the networks' hidden layers: the generator's 7x7 and 14x14 maps, the discriminator's
/// 14x14 and 7x7 maps (small, so that a step takes tens of milliseconds on two CPU cores).
constexpr std::int64_t wide = 32, narrow = 16;

/// The generator: a noise vector [N, latent] to an image [N, 1, 28, 28] in [-1, 1].
struct GeneratorImpl : torch::nn::Module {
  explicit GeneratorImpl(std::int64_t latent) {
    using namespace torch::nn;
    net = register_module(
        "net", Sequential(ConvTranspose2d(ConvTranspose2dOptions(latent, wide, 7).bias(false)),  // 7x7
                          BatchNorm2d(wide), ReLU(),
                          ConvTranspose2d(ConvTranspose2dOptions(wide, narrow, 4).stride(2).padding(1).bias(false)),
                          BatchNorm2d(narrow), ReLU(),                                                 // 14x14
                          ConvTranspose2d(ConvTranspose2dOptions(narrow, 1, 4).stride(2).padding(1)),  // 28x28
                          Tanh()));
  }

  /// Returns the images generated from noise [N, latent].
  torch::Tensor forward(const torch::Tensor& z) { return net->forward(z.view({z.size(0), z.size(1), 1, 1})); }

  torch::nn::Sequential net{nullptr};
};
TORCH_MODULE(Generator);

/// The discriminator: an image [N, 1, 28, 28] to a logit [N] (positive: real).
struct DiscriminatorImpl : torch::nn::Module {
  DiscriminatorImpl() {
    using namespace torch::nn;
    net = register_module("net",
                          Sequential(Conv2d(Conv2dOptions(1, narrow, 4).stride(2).padding(1)),  // 14x14
                                     LeakyReLU(LeakyReLUOptions().negative_slope(0.2)),
                                     Conv2d(Conv2dOptions(narrow, wide, 4).stride(2).padding(1).bias(false)),  // 7x7
                                     BatchNorm2d(wide), LeakyReLU(LeakyReLUOptions().negative_slope(0.2)),
                                     Conv2d(Conv2dOptions(wide, 1, 7))));  // 1x1
  }

  /// Returns the logits of images [N, 1, 28, 28].
  torch::Tensor forward(const torch::Tensor& x) { return net->forward(x).flatten(); }

  torch::nn::Sequential net{nullptr};
};
TORCH_MODULE(Discriminator);

/// Initialises the weights as DCGAN does: convolutions from N(0, 0.02), batch norm scales from N(1, 0.02).
void dcgan_init(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (const auto& m : module.modules()) {
    if (auto* conv = m->as<torch::nn::Conv2dImpl>()) {
      conv->weight.normal_(0.0, 0.02);
    } else if (auto* deconv = m->as<torch::nn::ConvTranspose2dImpl>()) {
      deconv->weight.normal_(0.0, 0.02);
    } else if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      bn->weight.normal_(1.0, 0.02);
      bn->bias.zero_();
    }
  }
}

/// Writes images [N, 1, 28, 28] in [-1, 1] as a grid of 8 columns to a plain (ASCII) PGM file.
void write_pgm(const std::filesystem::path& path, const torch::Tensor& images) {
  constexpr std::int64_t cols = 8, pad = 2, side = 28;
  const std::int64_t n = images.size(0);
  const std::int64_t rows = (n + cols - 1) / cols;
  const std::int64_t width = cols * (side + pad) + pad, height = rows * (side + pad) + pad;
  const torch::Tensor pixels =
      images.detach().cpu().add(1.0).mul(127.5).round().clamp(0, 255).to(torch::kUInt8).contiguous();
  std::vector<std::uint8_t> grid(static_cast<std::size_t>(width * height), 0);
  const std::uint8_t* p = pixels.data_ptr<std::uint8_t>();
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t x0 = pad + (i % cols) * (side + pad), y0 = pad + (i / cols) * (side + pad);
    for (std::int64_t y = 0; y < side; ++y) {
      for (std::int64_t x = 0; x < side; ++x) {
        grid[static_cast<std::size_t>((y0 + y) * width + x0 + x)] = p[(i * side + y) * side + x];
      }
    }
  }
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path);
  out << "P2\n# dcgan samples\n" << width << ' ' << height << "\n255\n";
  for (std::int64_t y = 0; y < height; ++y) {
    for (std::int64_t x = 0; x < width; ++x) {
      out << static_cast<int>(grid[static_cast<std::size_t>(y * width + x)]) << (x + 1 < width ? ' ' : '\n');
    }
  }
  if (!out.flush()) {
    fabric::detail::raise("dcgan: expected to write the samples to {}, found the file cannot be written",
                          path.string());
  }
}

double mean_of(const std::vector<double>& v, std::size_t first) {
  double sum = 0.0;
  for (std::size_t i = first; i < v.size(); ++i) sum += v[i];
  return sum / static_cast<double>(v.size() - first);
}

/// Trains; returns the exit status.
int train(const Config& config) {
  using Clock = std::chrono::steady_clock;
  if (config.threads) torch::set_num_threads(*config.threads);

  using F = fabric::Fabric<fabric::Auto, fabric::SingleDevice, fabric::FP32, fabric::ProgressBar>;
  F fabric({}, fabric::ProgressBar({.enabled = config.progress}));
  fabric.seed_everything(config.seed);

  fashion_mnist::FashionMNIST train_set({.root = config.data_dir, .subset = config.train_subset});
  const auto train_size = static_cast<std::int64_t>(*train_set.size());
  if (static_cast<std::int64_t>(config.batch_size) > train_size) {
    fabric::detail::raise("dcgan: expected --batch-size of at most the {} training images, found {}", train_size,
                          config.batch_size);
  }
  // NOTE: drop_last keeps every batch full, so batch norm never sees a tiny last batch.
  auto loader = fabric.dataloader(train_set.map(torch::data::transforms::Stack<>()),
                                  {.batch_size = config.batch_size, .shuffle = true, .drop_last = true});
  const std::int64_t steps_per_epoch = train_size / static_cast<std::int64_t>(config.batch_size);

  Generator g_net(config.latent);
  Discriminator d_net;
  dcgan_init(*g_net);
  dcgan_init(*d_net);
  torch::optim::Adam g_adam(g_net->parameters(), torch::optim::AdamOptions(config.lr).betas({0.5, 0.999}));
  torch::optim::Adam d_adam(d_net->parameters(), torch::optim::AdamOptions(config.lr).betas({0.5, 0.999}));
  auto [generator, g_optimizer] = fabric.setup(g_net, g_adam);
  auto [discriminator, d_optimizer] = fabric.setup(d_net, d_adam);

  // The noise of the training steps comes from a generator of its own, so its state can be saved with the
  // checkpoint (the global generator also drew the weights); the samples' noise is fixed by the seed.
  at::Generator noise = at::make_generator<at::CPUGeneratorImpl>(config.seed + 1);
  const torch::Tensor fixed_noise =
      torch::randn({64, config.latent}, at::make_generator<at::CPUGeneratorImpl>(config.seed + 2));

  std::int64_t step = 0;
  if (config.resume) {
    at::Tensor noise_state = noise.get_state();
    fabric::State state{{"generator", generator},     {"discriminator", discriminator},
                        {"g_optimizer", g_optimizer}, {"d_optimizer", d_optimizer},
                        {"step", std::ref(step)},     {"noise_generator", std::ref(noise_state)}};
    fabric.load(*config.resume, state);
    noise.set_state(noise_state);
    fabric.print("dcgan: resumed from {} at step {}", config.resume->string(), step);
  }
  const auto save = [&] {
    fabric.save(*config.checkpoint, {{"generator", generator},
                                     {"discriminator", discriminator},
                                     {"g_optimizer", g_optimizer},
                                     {"d_optimizer", d_optimizer},
                                     {"step", step},
                                     {"noise_generator", noise.get_state()}});
  };

  fabric.print("dcgan: {} train images, batches of {} ({} per epoch), steps {} to {}, lr {}, latent {}, on {}, {} {}",
               train_size, config.batch_size, steps_per_epoch, step, config.steps, config.lr, config.latent,
               fabric.device().str(), torch::get_num_threads(), torch::get_num_threads() == 1 ? "thread" : "threads");

  // The data order is the sampler's, drawn from the seed and the epoch: a resumed run starts the passes the
  // saved run had started (each begin() is a new epoch) and skips the batches it had used of the last one.
  for (std::int64_t e = 0; e < step / steps_per_epoch; ++e) loader.begin();
  std::int64_t skip = step % steps_per_epoch;

  const std::int64_t first_step = step;
  std::vector<double> d_losses;
  std::vector<double> g_losses;
  fabric.call(fabric::hooks::on_train_epoch_start, 0, config.steps);
  const auto start = Clock::now();
  generator->train();
  discriminator->train();
  while (step < config.steps) {
    for (auto& batch : loader) {
      if (skip > 0) {
        --skip;
        continue;
      }
      // The dataset's images are normalised by its mean and std; the generator's tanh gives [-1, 1].
      const torch::Tensor real =
          batch.data * (2 * fashion_mnist::FashionMNIST::pixel_std) + (2 * fashion_mnist::FashionMNIST::pixel_mean - 1);
      const std::int64_t n = real.size(0);
      const torch::Tensor ones = torch::ones({n}, real.options());
      const torch::Tensor zeros = torch::zeros({n}, real.options());
      const torch::Tensor fake = generator(fabric.to_device(torch::randn({n, config.latent}, noise)));

      // The discriminator: real images are 1, generated ones 0.
      d_optimizer.zero_grad();
      const torch::Tensor d_real = discriminator(real);
      const torch::Tensor d_fake = discriminator(fake.detach());
      const torch::Tensor d_loss = torch::nn::functional::binary_cross_entropy_with_logits(d_real, ones) +
                                   torch::nn::functional::binary_cross_entropy_with_logits(d_fake, zeros);
      fabric.backward(d_loss);
      d_optimizer.step();

      // The generator: its images should pass for real.
      g_optimizer.zero_grad();
      const torch::Tensor g_loss = torch::nn::functional::binary_cross_entropy_with_logits(discriminator(fake), ones);
      fabric.backward(g_loss);
      g_optimizer.step();

      const double d = d_loss.item<double>();
      const double g = g_loss.item<double>();
      d_losses.push_back(d);
      g_losses.push_back(g);
      fabric.log_dict({{"d_loss", d}, {"g_loss", g}}, step);
      fabric.call(fabric::hooks::on_train_batch_end, step);
      ++step;
      if (step % config.print_every == 0 || step == config.steps) {
        fabric.print("step {:5d}  d_loss {:.9g}  g_loss {:.9g}  D(x) {:.4f}  D(G(z)) {:.4f}", step, d, g,
                     torch::sigmoid(d_real).mean().item<double>(), torch::sigmoid(d_fake).mean().item<double>());
      }
      if (config.checkpoint_every && step % *config.checkpoint_every == 0 && step < config.steps) save();
      if (step == config.steps) break;
    }
  }
  fabric.call(fabric::hooks::on_train_end);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const std::int64_t trained = step - first_step;
  if (trained > 0) {
    fabric.print("dcgan: {} steps in {:.1f} s ({:.1f} ms per step); d_loss {:.4f} -> {:.4f}, g_loss {:.4f} -> {:.4f}",
                 trained, seconds, 1e3 * seconds / static_cast<double>(trained), d_losses.front(), d_losses.back(),
                 g_losses.front(), g_losses.back());
  }
  if (config.checkpoint) save();

  if (config.samples) {
    torch::NoGradGuard no_grad;
    generator->eval();
    write_pgm(*config.samples, generator(fabric.to_device(fixed_noise)));
    generator->train();
    fabric.print("dcgan: wrote 64 samples to {}", config.samples->string());
  }

  if (config.expect_learning) {
    // The first step's loss against the mean of the last quarter: a discriminator that learns nothing
    // (or a run that diverges) fails.
    const bool enough = d_losses.size() >= 4;
    const double first = enough ? d_losses.front() : 0.0;
    const double last = enough ? mean_of(d_losses, d_losses.size() - d_losses.size() / 4) : 0.0;
    const bool ok = enough && std::isfinite(last) && std::isfinite(g_losses.back()) &&
                    std::abs(last - first) >= 0.1 * std::abs(first);
    fabric.print("learning check: d_loss {:.4f} at the first step, {:.4f} over the last quarter: {}", first, last,
                 ok ? "it moved" : "it did NOT move by 10% (FAILED)");
    if (!ok) return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::optional<Config> config = parse_args(argc, argv);
    return config ? train(*config) : 0;
  } catch (const CLI::ParseError& e) {  // a bad command line
    std::fprintf(stderr, "dcgan: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dcgan: %s\n", e.what());
    return 1;
  }
}
