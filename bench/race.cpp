// bench_race: the C++ side of the race of bench/race.sh. Trains the reference workloads of
// shared BENCH.md (mlp in fp32 and bf16-mixed, GPT-2 small in bf16-mixed) with three C++ loops, one
// after the other in one process, and reports ms/step, tokens/s, MFU and peak GPU memory of each:
//
//   libtorch        a hand-written LibTorch loop: autocast switched on with LibTorch's own calls,
//                   loss.backward(), torch::optim::AdamW::step() (LibTorch's per-parameter step),
//                   zero_grad();
//   libtorch-fused  the same loop with the optimizer step of fabric (fabric::detail::optimizer_step:
//                   the multi-tensor / fused AdamW kernels), i.e. exactly fabric's work without
//                   fabric: fabric/libtorch-fused is fabric's overhead;
//   fabric          fabric::Fabric<CUDA or CPU, SingleDevice, FP32 or BF16Mixed>: setup, model(x),
//                   fabric.backward(loss), optimizer.step(), optimizer.zero_grad(); for gpt2 with
//                   BF16Mixed({.convert_output = false}): bfloat16 logits into fabric::nn::cross_entropy;
//   fabric-f32-loss (gpt2) the same fabric loop the float32 way: BF16Mixed's default output conversion
//                   (float32 logits) and LibTorch's cross-entropy on them (gpt2::float32_loss):
//                   fabric-f32-loss/fabric is what the loss path saves.
//
// Every loop uses the fast forms: fabric::nn::Linear (bias inside the GEMM for [B, T, C] inputs) and,
// for gpt2, the chunked cross-entropy on bfloat16 logits (the raw loops get bfloat16 logits from
// autocast), so libtorch-fused and fabric do the same work.
//
// Each loop builds its own model from the same seed, warms up, then times each step with CUDA
// events (a steady clock on the CPU); the median is reported. Peak GPU memory is the caching
// allocator's peak of allocated (and reserved) bytes from the loop's construction to its end.
//
//     bench_race --json race-cpp.json                    # all workloads on the GPU
//     bench_race --device cpu --workload mlp --steps 3 --warmup 1
//     bench_race --device cpu --workload gpt2 --gpt2-config tiny --steps 2 --warmup 1

#include "common.hpp"
#include "gpt2/gpt2.hpp"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using namespace bench;

struct Settings {
  std::string device = "auto";             // auto, cuda or cpu
  std::vector<std::string> workloads{};    // mlp-fp32, mlp-bf16-mixed, gpt2-bf16-mixed
  std::vector<std::string> competitors{};  // libtorch, libtorch-fused, fabric, fabric-f32-loss
  int steps = 0;                           // 0: the workload's default (mlp 300, gpt2 30)
  int warmup = -1;                         // -1: the workload's default (mlp 50, gpt2 10)
  std::string gpt2_config = "small";
  int gpt2_batch = 8;
  int loss_chunk_rows = 0;  // 0: fabric::nn::cross_entropy's default
  double peak_tflops = 790.0;
  std::string json{};
};

constexpr std::string_view description = R"(usage: bench_race [flags]

Times the training step of the reference workloads (shared BENCH.md) with C++ loops:
libtorch (hand-written, LibTorch's AdamW step), libtorch-fused (hand-written, fabric's multi-tensor
AdamW step), fabric, and for gpt2 fabric-f32-loss (fabric with float32 logits and LibTorch's
cross-entropy); prints ms/step (median), tokens/s, MFU and peak memory of each.)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Settings> parse_args(int argc, char** argv) {
  Settings s;
  CLI::App app(std::string(description), "bench_race");
  configure(app, 25);
  add_choice(app, "--device", s.device, {"auto", "cuda", "cpu"},
             "auto (CUDA when there is a GPU), cuda or cpu (default auto)")
      ->type_name("D");
  // Repeatable lists: one value after each occurrence (as race.py reads them), which may hold several names
  // separated by commas; the occurrences add up.
  const auto list = [&app](const std::string& flag, const char* type, auto add, const std::string& help) {
    app.add_option_function<std::vector<std::string>>(
           flag,
           [add](const std::vector<std::string>& names) {
             for (const auto& name : names) {
               if (!name.empty()) add(name);
             }
           },
           help)
        ->type_name(type)
        ->expected(1)
        ->allow_extra_args(false)
        ->delimiter(',')
        ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  };
  list(
      "--workload", "W",
      [&s](const std::string& w) {
        if (w == "all") {
          s.workloads.insert(s.workloads.end(), {"mlp-fp32", "mlp-bf16-mixed", "gpt2-bf16-mixed"});
        } else if (w == "mlp") {
          s.workloads.insert(s.workloads.end(), {"mlp-fp32", "mlp-bf16-mixed"});
        } else if (w == "gpt2" || w == "gpt2-bf16-mixed") {
          s.workloads.emplace_back("gpt2-bf16-mixed");
        } else if (w == "mlp-fp32" || w == "mlp-bf16-mixed") {
          s.workloads.push_back(w);
        } else {
          throw UsageError(
              fmt::format("expected mlp, mlp-fp32, mlp-bf16-mixed, gpt2 or all after --workload, found \"{}\"", w));
        }
      },
      "mlp (fp32 and bf16-mixed), mlp-fp32, mlp-bf16-mixed, gpt2 (bf16-mixed) or all;\n"
      "repeat or separate with commas (default all)");
  list(
      "--competitors", "LIST",
      [&s](const std::string& c) {
        if (c != "libtorch" && c != "libtorch-fused" && c != "fabric" && c != "fabric-f32-loss") {
          throw UsageError(fmt::format(
              "expected libtorch, libtorch-fused, fabric or fabric-f32-loss in --competitors, found \"{}\"", c));
        }
        s.competitors.push_back(c);
      },
      "comma-separated subset of libtorch,libtorch-fused,fabric,fabric-f32-loss\n"
      "(default all; fabric-f32-loss runs on gpt2 only)");
  add_int(app, "--steps", s.steps, 1, "timed steps (default: mlp 300, gpt2 30)");
  add_int(app, "--warmup", s.warmup, 0, "untimed steps first (default: mlp 50, gpt2 10)");
  add_choice(app, "--gpt2-config", s.gpt2_config, {"small", "tiny"},
             "small (GPT-2 small, 124.5 M parameters) or tiny (for CPU checks) (default small)")
      ->type_name("C");
  add_int(app, "--gpt2-batch", s.gpt2_batch, 1, "sequences per gpt2 batch (default 8)");
  add_int(app, "--loss-chunk-rows", s.loss_chunk_rows, 0,
          "rows per chunk of gpt2's fabric::nn::cross_entropy (default 0: equal chunks of at most 2^25 logits)");
  add_positive(app, "--peak-tflops", s.peak_tflops,
               "the card's peak for MFU (default 790, an H100's measured bf16 matmul)");
  app.add_option("--json", s.json, "write the results to PATH as JSON")->type_name("PATH");
  if (!parse(app, argc, argv)) return std::nullopt;
  if (s.workloads.empty()) s.workloads = {"mlp-fp32", "mlp-bf16-mixed", "gpt2-bf16-mixed"};
  if (s.competitors.empty()) s.competitors = {"libtorch", "libtorch-fused", "fabric", "fabric-f32-loss"};
  return s;
}

/// What a loop needs to know about a workload.
struct Workload {
  std::string name;  // mlp or gpt2
  bool bf16 = false;
  at::Tensor x, y;  // one batch, random, on the device
  double lr = 1e-3;
  double weight_decay = 1e-2;
  gpt2::Config gpt2{};
  fabric::nn::ChunkOptions loss_chunks{};  // gpt2's fabric::nn::cross_entropy
  double tokens_per_step = 0;              // tokens (gpt2) or samples (mlp)
  int steps = 0, warmup = 0;
};

/// One competitor's figures.
struct Result {
  std::string competitor;
  std::vector<double> ms;
  double wall_ms_mean = 0;
  std::int64_t params = 0;
  std::int64_t peak_allocated = 0, peak_reserved = 0;
  double last_loss = 0;
  std::string optimizer_kernels;
};

/// Runs warm-up and timed steps of `step` (which returns the loss) and fills the timing fields.
template <class Step>
void time_steps(const torch::Device& device, const Workload& w, Step&& step, Result& r) {
  at::Tensor loss;
  for (int i = 0; i < w.warmup; ++i) loss = step();
  synchronize(device);
  StepTimer timer(device, w.steps);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < w.steps; ++i) {
    timer.start();
    loss = step();
    timer.stop();
  }
  synchronize(device);
  r.wall_ms_mean =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / w.steps;
  r.ms = timer.ms();
  r.last_loss = loss.item<double>();
}

/// The hand-written LibTorch loop; `fused` steps with fabric's multi-tensor AdamW instead of
/// torch::optim::AdamW::step().
template <class Net>
Result run_raw(const torch::Device& device, const Workload& w, bool fused) {
  Result r{.competitor = fused ? "libtorch-fused" : "libtorch"};
  reset_memory(device);
  {
    Net net = build<Net>(w.gpt2);
    net->to(device);
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
    r.params = count(net->parameters());
    const auto step = [&] {
      at::Tensor loss;
      if (w.bf16) {
        RawAutocast autocast(device.type(), at::kBFloat16);
        loss = workload_loss<Net>(net->forward(w.x), w.y, w.loss_chunks);
      } else {
        loss = workload_loss<Net>(net->forward(w.x), w.y, w.loss_chunks);
      }
      loss.backward();
      if (fused) {
        fabric::detail::optimizer_step(adamw, nullptr);
      } else {
        adamw.step();
      }
      adamw.zero_grad();
      return loss;
    };
    time_steps(device, w, step, r);
    r.optimizer_kernels = fused ? kernels_name() : "own";
    synchronize(device);
    std::tie(r.peak_allocated, r.peak_reserved) = peak_memory(device);
  }
  return r;
}

/// The same loop through fabric; `float32_loss`: the precision's default output conversion and LibTorch's
/// cross-entropy on float32 logits, else (gpt2) bfloat16 logits into fabric::nn::cross_entropy.
template <class Net, class Fabric>
Result run_fabric(const torch::Device& device, const Workload& w, bool float32_loss) {
  Result r{.competitor = float32_loss ? "fabric-f32-loss" : "fabric"};
  reset_memory(device);
  {
    using P = typename Fabric::precision_type;
    const auto precision = [&]() -> P {
      if constexpr (std::is_same_v<P, fabric::BF16Mixed>) {
        if (w.name == "gpt2" && !float32_loss) return P({.convert_output = false});
      }
      return P{};
    };
    Fabric fabric({}, fabric::SingleDevice{}, precision());
    if (fabric.device() != device) {
      throw std::runtime_error(fmt::format("fabric chose {}, expected {}", fabric.device().str(), device.str()));
    }
    Net net = build<Net>(w.gpt2);
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
    auto [model, optimizer] = fabric.setup(net, adamw);
    r.params = count(net->parameters());
    const auto step = [&] {
      at::Tensor loss;
      if constexpr (std::is_same_v<Net, gpt2::GPT>) {
        loss = float32_loss ? gpt2::float32_loss(model(w.x), w.y) : gpt2::loss(model(w.x), w.y, w.loss_chunks);
      } else {
        loss = workload_loss<Net>(model(w.x), w.y);
      }
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();
      return loss;
    };
    time_steps(device, w, step, r);
    r.optimizer_kernels = kernels_name();
    synchronize(device);
    std::tie(r.peak_allocated, r.peak_reserved) = peak_memory(device);
  }
  return r;
}

template <class Net, class Precision>
Result run_competitor(const std::string& competitor, const torch::Device& device, const Workload& w) {
  if (competitor == "libtorch") return run_raw<Net>(device, w, false);
  if (competitor == "libtorch-fused") return run_raw<Net>(device, w, true);
  const bool float32_loss = competitor == "fabric-f32-loss";
  if (device.is_cuda())
    return run_fabric<Net, fabric::Fabric<fabric::CUDA, fabric::SingleDevice, Precision>>(device, w, float32_loss);
  return run_fabric<Net, fabric::Fabric<fabric::CPU, fabric::SingleDevice, Precision>>(device, w, float32_loss);
}

int run(const Settings& s) {
  const bool has_cuda = cuda_built() && torch::cuda::is_available();
  if (s.device == "cuda" && !has_cuda) {
    throw std::runtime_error(cuda_built() ? "--device cuda: no GPU is visible"
                                          : "--device cuda: this bench_race was built against a LibTorch without CUDA");
  }
  const torch::Device device = (s.device == "cuda" || (s.device == "auto" && has_cuda)) ? torch::Device(torch::kCUDA, 0)
                                                                                        : torch::Device(torch::kCPU);
  const gpt2::Config small{};
  const gpt2::Config config = s.gpt2_config == "tiny" ? gpt2::Config::tiny() : small;

  Json results = Json::array();
  fmt::print("bench_race on {} (LibTorch {}){}\n", device.str(), TORCH_VERSION,
             device.is_cuda() ? "" : " -- CPU times are for checking, not for the race");
  for (const auto& name : s.workloads) {
    Workload w;
    const bool gpt = name.rfind("gpt2", 0) == 0;
    w.name = gpt ? "gpt2" : "mlp";
    w.bf16 = name.find("bf16") != std::string::npos;
    w.steps = s.steps > 0 ? s.steps : gpt ? 30 : 300;
    w.warmup = s.warmup >= 0 ? s.warmup : gpt ? 10 : 50;
    torch::manual_seed(1);
    const auto on = torch::TensorOptions().device(device);
    double flops_per_step = 0;
    if (gpt) {
      w.gpt2 = config;
      w.loss_chunks.rows = s.loss_chunk_rows;
      w.lr = 6e-4;
      w.weight_decay = 0.1;
      const at::Tensor tokens =
          torch::randint(config.vocab_size, {s.gpt2_batch, config.block_size + 1}, on.dtype(torch::kLong));
      w.x = tokens.narrow(1, 0, config.block_size);
      w.y = tokens.narrow(1, 1, config.block_size);
      w.tokens_per_step = static_cast<double>(s.gpt2_batch * config.block_size);
    } else {
      w.x = torch::rand({256, 784}, on) * 0.9 + 0.1;  // in [0.1, 1): no zeros
      w.y = torch::randint(0, 10, {256}, on.dtype(torch::kLong));
      w.tokens_per_step = 256;
    }
    const std::string precision = w.bf16 ? "bf16-mixed" : "32-true";
    for (const auto& competitor : s.competitors) {
      if (competitor == "fabric-f32-loss" && !gpt) continue;  // the mlp's 256 x 10 logits: nothing to save
      Result r;
      if (gpt) {
        r = run_competitor<gpt2::GPT, fabric::BF16Mixed>(competitor, device, w);
      } else if (w.bf16) {
        r = run_competitor<Mlp, fabric::BF16Mixed>(competitor, device, w);
      } else {
        r = run_competitor<Mlp, fabric::FP32>(competitor, device, w);
      }
      // MFU (shared BENCH.md): 6 N per token, plus attention 12 L W T per token for gpt2.
      flops_per_step = 6.0 * static_cast<double>(r.params) * w.tokens_per_step;
      if (gpt) {
        flops_per_step +=
            12.0 * static_cast<double>(config.n_layer * config.n_embd * config.block_size) * w.tokens_per_step;
      }
      const double med = median(r.ms);
      const auto [lo, hi] = std::minmax_element(r.ms.begin(), r.ms.end());
      const double mfu = flops_per_step / (med * 1e-3) / (s.peak_tflops * 1e12);
      const double per_s = w.tokens_per_step / (med * 1e-3);
      fmt::print(
          "  {:<5} {:<10} {:<15} {:9.3f} ms/step (min {:.3f}, max {:.3f}, wall mean {:.3f})  {:10.0f} {}/s  MFU {:.3f} "
          " "
          "peak {:.2f} GiB (reserved {:.2f})  loss {:.4f}  AdamW {}\n",
          w.name, precision, r.competitor, med, *lo, *hi, r.wall_ms_mean, per_s, gpt ? "tok" : "samples", mfu,
          static_cast<double>(r.peak_allocated) / (1 << 30), static_cast<double>(r.peak_reserved) / (1 << 30),
          r.last_loss, r.optimizer_kernels);
      std::fflush(stdout);
      results.push_back({{"workload", w.name},
                         {"precision", precision},
                         {"competitor", r.competitor},
                         {"language", "C++"},
                         {"steps", w.steps},
                         {"warmup", w.warmup},
                         {"ms_median", med},
                         {"ms_min", *lo},
                         {"ms_max", *hi},
                         {"wall_ms_mean", r.wall_ms_mean},
                         {"params", r.params},
                         {"tokens_per_step", static_cast<std::int64_t>(w.tokens_per_step)},
                         {"per_s", per_s},
                         {"flops_per_step", flops_per_step},
                         {"mfu", mfu},
                         {"peak_allocated_bytes", r.peak_allocated},
                         {"peak_reserved_bytes", r.peak_reserved},
                         {"last_loss", r.last_loss},
                         {"optimizer_kernels", r.optimizer_kernels}});
    }
  }
  if (!s.json.empty()) {
    write_json(s.json, {{"device", device.str()},
                        {"torch", TORCH_VERSION},
                        {"peak_tflops", s.peak_tflops},
                        {"results", std::move(results)}});
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_race", [&] {
    const std::optional<Settings> settings = parse_args(argc, argv);
    return settings ? run(*settings) : 0;
  });
}
