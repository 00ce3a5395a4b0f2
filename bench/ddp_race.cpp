// bench_ddp_race: fabric's DDP and FSDP on several GPUs (or Gloo processes on the CPU), for bench/multi_gpu.sh.
// One workload per run; two modes:
//
//   time   fabric's training step on --devices N: N = 1 is Fabric<Auto, SingleDevice, P> (the
//          one-GPU baseline, no DDP); N > 1 is Fabric<Auto, DDP, P> over N processes started by
//          fabric.launch(), each with its own batch of --batch rows (global batch N x batch). Steps are
//          timed with CUDA events on every rank (a steady clock on the CPU); rank 0's median is the
//          figure, the slowest rank's median is printed beside it. With --strategy fsdp it is
//          Fabric<Auto, FSDP, P> on any N (1 too): --sharding, the GPT-2 Block as the unit,
//          --checkpointing for activation checkpointing of the blocks. A CUDA out-of-memory error ends
//          every process with exit code 3 and the line "bench_ddp_race: out of memory" (the largest
//          model search of bench/multi_gpu.sh fsdp-largest counts on it).
//   check  N processes train with DDP on the same global batches as a one-device reference that each
//          process also trains on its own device: the global batch in N slices of --batch rows, the
//          mean of the slices' gradients (the global batch's gradient), the same fused AdamW step. The
//          first step's gradients must agree within --grad-tolerance; after --steps steps the
//          parameters must agree within --tolerance (relative to how far training moved them), and
//          all ranks must hold the same parameters. The check runs with LibTorch's deterministic
//          algorithms, and prints as a control how far the one-device gradient computed twice differs.
//          With --strategy fsdp the same against FSDP (the one device is what DDP equals, so FSDP is
//          checked against DDP on the same global batches); the parameters are read inside
//          summon_full_params, and the first gradients are not compared (FSDP keeps only shards of them).
//
//     bench_ddp_race --mode check --workload gpt2 --devices 2 --steps 10
//     bench_ddp_race --mode time --workload gpt2 --devices 2 --json ddp-gpt2-2.json
//     bench_ddp_race --mode time --workload mlp-fp32 --devices 2 --kill-rank 1 --kill-at-step 20
//     bench_ddp_race --mode check --workload gpt2 --devices 4 --strategy fsdp --sharding shard_grad_op --checkpointing
//     bench_ddp_race --mode time --workload gpt2 --devices 8 --strategy fsdp --n-layer 48 --n-embd 1600
//
// The optimizer is AdamW as in the race (bench/race.cpp), with fabric's fused or multi-tensor step.

#include <fabric/distributed.hpp>
#include "common.hpp"
#include "gpt2/gpt2.hpp"

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <stdlib.h>

namespace {

using namespace bench;

struct Settings {
  std::string mode = "time";  // time or check
  std::string workload;       // mlp-fp32, mlp-bf16-mixed or gpt2
  int devices = 1;
  int steps = 0;    // 0: time mlp 300, gpt2 30; check 10
  int warmup = -1;  // -1: mlp 50, gpt2 10
  int batch = 0;    // rows per device; 0: mlp 256, gpt2 8
  std::string gpt2_config = "small";
  double tolerance = 0;  // 0: 1e-3 for mlp-fp32, 5e-2 for bf16-mixed
  double grad_tolerance = 1e-5;
  double abs_tolerance = 0;  // 0: 2 x lr x steps
  bool nondeterministic = false;
  bool ddp_on_one = false;
  int kill_rank = -1;
  int kill_at_step = -1;
  int timeout_s = 60;
  double bucket_cap_mb = 25.0;
  bool grad_as_view = false;
  bool static_graph = false;
  std::string comm_hook = "none";
  std::string strategy = "ddp";         // ddp or fsdp
  std::string sharding = "full_shard";  // fsdp: full_shard, shard_grad_op or no_shard
  bool checkpointing = false;           // fsdp: activation checkpointing of the GPT-2 blocks
  int n_layer = 0;                      // gpt2: 0 keeps the config's
  int n_embd = 0;
  int n_head = 0;  // 0: the config's, or n_embd / 64 with --n-embd
  double peak_tflops = 790.0;
  std::string json;
};

constexpr std::string_view description = R"(usage: bench_ddp_race --workload W [flags]

Times fabric's DDP training step over N processes (--mode time), or checks that N processes with DDP
train the same parameters as one device on the same global batches (--mode check).)";

/// Reads the command line; returns nothing when it printed the help.
std::optional<Settings> parse_args(int argc, char** argv) {
  Settings s;
  CLI::App app(std::string(description), "bench_ddp_race");
  configure(app, 23);
  add_choice(app, "--mode", s.mode, {"time", "check"}, "time or check (default time)")->type_name("M");
  app.add_option_function<std::string>(
         "--workload",
         [&s](const std::string& text) {
           s.workload = text == "gpt2-bf16-mixed" ? "gpt2" : text;
           if (s.workload != "mlp-fp32" && s.workload != "mlp-bf16-mixed" && s.workload != "gpt2") {
             throw UsageError(
                 fmt::format("expected mlp-fp32, mlp-bf16-mixed or gpt2 after --workload, found \"{}\"", text));
           }
         },
         "mlp-fp32, mlp-bf16-mixed or gpt2 (bf16-mixed); required")
      ->type_name("W");
  add_int(app, "--devices", s.devices, 1, "processes, one GPU each (default 1; time with 1 = one device without DDP)");
  app.add_flag("--ddp", s.ddp_on_one, "time: DDP even on one device (a world of one: the Reducer's own cost)");
  add_int(app, "--steps", s.steps, 1, "time: timed steps (mlp 300, gpt2 30); check: steps (10)");
  add_int(app, "--warmup", s.warmup, 0, "untimed steps first (mlp 50, gpt2 10)");
  add_int(app, "--batch", s.batch, 1, "rows per device: samples (mlp, default 256) or sequences (gpt2, default 8)");
  add_choice(app, "--gpt2-config", s.gpt2_config, {"small", "tiny"},
             "small (GPT-2 small) or tiny (for CPU checks) (default small)")
      ->type_name("C");
  add_positive(app, "--tolerance", s.tolerance,
               "check: largest |DDP - one device| / |one device - initial| of the parameters\n"
               "after the last step (L2 over all parameters) that passes (default 1e-3 for\n"
               "mlp-fp32, 5e-2 for bf16-mixed)");
  add_positive(app, "--abs-tolerance", s.abs_tolerance,
               "check: largest max |DDP or FSDP - one device| of a parameter element after the\n"
               "last step that passes (default 2 x lr x steps: AdamW moves an element by about\n"
               "lr a step, so two runs can differ by at most about that; the relative drift is the\n"
               "sharp check)");
  add_positive(app, "--grad-tolerance", s.grad_tolerance,
               "check: largest |DDP - one device| / |one device| of the first step's gradients\n"
               "(L2 over all parameters) that passes (default 1e-5)");
  app.add_flag("--nondeterministic", s.nondeterministic,
               "check: leave the device's non-deterministic kernels on (by default the check\n"
               "runs with LibTorch's deterministic algorithms, as torch.use_deterministic_algorithms)");
  add_int(app, "--kill-rank", s.kill_rank, 0, "fault injection (time): rank R kills itself with SIGKILL ...")
      ->type_name("R");
  add_int(app, "--kill-at-step", s.kill_at_step, 0, "... at step S (counting warm-up steps)")->type_name("S");
  add_int(app, "--timeout-s", s.timeout_s, 1, "DDP's collective timeout (default 60)")->type_name("S");
  add_positive(app, "--bucket-cap-mb", s.bucket_cap_mb, "DDP's bucket size (default 25, as PyTorch's and Lightning's)");
  app.add_flag("--grad-as-view", s.grad_as_view,
               "DDP's gradient_as_bucket_view (default off, as PyTorch's and Lightning's)");
  app.add_flag("--static-graph", s.static_graph, "DDP's static_graph (default off)");
  add_choice(app, "--comm-hook", s.comm_hook, {"none", "fp16", "bf16"},
             "DDP's gradient compression: none, fp16 or bf16 (default none)")
      ->type_name("H");
  add_choice(app, "--strategy", s.strategy, {"ddp", "fsdp"}, "ddp or fsdp (default ddp)")->type_name("S");
  add_choice(app, "--sharding", s.sharding, {"full_shard", "shard_grad_op", "no_shard"},
             "fsdp: full_shard, shard_grad_op or no_shard (default full_shard)")
      ->type_name("S");
  app.add_flag("--checkpointing", s.checkpointing, "fsdp, gpt2: activation checkpointing of the blocks");
  add_int(app, "--n-layer", s.n_layer, 1, "gpt2: blocks (default the config's: small 12)");
  add_int(app, "--n-embd", s.n_embd, 1, "gpt2: width (default the config's: small 768)");
  add_int(app, "--n-head", s.n_head, 1, "gpt2: attention heads (default the config's, or width / 64)");
  add_positive(app, "--peak-tflops", s.peak_tflops, "the card's peak for MFU (default 790)");
  app.add_option("--json", s.json, "rank 0 writes the results to PATH")->type_name("PATH");
  std::string tag;  // ignored
  app.add_option("--tag", tag, "ignored (names the processes of a run for pgrep)")->type_name("T");
  if (!parse(app, argc, argv)) return std::nullopt;
  if (s.workload.empty()) throw UsageError("expected --workload mlp-fp32, mlp-bf16-mixed or gpt2, found none");
  if ((s.kill_rank >= 0) != (s.kill_at_step >= 0)) {
    throw UsageError("expected --kill-rank and --kill-at-step together, found only one of them");
  }
  if (s.kill_rank >= s.devices) {
    throw UsageError(fmt::format("expected --kill-rank below --devices = {}, found {}", s.devices, s.kill_rank));
  }
  const bool gpt = s.workload == "gpt2";
  if (s.strategy != "fsdp" && (s.checkpointing || s.sharding != "full_shard")) {
    throw UsageError("expected --strategy fsdp with --sharding and --checkpointing, found --strategy ddp");
  }
  if (s.checkpointing && !gpt) throw UsageError("expected --workload gpt2 with --checkpointing (the blocks)");
  if (!gpt && (s.n_layer || s.n_embd || s.n_head)) {
    throw UsageError("expected --workload gpt2 with --n-layer, --n-embd and --n-head");
  }
  if (s.steps == 0) s.steps = s.mode == "check" ? 10 : gpt ? 30 : 300;
  if (s.warmup < 0) s.warmup = s.mode == "check" ? 0 : gpt ? 10 : 50;
  if (s.batch == 0) s.batch = gpt ? 8 : 256;
  // NOTE: under bf16-mixed, a last-bit difference of a float32 weight can flip its bfloat16 rounding
  // in the forward, and AdamW turns last-bit differences of gradient sums that cancel into full-size
  // updates: when the all-reduce adds in another order than the one device does (3 ranks, or a ring
  // over 4 and more), the parameters drift apart by a few percent of their movement within 5 steps
  // although the first gradients agree to 1e-7 (bench/README.md). Sums in the same order agree exactly.
  if (s.tolerance == 0) s.tolerance = s.workload == "mlp-fp32" ? 1e-3 : 5e-2;
  return s;
}

/// The workload of a run: model configuration, optimizer settings, batch geometry.
struct Workload {
  bool gpt = false;
  bool bf16 = false;
  gpt2::Config gpt2{};
  double lr = 1e-3;
  double weight_decay = 1e-2;
  std::int64_t batch = 0;     // rows per device
  double tokens_per_row = 1;  // gpt2: block_size tokens per sequence
  std::string precision() const { return bf16 ? "bf16-mixed" : "32-true"; }
  std::string name() const { return gpt ? "gpt2" : "mlp"; }
};

/// `rows` random rows of inputs and targets (never zeros) from a generator seeded with `seed`, on `device`.
std::pair<at::Tensor, at::Tensor> make_batch(const Workload& w, std::int64_t rows, std::uint64_t seed,
                                             const c10::Device& device) {
  auto gen = at::detail::createCPUGenerator(seed);
  if (w.gpt) {
    const auto t = w.gpt2.block_size;
    const at::Tensor tokens = at::randint(w.gpt2.vocab_size, {rows, t + 1}, gen, at::TensorOptions(at::kLong));
    return {tokens.narrow(1, 0, t).contiguous().to(device), tokens.narrow(1, 1, t).contiguous().to(device)};
  }
  const at::Tensor x = at::rand({rows, 784}, gen) * 0.9 + 0.1;  // in [0.1, 1)
  return {x.to(device), at::randint(10, {rows}, gen, at::TensorOptions(at::kLong)).to(device)};
}

torch::optim::AdamW make_adamw(const Workload& w, const std::vector<at::Tensor>& params) {
  return torch::optim::AdamW(params, torch::optim::AdamWOptions(w.lr).weight_decay(w.weight_decay));
}

/// What a run prints and writes.
struct Report {
  Json json;  // the members of the run's JSON object
  bool ok = true;
};

/// How the runs name their strategy: "device", "DDP", "FSDP full_shard" (+ " ckpt").
template <class F>
std::string strategy_label(const Settings& s) {
  using S = std::remove_cvref_t<decltype(std::declval<F&>().strategy())>;
  if constexpr (std::is_same_v<S, fabric::DDP>) {
    return "DDP";
  } else if constexpr (std::is_same_v<S, fabric::FSDP>) {
    return "FSDP " + s.sharding + (s.checkpointing ? " ckpt" : "");
  } else {
    return "device";
  }
}

template <class F>
constexpr bool is_fsdp = std::is_same_v<std::remove_cvref_t<decltype(std::declval<F&>().strategy())>, fabric::FSDP>;

template <class Net, class F>
Report time_steps(F& fabric, const Workload& w, const Settings& s) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const c10::Device device = fabric.device();
  reset_memory(device);
  Net net = build<Net>(w.gpt2);
  auto adamw = make_adamw(w, net->parameters());
  auto [model, optimizer] = fabric.setup(net, adamw);
  const auto [x, y] = make_batch(w, w.batch, 1000 + static_cast<std::uint64_t>(rank), device);
  at::Tensor loss;
  const auto step = [&](int i) {
    if (i == s.kill_at_step && rank == s.kill_rank) {
      std::fprintf(stderr, "bench_ddp_race: rank %d kills itself (SIGKILL) at step %d\n", rank, i);
      std::fflush(stderr);
      std::raise(SIGKILL);
    }
    loss = workload_loss<Net>(model(x), y);
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
  };
  for (int i = 0; i < s.warmup; ++i) step(i);
  synchronize(device);
  fabric.barrier();
  StepTimer timer(device, s.steps);
  for (int i = 0; i < s.steps; ++i) {
    timer.start();
    step(s.warmup + i);
    timer.stop();
  }
  synchronize(device);
  const auto ms = timer.ms();
  const double med = median(ms);
  const auto [peak_allocated, peak_reserved] = peak_memory(device);
  const double slowest = fabric.all_reduce(med, fabric::ReduceOp::max).template item<double>();
  // The largest peak of any rank (FSDP's ranks hold different shards and the last one the padding).
  const auto peak_max = static_cast<std::int64_t>(
      fabric.all_reduce(static_cast<double>(peak_allocated), fabric::ReduceOp::max).template item<double>());
  const double mean_loss = fabric.all_reduce(loss.detach().to(at::kDouble)).template item<double>();
  const std::int64_t params = count(net->parameters());
  const double rows = static_cast<double>(w.batch) * world;
  const double tokens = rows * w.tokens_per_row;
  double flops = 6.0 * static_cast<double>(params) * tokens;
  if (w.gpt) flops += 12.0 * static_cast<double>(w.gpt2.n_layer * w.gpt2.n_embd * w.gpt2.block_size) * tokens;
  const double per_s = tokens / (med * 1e-3);
  const double mfu = flops / (med * 1e-3) / (s.peak_tflops * 1e12 * world);
  fabric.print(
      "  {:<5} {:<10} {} x {:<7} {:9.3f} ms/step (slowest rank {:.3f})  {:10.0f} {}/s ({:.0f} per device)  MFU {:.3f}  "
      "peak {:.2f} GiB (reserved {:.2f})  loss {:.4f}  AdamW {}",
      w.name(), w.precision(), world, strategy_label<F>(s), med, slowest, per_s, w.gpt ? "tok" : "samples",
      per_s / world, mfu, static_cast<double>(peak_allocated) / (1 << 30),
      static_cast<double>(peak_reserved) / (1 << 30), mean_loss, kernels_name());
  return {Json{{"ms_median", med},
               {"ms_median_slowest_rank", slowest},
               {"steps", s.steps},
               {"warmup", s.warmup},
               {"params", params},
               {"global_rows", w.batch * world},
               {"tokens_per_step", static_cast<std::int64_t>(tokens)},
               {"per_s", per_s},
               {"per_s_per_device", per_s / world},
               {"flops_per_step", flops},
               {"mfu", mfu},
               {"peak_allocated_bytes", peak_allocated},
               {"peak_reserved_bytes", peak_reserved},
               {"peak_allocated_bytes_max_rank", peak_max},
               {"last_loss", mean_loss},
               {"optimizer_kernels", kernels_name()}}};
}

template <class Net, class F>
Report check(F& fabric, const Workload& w, const Settings& s) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const c10::Device device = fabric.device();
  Net net = build<Net>(w.gpt2);
  Net reference = build<Net>(w.gpt2);
  reference->to(device);
  std::vector<at::Tensor> initial;
  for (const auto& p : reference->parameters()) initial.push_back(p.detach().clone());
  auto adamw = make_adamw(w, net->parameters());
  auto ref_adamw = make_adamw(w, reference->parameters());
  auto [model, optimizer] = fabric.setup(net, adamw);
  double ddp_loss = 0;
  double ref_loss = 0;
  double grad_drift = 0;
  double noise = 0;
  const auto ref_params = reference->parameters();
  // The relative L2 distance of two gradients, over all parameters.
  const auto distance = [](const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
    torch::NoGradGuard no_grad;
    double diff_sq = 0, norm_sq = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
      diff_sq += (a[i].to(at::kDouble) - b[i].to(at::kDouble)).pow(2).sum().template item<double>();
      norm_sq += b[i].to(at::kDouble).pow(2).sum().template item<double>();
    }
    return std::sqrt(diff_sq / norm_sq);
  };
  for (int step = 0; step < s.steps; ++step) {
    const auto [x, y] = make_batch(w, w.batch * world, 2000 + static_cast<std::uint64_t>(step), device);
    const auto slice = [&](const at::Tensor& t, int k) { return t.narrow(0, k * w.batch, w.batch); };
    // One device: every slice, as fabric's precision runs it (forward under autocast, float32 output,
    // loss outside autocast); the gradient is the mean of the slices' gradients, which is the
    // gradient of the global batch's mean loss. Returns it and the mean loss; leaves no gradients.
    const auto one_device_gradient = [&] {
      std::vector<at::Tensor> mean_grad(ref_params.size());
      at::Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
      for (int k = 0; k < world; ++k) {
        at::Tensor out;
        if (w.bf16) {
          RawAutocast autocast(device.type(), at::kBFloat16);
          out = reference->forward(slice(x, k));
        } else {
          out = reference->forward(slice(x, k));
        }
        const at::Tensor part = workload_loss<Net>(out.to(at::kFloat), slice(y, k));
        part.backward();
        total += part.detach().to(at::kDouble) / world;
        torch::NoGradGuard no_grad;
        for (std::size_t i = 0; i < ref_params.size(); ++i) {
          at::Tensor& g = ref_params[i].mutable_grad();
          mean_grad[i] = k == 0 ? g / world : mean_grad[i] + g / world;
          g = at::Tensor();
        }
      }
      return std::pair{mean_grad, total.item<double>()};
    };
    auto [mean_grad, total] = one_device_gradient();
    ref_loss = total;
    // The control: the same gradient computed again on the same device; it differs only where the
    // device's kernels are not deterministic.
    if (step == 0) noise = distance(one_device_gradient().first, mean_grad);
    for (std::size_t i = 0; i < ref_params.size(); ++i) ref_params[i].mutable_grad() = mean_grad[i];
    // DDP: this rank's slice of the global batch.
    const at::Tensor loss = workload_loss<Net>(model(slice(x, rank)), slice(y, rank));
    fabric.backward(loss);
    if (step == 0 && !is_fsdp<F>) {
      // Same parameters on both sides: the all-reduced gradient is the global batch's gradient.
      std::vector<at::Tensor> ddp_grads;
      for (const auto& p : net->parameters()) ddp_grads.push_back(p.grad());
      grad_drift = distance(ddp_grads, mean_grad);
    }
    optimizer.step();
    optimizer.zero_grad();
    fabric::detail::optimizer_step(ref_adamw, nullptr);
    ref_adamw.zero_grad();
    ddp_loss = fabric.all_reduce(loss.detach().to(at::kDouble)).template item<double>();
  }
  // How far DDP is from one device, relative to how far training moved the parameters.
  torch::NoGradGuard no_grad;
  // NOTE: under FSDP's FULL_SHARD the parameters hold no data between steps: gather them to read them.
  std::optional<fabric::FSDP::FullParams> full;
  if constexpr (is_fsdp<F>) full.emplace(fabric.strategy().summon_full_params(model.strategy_state()));
  const auto ddp_params = net->parameters();
  double max_abs = 0, diff_sq = 0, moved_sq = 0;
  std::vector<at::Tensor> fingerprint;
  for (std::size_t i = 0; i < ddp_params.size(); ++i) {
    const at::Tensor p = ddp_params[i].to(at::kDouble);
    const at::Tensor q = ref_params[i].to(at::kDouble);
    const at::Tensor d = p - q;
    max_abs = std::max(max_abs, d.abs().max().item<double>());
    diff_sq += d.pow(2).sum().item<double>();
    moved_sq += (q - initial[i].to(at::kDouble)).pow(2).sum().item<double>();
    fingerprint.push_back(p.sum().reshape({1}));
    fingerprint.push_back(p.pow(2).sum().reshape({1}));
  }
  const double drift = std::sqrt(diff_sq / moved_sq);
  // Every rank holds the same DDP parameters: the per-parameter sums agree exactly.
  const at::Tensor mine = at::cat(fingerprint);
  const at::Tensor highest = fabric.all_reduce(mine.clone(), fabric::ReduceOp::max);
  const at::Tensor lowest = fabric.all_reduce(mine.clone(), fabric::ReduceOp::min);
  const bool ranks_agree = at::equal(highest, lowest);
  const double worst_drift = fabric.all_reduce(drift, fabric::ReduceOp::max).template item<double>();
  const double worst_abs = fabric.all_reduce(max_abs, fabric::ReduceOp::max).template item<double>();
  const double worst_grad = fabric.all_reduce(grad_drift, fabric::ReduceOp::max).template item<double>();
  const double worst_noise = fabric.all_reduce(noise, fabric::ReduceOp::max).template item<double>();
  full.reset();
  const double abs_tolerance = s.abs_tolerance > 0 ? s.abs_tolerance : 2 * w.lr * s.steps;
  const bool ok = ranks_agree && worst_drift <= s.tolerance && std::isfinite(worst_drift) && moved_sq > 0 &&
                  worst_grad <= s.grad_tolerance && std::isfinite(worst_grad) && worst_abs <= abs_tolerance &&
                  std::isfinite(worst_abs);
  const std::string label = strategy_label<F>(s);
  const std::string first_gradient =
      is_fsdp<F> ? std::string("first gradient not compared (FSDP keeps shards)")
                 : fmt::format("first gradient drift {:.3g} (tolerance {:g}; one device against itself {:.3g})",
                               worst_grad, s.grad_tolerance, worst_noise);
  fabric.print(
      "  {} {:<5} {:<10} {} x {} against one device, {} steps, global batch {}{}: {}; parameters: max |{} - one "
      "device| = {:.3g} (tolerance {:g}), relative drift {:.3g} (tolerance {:g}); ranks agree: {}; last loss {} "
      "{:.6f} one device {:.6f}",
      ok ? "ok    " : "FAILED", w.name(), w.precision(), world, label, s.steps, w.batch * world,
      s.nondeterministic ? "" : ", deterministic algorithms", first_gradient, label.substr(0, 4), worst_abs,
      abs_tolerance, worst_drift, s.tolerance, ranks_agree ? "yes" : "NO", label.substr(0, 4), ddp_loss, ref_loss);
  return {Json{{"steps", s.steps},
               {"global_rows", w.batch * world},
               {"first_gradient_drift", worst_grad},
               {"gradient_tolerance", s.grad_tolerance},
               {"first_gradient_noise", worst_noise},
               {"deterministic", !s.nondeterministic},
               {"max_abs_diff", worst_abs},
               {"abs_tolerance", abs_tolerance},
               {"relative_drift", worst_drift},
               {"tolerance", s.tolerance},
               {"ranks_agree", ranks_agree},
               {"last_loss_ddp", ddp_loss},
               {"last_loss_one_device", ref_loss},
               {"ok", ok}},
          ok};
}

template <class Net, class Strategy, class Precision>
int run(const Settings& s, const Workload& w) {
  using F = fabric::Fabric<fabric::Auto, Strategy, Precision>;
  auto make = [&] {
    if constexpr (std::is_same_v<Strategy, fabric::DDP>) {
      fabric::DDP::Options options;
      options.timeout = std::chrono::seconds(s.timeout_s);
      options.bucket_cap_mb = s.bucket_cap_mb;
      options.gradient_as_bucket_view = s.grad_as_view;
      options.static_graph = s.static_graph;
      if (s.comm_hook == "fp16") options.comm_hook = fabric::DDP::CommHook::fp16;
      if (s.comm_hook == "bf16") options.comm_hook = fabric::DDP::CommHook::bf16;
      return F(fabric::Options{.devices = s.devices}, fabric::Auto{}, fabric::DDP(options), Precision{});
    } else if constexpr (std::is_same_v<Strategy, fabric::FSDP>) {
      fabric::FSDP::Options options;
      options.timeout = std::chrono::seconds(s.timeout_s);
      options.sharding_strategy = s.sharding == "no_shard"        ? fabric::ShardingStrategy::NO_SHARD
                                  : s.sharding == "shard_grad_op" ? fabric::ShardingStrategy::SHARD_GRAD_OP
                                                                  : fabric::ShardingStrategy::FULL_SHARD;
      // Lightning's auto_wrap_policy={Block} and activation_checkpointing_policy={Block}; the mlp is one unit.
      if constexpr (std::is_same_v<Net, gpt2::GPT>) {
        options.units = fabric::module_types<gpt2::BlockImpl>();
        if (s.checkpointing) options.activation_checkpointing = fabric::module_types<gpt2::BlockImpl>();
      }
      return F(fabric::Options{.devices = s.devices}, fabric::Auto{}, fabric::FSDP(options), Precision{});
    } else {
      return F();
    }
  };
  if (s.mode == "check" && !s.nondeterministic) {
    // As torch.use_deterministic_algorithms(True): FlashAttention's backward then adds in a fixed
    // order, and cuBLAS wants a fixed workspace (set before its first handle; launch() passes the
    // environment on to the other ranks).
    ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
    at::globalContext().setDeterministicAlgorithms(true, false);
  }
  F fabric = make();
  fabric.launch();
  if (fabric.is_global_zero()) {
    fmt::print("bench_ddp_race {} on {} x {} (LibTorch {})\n", s.mode, fabric.world_size(), fabric.device().str(),
               TORCH_VERSION);
    std::fflush(stdout);
  }
  Report r;
  try {
    r = s.mode == "check" ? check<Net>(fabric, w, s) : time_steps<Net>(fabric, w, s);
  } catch (const std::exception& e) {
    // Out of device memory (c10::OutOfMemoryError; NCCL's own allocations say "out of memory"), or of host
    // memory (the CPU allocator's "can't allocate memory": the CPU dry run under ulimit -v) ends this process
    // at once: rank 0's children die with it (PR_SET_PDEATHSIG), and rank 0's launcher stops the others
    // when a child ends; no process waits in a collective for the timeout.
    const std::string what = e.what();
    const bool oom = dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr ||
                     what.find("out of memory") != std::string::npos ||
                     what.find("can't allocate memory") != std::string::npos;
    if (!oom) throw;
    std::fprintf(stderr, "bench_ddp_race: out of memory on rank %d (%s): %s\n", fabric.global_rank(),
                 strategy_label<F>(s).c_str(), what.substr(0, what.find('\n')).c_str());
    std::fflush(stderr);
    std::_Exit(3);
  }
  if (fabric.is_global_zero() && !s.json.empty()) {
    Json json = {{"mode", s.mode},
                 {"workload", w.name()},
                 {"precision", w.precision()},
                 {"devices", fabric.world_size()},
                 {"strategy", std::is_same_v<Strategy, fabric::DDP>    ? "ddp"
                              : std::is_same_v<Strategy, fabric::FSDP> ? "fsdp"
                                                                       : "single-device"},
                 {"sharding", std::is_same_v<Strategy, fabric::FSDP> ? s.sharding : ""},
                 {"activation_checkpointing", s.checkpointing},
                 {"n_layer", w.gpt ? w.gpt2.n_layer : 0},
                 {"n_embd", w.gpt ? w.gpt2.n_embd : 0},
                 {"n_head", w.gpt ? w.gpt2.n_head : 0},
                 {"bucket_cap_mb", s.bucket_cap_mb},
                 {"gradient_as_bucket_view", s.grad_as_view},
                 {"static_graph", s.static_graph},
                 {"comm_hook", s.comm_hook},
                 {"device", fabric.device().str()},
                 {"torch", TORCH_VERSION},
                 {"batch_per_device", w.batch}};
    json.update(r.json);
    write_json(s.json, json);
  }
  return r.ok ? 0 : 1;
}

template <class Net, class Precision>
int dispatch_strategy(const Settings& s, const Workload& w) {
  // One device without DDP is the baseline of the time mode; the check always runs DDP (or FSDP).
  if (s.strategy == "fsdp") return run<Net, fabric::FSDP, Precision>(s, w);
  if (s.mode == "time" && s.devices == 1 && !s.ddp_on_one) return run<Net, fabric::SingleDevice, Precision>(s, w);
  return run<Net, fabric::DDP, Precision>(s, w);
}

int dispatch(const Settings& s) {
  Workload w;
  w.gpt = s.workload == "gpt2";
  w.bf16 = s.workload != "mlp-fp32";
  w.batch = s.batch;
  if (w.gpt) {
    w.gpt2 = s.gpt2_config == "tiny" ? gpt2::Config::tiny() : gpt2::Config{};
    // The GPT-2 family: wider (--n-embd, heads of 64 by default) or deeper (--n-layer).
    if (s.n_layer > 0) w.gpt2.n_layer = s.n_layer;
    if (s.n_embd > 0) w.gpt2.n_embd = s.n_embd;
    if (s.n_head > 0) {
      w.gpt2.n_head = s.n_head;
    } else if (s.n_embd > 0) {
      w.gpt2.n_head = std::max<std::int64_t>(1, s.n_embd / 64);
    }
    w.gpt2.check();
    w.lr = 6e-4;
    w.weight_decay = 0.1;
    w.tokens_per_row = static_cast<double>(w.gpt2.block_size);
    return dispatch_strategy<gpt2::GPT, fabric::BF16Mixed>(s, w);
  }
  if (w.bf16) return dispatch_strategy<Mlp, fabric::BF16Mixed>(s, w);
  return dispatch_strategy<Mlp, fabric::FP32>(s, w);
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_ddp_race", [&] {
    const std::optional<Settings> settings = parse_args(argc, argv);
    return settings ? dispatch(*settings) : 0;
  });
}
