// bench_loss (bench/loss_gpu.sh, bench/README.md "The loss"): forward + backward of the cross-entropy of
// [N, V] logits (GPT-2's 8 x 1024 x 50304 bfloat16 by default) on each path:
//   f32             logits.to(kFloat) + torch::nn::functional::cross_entropy (Lightning's and LibTorch's way)
//   recompute       fabric::nn::cross_entropy, the backward recomputing each chunk's softmax
//   aten            fabric::nn::cross_entropy, the gradient computed in forward with chunks of ATen ops
//   aten-in-place   the same, written into the logits' storage
//   fused           fabric::nn::cross_entropy through the NVRTC kernel (CUDA)
//   fused-in-place  the same, written into the logits' storage
// For each: median ms of forward and of backward over --steps (CUDA events; a steady clock on the CPU), the
// peak bytes allocated beyond the logits during forward + backward (the logits' gradient included, which
// every path must produce) and the bytes held from forward to backward (CUDA only), and how far the loss
// and the gradient are from the f32 path's.
#include "common.hpp"

#include <fabric/nn/loss.hpp>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

namespace F = torch::nn::functional;

struct Options {
  std::string device = "cuda";
  std::string dtype = "bf16";
  int rows = 8192;
  int classes = 50304;
  int steps = 20;
  int warmup = 3;
  double smoothing = 0.0;
  std::string paths = "f32,recompute,aten,aten-in-place,fused,fused-in-place";
  std::string json;
};

/// Bytes the caching allocator has handed out now (0 on the CPU).
std::int64_t allocated(const torch::Device& device) {
#if defined(BENCH_RACE_CUDA)
  if (device.is_cuda())
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].current;
#endif
  (void)device;
  return 0;
}

/// Restarts the allocator's peak statistics (no cache flush: the paths reuse their blocks).
void reset_peak(const torch::Device& device) {
#if defined(BENCH_RACE_CUDA)
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  (void)device;
}

struct Result {
  std::string path;
  std::string skipped;  // why, where it could not run
  double forward_ms = 0, backward_ms = 0;
  double peak_mib = 0, held_mib = 0;
  double loss = 0, loss_rel = 0, grad_rel = 0;
};

Result run_path(const Options& o, const std::string& path, const torch::Device& device, const at::Tensor& source,
                const at::Tensor& targets, const at::Tensor& grad_ref, double loss_ref) {
  Result r{.path = path};
  const auto options = F::CrossEntropyFuncOptions().label_smoothing(o.smoothing);
  const bool in_place = path.ends_with("-in-place");
  fabric::nn::ChunkOptions chunks{.in_place = in_place};
  if (path == "recompute") chunks.kernel = fabric::nn::LossKernel::recompute;
  if (path.starts_with("aten")) chunks.kernel = fabric::nn::LossKernel::aten;
  if (path.starts_with("fused")) {
    chunks.kernel = fabric::nn::LossKernel::fused;
    r.skipped = fabric::detail::cross_entropy_kernel_unavailable(source);
    if (!r.skipped.empty()) return r;
  }
  const std::function<at::Tensor(const at::Tensor&)> loss_of = [&](const at::Tensor& logits) {
    if (path == "f32") return F::cross_entropy(logits.to(torch::kFloat), targets, options);
    return fabric::nn::cross_entropy(logits, targets, options, chunks);
  };
  // NOTE: every path gets a view of a leaf (no copy forward or backward), as a model's output is a non-leaf;
  // in place overwrites the leaf's values, restored before each step outside the timed region.
  const at::Tensor logits = source.clone().requires_grad_();
  bench::StepTimer forward(device, o.warmup + o.steps), backward(device, o.warmup + o.steps);
  std::vector<double> peaks, helds;
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    logits.mutable_grad() = at::Tensor();
    if (in_place) logits.detach().copy_(source);
    const at::Tensor view = logits.view({o.rows, o.classes});
    bench::synchronize(device);
    reset_peak(device);
    const std::int64_t before = allocated(device);
    forward.start();
    at::Tensor loss = loss_of(view);
    forward.stop();
    const std::int64_t held = allocated(device) - before;
    backward.start();
    loss.backward();
    backward.stop();
    bench::synchronize(device);
    const auto [peak, reserved] = bench::peak_memory(device);
    (void)reserved;
    if (step >= o.warmup) {
      peaks.push_back(static_cast<double>(peak - before) / (1 << 20));
      helds.push_back(static_cast<double>(held) / (1 << 20));
    }
    if (step == 0) {
      r.loss = loss.item<double>();
      r.loss_rel = std::abs(r.loss - loss_ref) / std::abs(loss_ref);
      if (grad_ref.defined()) {
        r.grad_rel = (logits.grad().to(torch::kFloat) - grad_ref).abs().max().item<double>() /
                     grad_ref.abs().max().item<double>();
      }
    }
    loss = at::Tensor();
  }
  const auto tail = [&](const bench::StepTimer& t) {
    auto ms = t.ms();
    return bench::median(std::vector<double>(ms.begin() + o.warmup, ms.end()));
  };
  r.forward_ms = tail(forward);
  r.backward_ms = tail(backward);
  r.peak_mib = device.is_cuda() ? bench::median(peaks) : NAN;
  r.held_mib = device.is_cuda() ? bench::median(helds) : NAN;
  return r;
}

int run(int argc, char** argv) {
  Options o;
  CLI::App app(
      "usage: bench_loss [flags]\n\nForward + backward of the cross-entropy of [rows, classes] logits on "
      "each of fabric::nn::cross_entropy's paths and the float32 path.",
      "bench_loss");
  bench::configure(app, 30);
  bench::add_choice(app, "--device", o.device, {"cuda", "cpu"}, "where (default cuda)");
  bench::add_choice(app, "--dtype", o.dtype, {"bf16", "f16", "f32"}, "the logits' dtype (default bf16)");
  bench::add_int(app, "--rows", o.rows, 1, "rows N (default 8192 = 8 x 1024 tokens)");
  bench::add_int(app, "--classes", o.classes, 1, "classes V (default 50304)");
  bench::add_int(app, "--steps", o.steps, 1, "timed steps per path (default 20)");
  bench::add_int(app, "--warmup", o.warmup, 1, "untimed steps first (default 3)");
  bench::add_positive(app, "--smoothing", o.smoothing, "label smoothing (default 0)");
  app.add_option("--paths", o.paths, "comma-separated paths (default all)");
  app.add_option("--json", o.json, "write the results there");
  if (!bench::parse(app, argc, argv)) return 0;
  const torch::Device device = o.device == "cuda" ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  if (device.is_cuda() && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no GPU visible");
  const auto dtype = o.dtype == "bf16" ? torch::kBFloat16 : o.dtype == "f16" ? torch::kHalf : torch::kFloat;
  torch::manual_seed(0);
  const at::Tensor source = (torch::randn({o.rows, o.classes}, device) * 2).to(dtype);
  const at::Tensor targets =
      torch::randint(o.classes, {o.rows}, torch::TensorOptions().device(device).dtype(torch::kLong));
  // The reference: F::cross_entropy in float32, its gradient in float32.
  double loss_ref = 0;
  at::Tensor grad_ref;
  {
    const at::Tensor x = source.to(torch::kFloat).requires_grad_();
    const at::Tensor loss = F::cross_entropy(x, targets, F::CrossEntropyFuncOptions().label_smoothing(o.smoothing));
    loss.backward();
    loss_ref = loss.item<double>();
    grad_ref = x.grad();
  }
  bench::reset_memory(device);
  std::printf("bench_loss: logits [%d, %d] %s on %s, label smoothing %g, median of %d steps after %d\n", o.rows,
              o.classes, o.dtype.c_str(), device.str().c_str(), o.smoothing, o.steps, o.warmup);
  std::printf("%-15s %9s %9s %9s %12s %10s %10s %10s\n", "path", "fwd ms", "bwd ms", "total ms", "peak+ MiB",
              "held MiB", "loss rel", "grad rel");
  nlohmann::json out = nlohmann::json::array();
  std::string rest = o.paths;
  while (!rest.empty()) {
    const auto comma = rest.find(',');
    const std::string path = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    const Result r = run_path(o, path, device, source, targets, grad_ref, loss_ref);
    if (!r.skipped.empty()) {
      std::printf("%-15s skipped: %s\n", path.c_str(), r.skipped.c_str());
      out.push_back({{"path", path}, {"skipped", r.skipped}});
      continue;
    }
    std::printf("%-15s %9.3f %9.3f %9.3f %12.0f %10.0f %10.2e %10.2e\n", path.c_str(), r.forward_ms, r.backward_ms,
                r.forward_ms + r.backward_ms, r.peak_mib, r.held_mib, r.loss_rel, r.grad_rel);
    out.push_back({{"path", path},
                   {"forward_ms", r.forward_ms},
                   {"backward_ms", r.backward_ms},
                   {"peak_extra_mib", r.peak_mib},
                   {"held_mib", r.held_mib},
                   {"loss", r.loss},
                   {"loss_rel", r.loss_rel},
                   {"grad_rel", r.grad_rel}});
    std::fflush(stdout);
  }
  if (!o.json.empty()) {
    bench::write_json(o.json, {{"rows", o.rows}, {"classes", o.classes}, {"dtype", o.dtype}, {"results", out}});
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::run_main("bench_loss", [&] { return run(argc, argv); });
}
