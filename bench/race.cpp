// bench_race: the C++ side of the race of bench/race.sh. Trains the reference workloads of shared
// BENCH.md (mlp in fp32 and bf16-mixed, GPT-2 small in bf16-mixed) with these C++ loops and reports
// ms/step, tokens/s, MFU and peak GPU memory of each:
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
//                   (float32 logits) and LibTorch's cross-entropy on them (gpt2::float32_loss);
//   fabric-capture  the fabric loop recorded in one CUDA graph by fabric.capture and replayed per step
//                   (CUDA only; a step that cannot be captured is reported with fabric's reason);
//   fabric-master   (bf16 workloads, where fabric::BF16Master exists) bfloat16 weights with float32
//                   masters in the optimizer.
//
// Every loop uses the fast forms: fabric::nn::Linear (bias inside the GEMM for [B, T, C] inputs) and,
// for gpt2, the chunked cross-entropy on bfloat16 logits (the raw loops get bfloat16 logits from
// autocast), so libtorch-fused and fabric do the same work.
//
// Rounds: every competitor runs in each of --rounds rounds, the rounds alternating between the
// competitors (round 1: A B C, round 2: A B C, ...). In each round a competitor builds its model from
// the same seed, warms up, then times --steps steps with CUDA events (a steady clock on the CPU); the
// round's figure is the median step, the competitor's the median over its rounds. The first
// --check-steps losses of each round (from the same initial weights on the same batch) go to the JSON
// for race.py's loss check, with a fingerprint of the initial weights and of the batch. Peak GPU memory
// is the caching allocator's peak of allocated (and reserved) bytes from the loop's construction on.
//
// With --serve, bench_race reads commands from its standard input, one a line, so that race.py can
// alternate the C++ and the Python competitors round by round in two long-lived processes:
//   run WORKLOAD ROUND   runs one round of every C++ competitor on the workload; prints each result as
//                        a line "@result {json}", then "@done"
//   quit                 exits
//
//     bench_race --json race-cpp.json                    # all workloads on the GPU, 5 rounds
//     bench_race --device cpu --workload mlp --steps 3 --warmup 1 --rounds 2
//     bench_race --device cpu --workload gpt2 --gpt2-config tiny --steps 2 --warmup 1
//     bench_race --profile trace --workload mlp-fp32    # host time per phase, Kineto traces

#include "common.hpp"
#include "gpt2/gpt2.hpp"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// fabric::BF16Master (bfloat16 weights, float32 masters in the optimizer), where this fabric has it.
#if __has_include("fabric/precision/master.hpp")
#define BENCH_RACE_MASTER 1
#else
#define BENCH_RACE_MASTER 0
#endif

namespace {

using namespace bench;

const std::vector<std::string> all_competitors{"libtorch",        "libtorch-fused", "fabric",
                                               "fabric-f32-loss", "fabric-capture", "fabric-master"};

struct Settings {
  std::string device = "auto";             // auto, cuda or cpu
  std::vector<std::string> workloads{};    // mlp-fp32, mlp-bf16-mixed, gpt2-bf16-mixed
  std::vector<std::string> competitors{};  // of all_competitors
  int steps = 0;                           // 0: the workload's default (mlp 300, gpt2 30)
  int warmup = -1;                         // -1: the workload's default (mlp 50, gpt2 10)
  int rounds = 5;
  int check_steps = -1;  // -1: the workload's default (mlp 20, gpt2 10), at most the warm-up
  std::string gpt2_config = "small";
  int gpt2_batch = 8;
  int loss_chunk_rows = 0;  // 0: fabric::nn::cross_entropy's default
  double peak_tflops = 790.0;
  double break_lr = 1.0;    // the fabric competitor's lr times this (to show that the loss check fails)
  double break_loss = 1.0;  // the fabric competitor's loss times this
  bool serve = false;
  std::string profile{};  // path prefix of the profile's traces; empty: no profile
  int profile_steps = 200;
  std::string json{};
};

constexpr std::string_view description = R"(usage: bench_race [flags]

Times the training step of the reference workloads (shared BENCH.md) with C++ loops in alternating
rounds: libtorch (hand-written, LibTorch's AdamW step), libtorch-fused (hand-written, fabric's
multi-tensor AdamW step), fabric, fabric-f32-loss (gpt2: float32 logits and LibTorch's cross-entropy),
fabric-capture (fabric.capture's CUDA graph), fabric-master (fabric::BF16Master, where it exists);
prints ms/step (median over rounds of each round's median), tokens/s, MFU and peak memory of each.)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Settings> parse_args(int argc, char** argv) {
  Settings s;
  bool none = false;  // --competitors none: no C++ competitor (race.py with Python ones only)
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
      [&s, &none](const std::string& c) {
        if (c == "none") {
          none = true;
          return;
        }
        if (std::find(all_competitors.begin(), all_competitors.end(), c) == all_competitors.end()) {
          throw UsageError(fmt::format("expected {} in --competitors, found \"{}\"", one_of(all_competitors), c));
        }
        s.competitors.push_back(c);
      },
      "comma-separated subset of libtorch,libtorch-fused,fabric,fabric-f32-loss,\n"
      "fabric-capture,fabric-master (default all; fabric-f32-loss on gpt2 only,\n"
      "fabric-master on the bf16 workloads where fabric::BF16Master exists)");
  add_int(app, "--steps", s.steps, 1, "timed steps per round (default: mlp 300, gpt2 30)");
  add_int(app, "--warmup", s.warmup, 0, "untimed steps first in each round (default: mlp 50, gpt2 10)");
  add_int(app, "--rounds", s.rounds, 1, "rounds, alternating between the competitors (default 5)");
  add_int(app, "--check-steps", s.check_steps, 0,
          "losses of the first steps of each round kept for the loss check (default: mlp 20,\n"
          "gpt2 10; at most the warm-up)");
  add_choice(app, "--gpt2-config", s.gpt2_config, {"small", "tiny"},
             "small (GPT-2 small, 124.5 M parameters) or tiny (for CPU checks) (default small)")
      ->type_name("C");
  add_int(app, "--gpt2-batch", s.gpt2_batch, 1, "sequences per gpt2 batch (default 8)");
  add_int(app, "--loss-chunk-rows", s.loss_chunk_rows, 0,
          "rows per chunk of gpt2's fabric::nn::cross_entropy (default 0: equal chunks of at most 2^25 logits)");
  add_positive(app, "--peak-tflops", s.peak_tflops,
               "the card's peak for MFU (default 790, an H100's and H200's measured bf16 matmul)");
  add_positive(app, "--break-lr", s.break_lr,
               "multiplies the fabric competitor's learning rate (default 1; to show the loss check fails)");
  add_positive(app, "--break-loss", s.break_loss,
               "multiplies the fabric competitor's loss (default 1; to show the loss check fails)");
  app.add_flag("--serve", s.serve, "read commands (run WORKLOAD ROUND, quit) from the standard input (race.py)");
  app.add_option("--profile", s.profile,
                 "profile libtorch-fused against fabric instead of racing: host time per phase of the\n"
                 "step, and Kineto traces written to PREFIX-<workload>-<competitor>.json")
      ->type_name("PREFIX");
  add_int(app, "--profile-steps", s.profile_steps, 10, "steps per loop of --profile's host timing (default 200)");
  app.add_option("--json", s.json, "write the results to PATH as JSON")->type_name("PATH");
  if (!parse(app, argc, argv)) return std::nullopt;
  if (s.workloads.empty()) s.workloads = {"mlp-fp32", "mlp-bf16-mixed", "gpt2-bf16-mixed"};
  if (s.competitors.empty() && !none) s.competitors = all_competitors;
  return s;
}

/// What a loop needs to know about a workload.
struct Workload {
  std::string name;       // mlp or gpt2
  std::string precision;  // 32-true or bf16-mixed
  bool bf16 = false;
  at::Tensor x, y;  // one batch, random, on the device
  double lr = 1e-3;
  double weight_decay = 1e-2;
  gpt2::Config gpt2{};
  fabric::nn::ChunkOptions loss_chunks{};  // gpt2's fabric::nn::cross_entropy
  double tokens_per_step = 0;              // tokens (gpt2) or samples (mlp)
  double flops_per_token = 0;              // the attention term of BENCH.md's MFU (gpt2), per token
  int steps = 0, warmup = 0, check_steps = 0;
  double break_lr = 1.0, break_loss = 1.0;
};

/// One competitor's figures of one round.
struct Result {
  std::string competitor;
  std::vector<double> ms;
  double wall_ms_mean = 0;
  std::int64_t params = 0;
  std::int64_t peak_allocated = 0, peak_reserved = 0;
  double last_loss = 0;
  std::vector<double> first_losses;      // the losses of the round's first check_steps steps
  double params_sum = 0, params_sq = 0;  // the initial weights' fingerprint
  std::string optimizer_kernels;
  std::string note;  // e.g. why a step was not captured
  bool skipped = false;
};

/// The initial weights' fingerprint: their sum and sum of squares in float64 on the CPU.
void fingerprint(const std::vector<at::Tensor>& params, Result& r) {
  torch::NoGradGuard no_grad;
  r.params_sum = 0;
  r.params_sq = 0;
  for (const auto& p : params) {
    const at::Tensor d = p.detach().to(torch::kCPU, torch::kDouble);
    r.params_sum += d.sum().item<double>();
    r.params_sq += d.square().sum().item<double>();
  }
}

/// Runs warm-up and timed steps of `step` (which returns the loss) and fills the timing fields; the
/// losses of the first check_steps warm-up steps are kept (cloned: a captured step's loss is overwritten
/// by the next replay) and read after the warm-up.
template <class Step>
void time_steps(const torch::Device& device, const Workload& w, Step&& step, Result& r) {
  at::Tensor loss;
  std::vector<at::Tensor> first;
  for (int i = 0; i < w.warmup; ++i) {
    loss = step();
    if (i < w.check_steps) first.push_back(loss.detach().clone());
  }
  synchronize(device);
  for (const auto& l : first) r.first_losses.push_back(l.item<double>());
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

/// The forward of the hand-written loops, doing what fabric's precision does around it: under bf16-mixed
/// autocast for the forward only, the mlp's logits converted to float32 (BF16Mixed's default output
/// conversion), gpt2's left in bfloat16 (BF16Mixed({.convert_output = false})); the loss is computed
/// after it, outside autocast, as in the fabric loop.
template <class Net>
at::Tensor raw_forward(Net& net, const Workload& w, const torch::Device& device) {
  if (!w.bf16) return net->forward(w.x);
  at::Tensor out;
  {
    RawAutocast autocast(device.type(), at::kBFloat16);
    out = net->forward(w.x);
  }
  return w.name == "gpt2" ? out : out.to(torch::kFloat);
}

/// The hand-written LibTorch loop; `fused` steps with fabric's multi-tensor AdamW instead of
/// torch::optim::AdamW::step().
template <class Net>
Result run_raw(const torch::Device& device, const Workload& w, bool fused) {
  Result r{.competitor = fused ? "libtorch-fused" : "libtorch"};
  reset_memory(device);
  {
    Net net = build<Net>(w.gpt2);
    fingerprint(net->parameters(), r);
    net->to(device);
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
    r.params = count(net->parameters());
    const auto step = [&] {
      const at::Tensor loss = workload_loss<Net>(raw_forward(net, w, device), w.y, w.loss_chunks);
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

enum class Loop { eager, float32_loss, capture };

/// The same loop through fabric: `eager` as written; `float32_loss`: the precision's default output
/// conversion and LibTorch's cross-entropy on float32 logits, else (gpt2) bfloat16 logits into
/// fabric::nn::cross_entropy; `capture`: the eager step recorded by fabric.capture.
template <class Net, class Fabric>
Result run_fabric(const torch::Device& device, const Workload& w, Loop loop, const std::string& name) {
  Result r{.competitor = name};
  reset_memory(device);
  {
    using P = typename Fabric::precision_type;
    const auto precision = [&]() -> P {
      if constexpr (std::is_same_v<P, fabric::BF16Mixed>) {
        if (w.name == "gpt2" && loop != Loop::float32_loss) return P({.convert_output = false});
      }
      return P{};
    };
    Fabric fabric({}, fabric::SingleDevice{}, precision());
    if (fabric.device() != device) {
      throw std::runtime_error(fmt::format("fabric chose {}, expected {}", fabric.device().str(), device.str()));
    }
    Net net = build<Net>(w.gpt2);
    fingerprint(net->parameters(), r);
    const bool broken = name == "fabric";
    torch::optim::AdamW adamw(
        net->parameters(), torch::optim::AdamWOptions(w.lr * (broken ? w.break_lr : 1.0)).weight_decay(w.weight_decay));
    auto [model, optimizer] = fabric.setup(net, adamw);
    r.params = count(net->parameters());
    const double loss_factor = broken ? w.break_loss : 1.0;
    const auto step_on = [&, loss_factor](const at::Tensor& x, const at::Tensor& y) {
      at::Tensor loss;
      if constexpr (std::is_same_v<Net, gpt2::GPT>) {
        loss = loop == Loop::float32_loss ? gpt2::float32_loss(model(x), y) : gpt2::loss(model(x), y, w.loss_chunks);
      } else {
        loss = workload_loss<Net>(model(x), y);
      }
      if (loss_factor != 1.0) loss = loss * loss_factor;
      fabric.backward(loss);
      optimizer.step();
      // LibTorch's default (gradients set to none), as the raw loops; captured too: the recording's backward
      // then writes the gradients instead of adding them to zeros (no fill, no add kernels).
      optimizer.zero_grad();
      return loss;
    };
    if (loop == Loop::capture) {
      auto captured = fabric.capture(step_on);
      try {
        time_steps(
            device, w, [&] { return captured(w.x, w.y); }, r);
      } catch (const fabric::Error& e) {
        r.skipped = true;
        r.note = e.what();
      }
      if (!r.skipped && !captured.captured()) {
        r.skipped = true;
        r.note = "fabric.capture recorded no graph (fewer steps than its warm-up)";
      }
    } else {
      time_steps(
          device, w, [&] { return step_on(w.x, w.y); }, r);
    }
    r.optimizer_kernels = kernels_name();
    synchronize(device);
    std::tie(r.peak_allocated, r.peak_reserved) = peak_memory(device);
  }
  return r;
}

template <class Net, class Precision>
Result run_with(const std::string& competitor, const torch::Device& device, const Workload& w) {
  const Loop loop = competitor == "fabric-f32-loss"  ? Loop::float32_loss
                    : competitor == "fabric-capture" ? Loop::capture
                                                     : Loop::eager;
  if (device.is_cuda())
    return run_fabric<Net, fabric::Fabric<fabric::CUDA, fabric::SingleDevice, Precision>>(device, w, loop, competitor);
  return run_fabric<Net, fabric::Fabric<fabric::CPU, fabric::SingleDevice, Precision>>(device, w, loop, competitor);
}

template <class Net, class Precision>
Result run_competitor(const std::string& competitor, const torch::Device& device, const Workload& w) {
  if (competitor == "libtorch") return run_raw<Net>(device, w, false);
  if (competitor == "libtorch-fused") return run_raw<Net>(device, w, true);
  if (competitor == "fabric-master") {
#if BENCH_RACE_MASTER
    return run_with<Net, fabric::BF16Master>(competitor, device, w);
#else
    return Result{.competitor = competitor, .note = "this fabric has no fabric::BF16Master", .skipped = true};
#endif
  }
  if (competitor == "fabric-capture" && !device.is_cuda()) {
    return Result{.competitor = competitor, .note = "fabric.capture records CUDA graphs: CUDA only", .skipped = true};
  }
  return run_with<Net, Precision>(competitor, device, w);
}

/// Whether a competitor runs on a workload at all (else it is left out without a line).
bool runs_on(const std::string& competitor, const Workload& w) {
  if (competitor == "fabric-f32-loss") return w.name == "gpt2";  // the mlp's 256 x 10 logits: nothing to save
  if (competitor == "fabric-master") return w.bf16;
  return true;
}

/// The race's state: the device, the workloads' batches, the results.
class Race {
 public:
  explicit Race(const Settings& s) : s_(s) {
    const bool has_cuda = cuda_built() && torch::cuda::is_available();
    if (s.device == "cuda" && !has_cuda) {
      throw std::runtime_error(cuda_built()
                                   ? "--device cuda: no GPU is visible"
                                   : "--device cuda: this bench_race was built against a LibTorch without CUDA");
    }
    device_ = (s.device == "cuda" || (s.device == "auto" && has_cuda)) ? torch::Device(torch::kCUDA, 0)
                                                                       : torch::Device(torch::kCPU);
    card_ = card_name(device_);
  }

  const torch::Device& device() const { return device_; }
  const std::string& card() const { return card_; }
  Json& results() { return results_; }

  /// Returns the workload of a name (its batch drawn once from seed 1).
  Workload& workload(const std::string& name) {
    for (auto& w : workloads_) {
      if (w.first == name) return w.second;
    }
    if (name != "mlp-fp32" && name != "mlp-bf16-mixed" && name != "gpt2-bf16-mixed") {
      throw std::runtime_error(
          fmt::format("expected mlp-fp32, mlp-bf16-mixed or gpt2-bf16-mixed as the workload, found \"{}\"", name));
    }
    Workload w;
    const bool gpt = name.rfind("gpt2", 0) == 0;
    w.name = gpt ? "gpt2" : "mlp";
    w.bf16 = name.find("bf16") != std::string::npos;
    w.precision = w.bf16 ? "bf16-mixed" : "32-true";
    w.steps = s_.steps > 0 ? s_.steps : gpt ? 30 : 300;
    w.warmup = s_.warmup >= 0 ? s_.warmup : gpt ? 10 : 50;
    w.check_steps = std::min(s_.check_steps >= 0 ? s_.check_steps : gpt ? 10 : 20, w.warmup);
    w.break_lr = s_.break_lr;
    w.break_loss = s_.break_loss;
    torch::manual_seed(1);
    const auto on = torch::TensorOptions().device(device_);
    if (gpt) {
      w.gpt2 = s_.gpt2_config == "tiny" ? gpt2::Config::tiny() : gpt2::Config{};
      w.loss_chunks.rows = s_.loss_chunk_rows;
      w.lr = 6e-4;
      w.weight_decay = 0.1;
      const at::Tensor tokens =
          torch::randint(w.gpt2.vocab_size, {s_.gpt2_batch, w.gpt2.block_size + 1}, on.dtype(torch::kLong));
      w.x = tokens.narrow(1, 0, w.gpt2.block_size);
      w.y = tokens.narrow(1, 1, w.gpt2.block_size);
      w.tokens_per_step = static_cast<double>(s_.gpt2_batch * w.gpt2.block_size);
      w.flops_per_token = 12.0 * static_cast<double>(w.gpt2.n_layer * w.gpt2.n_embd * w.gpt2.block_size);
    } else {
      w.x = torch::rand({256, 784}, on) * 0.9 + 0.1;  // in [0.1, 1): no zeros
      w.y = torch::randint(0, 10, {256}, on.dtype(torch::kLong));
      w.tokens_per_step = 256;
    }
    workloads_.emplace_back(name, std::move(w));
    return workloads_.back().second;
  }

  /// Runs one round of every competitor on the workload; returns the results' JSON.
  std::vector<Json> run_round(const std::string& name, int round) {
    Workload& w = workload(name);
    std::vector<Json> out;
    for (const auto& competitor : s_.competitors) {
      if (!runs_on(competitor, w)) continue;
      Result r;
      if (w.name == "gpt2") {
        r = run_competitor<gpt2::GPT, fabric::BF16Mixed>(competitor, device_, w);
      } else if (w.bf16) {
        r = run_competitor<Mlp, fabric::BF16Mixed>(competitor, device_, w);
      } else {
        r = run_competitor<Mlp, fabric::FP32>(competitor, device_, w);
      }
      out.push_back(report(w, r, round));
    }
    return out;
  }

 private:
  Json report(const Workload& w, const Result& r, int round) {
    Json j = {{"workload", w.name},
              {"precision", w.precision},
              {"competitor", r.competitor},
              {"language", "C++"},
              {"round", round}};
    if (r.skipped) {
      fmt::print("  {:<5} {:<10} {:<15} round {}: not run: {}\n", w.name, w.precision, r.competitor, round, r.note);
      std::fflush(stdout);
      j["skipped"] = true;
      j["note"] = r.note;
      results_.push_back(j);
      return j;
    }
    // MFU (shared BENCH.md): 6 N per token, plus attention 12 L W T per token for gpt2.
    const double flops_per_step = (6.0 * static_cast<double>(r.params) + w.flops_per_token) * w.tokens_per_step;
    const double med = median(r.ms);
    const auto [lo, hi] = std::minmax_element(r.ms.begin(), r.ms.end());
    const double mfu = flops_per_step / (med * 1e-3) / (s_.peak_tflops * 1e12);
    const double per_s = w.tokens_per_step / (med * 1e-3);
    fmt::print(
        "  {:<5} {:<10} {:<15} round {}: {:9.3f} ms/step (min {:.3f}, max {:.3f}, wall mean {:.3f})  {:10.0f} {}/s  "
        "MFU {:.3f}  peak {:.2f} GiB (reserved {:.2f})  loss {:.4f} -> {:.4f}  AdamW {}\n",
        w.name, w.precision, r.competitor, round, med, *lo, *hi, r.wall_ms_mean, per_s,
        w.name == "gpt2" ? "tok" : "samples", mfu, static_cast<double>(r.peak_allocated) / (1 << 30),
        static_cast<double>(r.peak_reserved) / (1 << 30), r.first_losses.empty() ? r.last_loss : r.first_losses[0],
        r.last_loss, r.optimizer_kernels);
    std::fflush(stdout);
    j.update({{"steps", w.steps},
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
              {"first_losses", r.first_losses},
              {"last_loss", r.last_loss},
              {"params_sum", r.params_sum},
              {"params_sq", r.params_sq},
              {"batch_sum", w.x.to(torch::kDouble).sum().item<double>() + w.y.to(torch::kDouble).sum().item<double>()},
              {"optimizer_kernels", r.optimizer_kernels}});
    if (!r.note.empty()) j["note"] = r.note;
    results_.push_back(j);
    return j;
  }

  static std::string card_name(const torch::Device& device) {
#if defined(BENCH_RACE_CUDA)
    if (device.is_cuda()) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess) return prop.name;
      return "unknown CUDA device";
    }
#endif
    (void)device;
    return "CPU";
  }

  const Settings& s_;
  torch::Device device_{torch::kCPU};
  std::string card_;
  std::vector<std::pair<std::string, Workload>> workloads_;
  Json results_ = Json::array();
};

std::string versions() {
  std::string v = fmt::format("LibTorch {}, fabric {}.{}.{}, g++ {}", TORCH_VERSION, FABRIC_VERSION_MAJOR,
                              FABRIC_VERSION_MINOR, FABRIC_VERSION_PATCH, __VERSION__);
#if defined(BENCH_RACE_CUDA)
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess)
    v += fmt::format(", CUDA runtime {}.{}", runtime / 1000, (runtime % 1000) / 10);
#endif
  return v;
}

/// Prints the median over the rounds of each competitor (the figures race.py prints for both languages).
void print_summary(const Json& results) {
  std::vector<std::tuple<std::string, std::string, std::string>> keys;
  for (const auto& r : results) {
    if (r.contains("skipped")) continue;
    auto key = std::make_tuple(r["workload"].get<std::string>(), r["precision"].get<std::string>(),
                               r["competitor"].get<std::string>());
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) keys.push_back(key);
  }
  fmt::print("median over rounds (ms/step; each round's median in parentheses):\n");
  for (const auto& key : keys) {
    std::vector<double> ms;
    for (const auto& r : results) {
      if (!r.contains("skipped") && std::make_tuple(r["workload"].get<std::string>(), r["precision"].get<std::string>(),
                                                    r["competitor"].get<std::string>()) == key) {
        ms.push_back(r["ms_median"].get<double>());
      }
    }
    fmt::print("  {:<5} {:<10} {:<15} {:9.3f}  ({:.3f})\n", std::get<0>(key), std::get<1>(key), std::get<2>(key),
               median(ms), fmt::join(ms, ", "));
  }
}

// ---- the profile: where fabric's step spends more than the raw loop's --------------------------------

/// Host time of each phase of a step (no synchronisation: on a launch-bound step the host's issue time is
/// the step time), for the raw loop with the fused step and for fabric, in alternating blocks.
template <class Net, class Precision, class Accelerator>
void profile_workload(const Settings& s, Race& race, const std::string& name) {
  Workload& w = race.workload(name);
  const torch::Device& device = race.device();
  using Clock = std::chrono::steady_clock;
  using Fabric = fabric::Fabric<Accelerator, fabric::SingleDevice, Precision>;
  const auto precision = [&]() -> Precision {
    if constexpr (std::is_same_v<Precision, fabric::BF16Mixed>) {
      if (w.name == "gpt2") return Precision({.convert_output = false});
    }
    return Precision{};
  };
  Net raw_net = build<Net>(w.gpt2);
  raw_net->to(device);
  torch::optim::AdamW raw_opt(raw_net->parameters(), torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
  Fabric fab({}, fabric::SingleDevice{}, precision());
  Net fab_net = build<Net>(w.gpt2);
  torch::optim::AdamW fab_adamw(fab_net->parameters(), torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
  auto [model, optimizer] = fab.setup(fab_net, fab_adamw);

  // phase times in microseconds: forward and loss, backward, optimizer step, zero_grad
  using Phases = std::array<std::vector<double>, 4>;
  Phases raw_t, fab_t;
  const auto us = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };
  const auto raw_step = [&](Phases* t) {
    const auto t0 = Clock::now();
    const at::Tensor loss = workload_loss<Net>(raw_forward(raw_net, w, device), w.y, w.loss_chunks);
    const auto t1 = Clock::now();
    loss.backward();
    const auto t2 = Clock::now();
    fabric::detail::optimizer_step(raw_opt, nullptr);
    const auto t3 = Clock::now();
    raw_opt.zero_grad();
    const auto t4 = Clock::now();
    if (t) {
      (*t)[0].push_back(us(t0, t1)), (*t)[1].push_back(us(t1, t2)), (*t)[2].push_back(us(t2, t3));
      (*t)[3].push_back(us(t3, t4));
    }
  };
  const auto fab_step = [&](Phases* t) {
    const auto t0 = Clock::now();
    at::Tensor loss = workload_loss<Net>(model(w.x), w.y, w.loss_chunks);
    const auto t1 = Clock::now();
    fab.backward(loss);
    const auto t2 = Clock::now();
    optimizer.step();
    const auto t3 = Clock::now();
    optimizer.zero_grad();
    const auto t4 = Clock::now();
    if (t) {
      (*t)[0].push_back(us(t0, t1)), (*t)[1].push_back(us(t1, t2)), (*t)[2].push_back(us(t2, t3));
      (*t)[3].push_back(us(t3, t4));
    }
  };
  for (int i = 0; i < w.warmup; ++i) raw_step(nullptr), fab_step(nullptr);
  synchronize(device);
  // Alternating blocks of 10 steps, each block's end synchronised (so that one loop's queue does not
  // slow the other's launches); the block's wall time includes the GPU's.
  std::vector<double> raw_block, fab_block;
  for (int b = 0; b < s.profile_steps / 10; ++b) {
    for (int k = 0; k < 2; ++k) {
      const bool raw = (b + k) % 2 == 0;
      const auto t0 = Clock::now();
      for (int i = 0; i < 10; ++i) raw ? raw_step(&raw_t) : fab_step(&fab_t);
      synchronize(device);
      (raw ? raw_block : fab_block).push_back(us(t0, Clock::now()) / 10.0);
    }
  }
  const char* phase_names[] = {"forward+loss", "backward", "optimizer step", "zero_grad"};
  fmt::print("profile {} {}: host microseconds per phase (median of {} steps each, alternating blocks)\n", w.name,
             w.precision, raw_t[0].size());
  fmt::print("  {:<15} {:>14} {:>10} {:>9}\n", "phase", "libtorch-fused", "fabric", "fabric-raw");
  double raw_sum = 0, fab_sum = 0;
  for (int p = 0; p < 4; ++p) {
    const double a = median(raw_t[p]), b = median(fab_t[p]);
    raw_sum += a;
    fab_sum += b;
    fmt::print("  {:<15} {:14.1f} {:10.1f} {:+9.1f}\n", phase_names[p], a, b, b - a);
  }
  fmt::print("  {:<15} {:14.1f} {:10.1f} {:+9.1f}\n", "host sum", raw_sum, fab_sum, fab_sum - raw_sum);
  fmt::print("  {:<15} {:14.1f} {:10.1f} {:+9.1f}   (synchronised blocks of 10: wall per step)\n", "wall",
             median(raw_block), median(fab_block), median(fab_block) - median(raw_block));

  // Kineto traces of 5 steps of each loop (CPU operators and CUDA kernels), for bench/python/race_profile.py.
  namespace profiler = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  std::set<ActivityType> activities{ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/false, /*profile_memory=*/false,
                              /*with_stack=*/false, /*with_flops=*/false);
  for (const bool raw : {true, false}) {
    profiler::prepareProfiler(config, activities);
    profiler::enableProfiler(config, activities);
    for (int i = 0; i < 5; ++i) raw ? raw_step(nullptr) : fab_step(nullptr);
    synchronize(device);
    const auto result = profiler::disableProfiler();
    const std::string path =
        fmt::format("{}-{}-{}-{}.json", s.profile, w.name, w.precision, raw ? "libtorch-fused" : "fabric");
    try {
      result->save(path);
      fmt::print("  wrote {} ({} events)\n", path, result->events().size());
    } catch (const c10::Error& e) {  // Debian's LibTorch 1.13 is built without Kineto
      fmt::print("  no trace written: {}\n", e.what_without_backtrace());
    }
  }
  std::fflush(stdout);
}

template <class Accelerator>
void profile(const Settings& s, Race& race) {
  for (const auto& name : s.workloads) {
    if (name == "gpt2-bf16-mixed") {
      profile_workload<gpt2::GPT, fabric::BF16Mixed, Accelerator>(s, race, name);
    } else if (name == "mlp-bf16-mixed") {
      profile_workload<Mlp, fabric::BF16Mixed, Accelerator>(s, race, name);
    } else {
      profile_workload<Mlp, fabric::FP32, Accelerator>(s, race, name);
    }
  }
}

int run(const Settings& s) {
  Race race(s);
  fmt::print("bench_race on {} ({}; {}){}\n", race.device().str(), race.card(), versions(),
             race.device().is_cuda() ? "" : " -- CPU times are for checking, not for the race");
  std::fflush(stdout);
  if (!s.profile.empty()) {
    if (race.device().is_cuda()) {
      profile<fabric::CUDA>(s, race);
    } else {
      profile<fabric::CPU>(s, race);
    }
    return 0;
  }
  if (s.serve) {
    fmt::print("@info {}\n",
               Json{{"device", race.device().str()}, {"card", race.card()}, {"versions", versions()}}.dump());
    std::fflush(stdout);
    std::string line;
    while (std::getline(std::cin, line)) {
      std::istringstream in(line);
      std::string command, workload;
      int round = 0;
      in >> command;
      if (command == "quit") break;
      if (command != "run" || !(in >> workload >> round)) {
        throw std::runtime_error(
            fmt::format("--serve: expected \"run WORKLOAD ROUND\" or \"quit\", found \"{}\"", line));
      }
      for (const auto& j : race.run_round(workload, round)) fmt::print("@result {}\n", j.dump());
      fmt::print("@done\n");
      std::fflush(stdout);
    }
    return 0;
  }
  for (const auto& name : s.workloads) {
    for (int round = 1; round <= s.rounds; ++round) race.run_round(name, round);
  }
  print_summary(race.results());
  if (!s.json.empty()) {
    write_json(s.json, {{"device", race.device().str()},
                        {"card", race.card()},
                        {"versions", versions()},
                        {"torch", TORCH_VERSION},
                        {"peak_tflops", s.peak_tflops},
                        {"rounds", s.rounds},
                        {"results", std::move(race.results())}});
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
