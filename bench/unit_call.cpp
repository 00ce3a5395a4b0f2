// bench_unit_call: the CPU time of calling a module through a FABRIC_UNIT holder against a TORCH_MODULE
// holder, for a forward that does no work (what the holder adds is all that is timed): with no hook on any
// unit (one atomic load), with a hook on another unit (a registry look-up), and with a hook that does nothing
// on the unit called.
//
//     bench_unit_call [calls]      # default 2,000,000 per case; prints ns per call, median of 5 rounds

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace {

struct NopImpl : torch::nn::Module {
  at::Tensor forward(const at::Tensor& x) { return x; }
};
TORCH_MODULE(Nop);

struct NopUnitImpl : torch::nn::Module {
  at::Tensor forward(const at::Tensor& x) { return x; }
};
FABRIC_UNIT(NopUnit);

struct NoHook : fabric::detail::UnitHook {
  void pre_forward(torch::nn::Module&) override {}
  void post_forward(torch::nn::Module&, std::vector<at::Tensor>&) override {}
};

template <class M>
double ns_per_call(M& module, const at::Tensor& x, long calls) {
  std::vector<double> rounds;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < calls; ++i) {
      at::Tensor y = module(x);
      asm volatile("" : : "r"(y.unsafeGetTensorImpl()) : "memory");
    }
    const auto t1 = std::chrono::steady_clock::now();
    rounds.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(calls));
  }
  std::sort(rounds.begin(), rounds.end());
  return rounds[2];
}

}  // namespace

int main(int argc, char** argv) {
  const long calls = argc > 1 ? std::atol(argv[1]) : 2'000'000;
  torch::NoGradGuard no_grad;
  const at::Tensor x = torch::ones({1});
  Nop plain;
  NopUnit unit, other;
  std::printf("TORCH_MODULE holder:                      %6.2f ns/call\n", ns_per_call(plain, x, calls));
  std::printf("FABRIC_UNIT, no hook on any unit:         %6.2f ns/call\n", ns_per_call(unit, x, calls));
  auto hook = std::make_shared<NoHook>();
  fabric::detail::add_unit_hook(*other, hook);
  std::printf("FABRIC_UNIT, a hook on another unit:      %6.2f ns/call\n", ns_per_call(unit, x, calls));
  fabric::detail::add_unit_hook(*unit, hook);
  std::printf("FABRIC_UNIT, a no-op hook on this unit:   %6.2f ns/call\n", ns_per_call(unit, x, calls));
  fabric::detail::remove_unit_hook_everywhere(*hook);
  return 0;
}
