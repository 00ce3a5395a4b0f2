// The fast optimizer step (fabric/optim/foreach_step.hpp): LibTorch's Adam, AdamW and SGD stepped
// with multi-tensor kernels must give the parameters, the state and the archive keys of the
// optimizer's own step, and everything else must go to the own step.
//
// Tolerances: the multi-tensor path runs the same operations as the own step, so on the CPU
// (foreach) the results agree to rtol 1e-6, atol 1e-7 (LibTorch 1.13: bit for bit). The fused
// kernels (LibTorch 2 on CUDA, and on the CPU from 2.4) and the CUDA foreach kernels round
// differently (once per element, true division instead of a reciprocal): rtol 1e-5, atol 1e-6.
// bfloat16 parameters (foreach only): rtol 2e-2, atol 1e-3.
#include <fabric/fabric.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using Catch::Matchers::ContainsSubstring;
using fabric::detail::StepPath;

namespace {

struct Tolerance {
  double rtol, atol;
};

Tolerance tolerance_for(StepPath path, const torch::Device& device, torch::ScalarType dtype) {
  if (dtype == torch::kBFloat16 || dtype == torch::kHalf) return {2e-2, 1e-3};
  if (path == StepPath::fused || device.is_cuda()) return {1e-5, 1e-6};
  return {1e-6, 1e-7};
}

bool close(const torch::Tensor& a, const torch::Tensor& b, Tolerance tol) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), tol.rtol, tol.atol);
}

/// Parameters of mixed shapes (one non-contiguous, one float64 unless dtype is half) on a device.
std::vector<torch::Tensor> make_params(const torch::Device& device, torch::ScalarType dtype) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> params;
  auto add = [&](torch::Tensor t) { params.push_back(t.to(device).detach().requires_grad_()); };
  add(torch::randn({8, 4}).to(dtype));
  add(torch::randn({4}).to(dtype));
  add(torch::randn({6, 16}).to(dtype).t());  // transposed: not contiguous
  add(torch::randn({3, 3, 2}).to(dtype));
  add(torch::randn({5}).to(dtype == torch::kFloat ? torch::kDouble : dtype));
  add(torch::randn({7}).to(dtype));  // never gets a gradient
  return params;
}

std::vector<torch::Tensor> clone_params(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone().requires_grad_());
  return out;
}

/// Gives both copies the same gradient; some parameters get none at some steps, the last never.
void set_grads(std::vector<torch::Tensor>& a, std::vector<torch::Tensor>& b, int step) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    const bool none = i + 1 == a.size() || (static_cast<int>(i) + step) % 4 == 3;
    if (none) {
      a[i].mutable_grad() = torch::Tensor();
      b[i].mutable_grad() = torch::Tensor();
      continue;
    }
    auto g =
        torch::randn(a[i].sizes(), torch::TensorOptions().dtype(torch::kFloat)).to(a[i].device(), a[i].scalar_type());
    a[i].mutable_grad() = g.clone();
    b[i].mutable_grad() = g.clone();
  }
}

template <class Opt, class Options>
std::unique_ptr<Opt> make_optimizer(const std::vector<torch::Tensor>& params, const Options& first,
                                    const Options& second) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>(params.begin(), params.begin() + 3), std::make_unique<Options>(first));
  groups.emplace_back(std::vector<torch::Tensor>(params.begin() + 3, params.end()), std::make_unique<Options>(second));
  return std::make_unique<Opt>(groups, first);
}

template <class Map>
typename Map::key_type key_of(const torch::Tensor& p) {
  return fabric::detail::optimizer_state_key<Map>(p);
}

/// Walks an archive and returns its key paths, the parameters' state keys replaced by "p<i>".
void collect_keys(torch::serialize::InputArchive& archive, const std::string& prefix,
                  const std::map<std::string, std::string>& rename, std::set<std::string>& out) {
  for (const auto& key : archive.keys()) {
    auto it = rename.find(key);
    const std::string name = prefix + "/" + (it == rename.end() ? key : it->second);
    out.insert(name);
    torch::serialize::InputArchive sub;
    if (archive.try_read(key, sub)) collect_keys(sub, name, rename, out);
  }
}

template <class Opt>
std::set<std::string> archive_keys(Opt& optimizer, const std::vector<torch::Tensor>& params) {
  std::map<std::string, std::string> rename;
  for (std::size_t i = 0; i < params.size(); ++i) {
    std::ostringstream os;
    os << params[i].unsafeGetTensorImpl();
    rename[os.str()] = "p" + std::to_string(i);
    rename[std::to_string(reinterpret_cast<std::size_t>(params[i].unsafeGetTensorImpl()))] = "p" + std::to_string(i);
  }
  std::stringstream stream;
  torch::save(optimizer, stream);
  torch::serialize::InputArchive archive;
  archive.load_from(stream);
  std::set<std::string> keys;
  collect_keys(archive, "", rename, keys);
  return keys;
}

void check_state(const torch::optim::AdamParamState& a, const torch::optim::AdamParamState& b, Tolerance tol) {
  CHECK(a.step() == b.step());
  CHECK(close(a.exp_avg(), b.exp_avg(), tol));
  CHECK(close(a.exp_avg_sq(), b.exp_avg_sq(), tol));
  CHECK(close(a.max_exp_avg_sq(), b.max_exp_avg_sq(), tol));
}
void check_state(const torch::optim::AdamWParamState& a, const torch::optim::AdamWParamState& b, Tolerance tol) {
  CHECK(a.step() == b.step());
  CHECK(close(a.exp_avg(), b.exp_avg(), tol));
  CHECK(close(a.exp_avg_sq(), b.exp_avg_sq(), tol));
  CHECK(close(a.max_exp_avg_sq(), b.max_exp_avg_sq(), tol));
}
void check_state(const torch::optim::SGDParamState& a, const torch::optim::SGDParamState& b, Tolerance tol) {
  CHECK(close(a.momentum_buffer(), b.momentum_buffer(), tol));
}

/// Runs 5 steps with the fast step on one copy and the own step on the other, then compares.
template <class Opt, class State, class Options>
void check_equivalent(const Options& first, const Options& second, const torch::Device& device,
                      torch::ScalarType dtype = torch::kFloat) {
  auto fast_params = make_params(device, dtype);
  auto own_params = clone_params(fast_params);
  auto fast = make_optimizer<Opt>(fast_params, first, second);
  auto own = make_optimizer<Opt>(own_params, first, second);
  StepPath path = StepPath::own;
  for (int step = 0; step < 5; ++step) {
    set_grads(fast_params, own_params, step);
    fabric::detail::optimizer_step(*fast, nullptr);
    path = fabric::detail::last_optimizer_step_path();
    CHECK(fabric::detail::last_step_was_fast());
    own->step();
  }
  const Tolerance tol = tolerance_for(path, device, dtype);
  using Map = std::remove_cvref_t<decltype(fast->state())>;
  REQUIRE(fast->state().size() == own->state().size());
  for (std::size_t i = 0; i < fast_params.size(); ++i) {
    INFO("parameter " << i);
    CHECK(close(fast_params[i], own_params[i], tol));
    auto a = fast->state().find(key_of<Map>(fast_params[i]));
    auto b = own->state().find(key_of<Map>(own_params[i]));
    REQUIRE((a == fast->state().end()) == (b == own->state().end()));
    if (a == fast->state().end()) continue;
    check_state(static_cast<const State&>(*a->second), static_cast<const State&>(*b->second), tol);
  }
  CHECK(fast->state().find(key_of<Map>(fast_params.back())) == fast->state().end());
  CHECK(archive_keys(*fast, fast_params) == archive_keys(*own, own_params));
}

template <class Options>
Options adam_options(double lr, double weight_decay, bool amsgrad) {
  Options o(lr);
  o.betas(std::make_tuple(0.8, 0.99)).eps(1e-6).weight_decay(weight_decay).amsgrad(amsgrad);
  return o;
}

torch::optim::SGDOptions sgd_options(double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
  return torch::optim::SGDOptions(lr)
      .momentum(momentum)
      .dampening(dampening)
      .weight_decay(weight_decay)
      .nesterov(nesterov);
}

void check_all_optimizers(const torch::Device& device, torch::ScalarType dtype = torch::kFloat) {
  using torch::optim::Adam;
  using torch::optim::AdamOptions;
  using torch::optim::AdamW;
  using torch::optim::AdamWOptions;
  using torch::optim::SGD;
  for (const bool amsgrad : {false, true}) {
    for (const double wd : {0.0, 0.1}) {
      INFO("Adam/AdamW weight_decay " << wd << " amsgrad " << amsgrad);
      check_equivalent<Adam, torch::optim::AdamParamState>(adam_options<AdamOptions>(1e-2, wd, amsgrad),
                                                           adam_options<AdamOptions>(3e-2, wd / 2, amsgrad), device,
                                                           dtype);
      check_equivalent<AdamW, torch::optim::AdamWParamState>(adam_options<AdamWOptions>(1e-2, wd, amsgrad),
                                                             adam_options<AdamWOptions>(3e-2, wd / 2, amsgrad), device,
                                                             dtype);
    }
  }
  // Groups that differ in weight decay and AMSGrad.
  check_equivalent<Adam, torch::optim::AdamParamState>(adam_options<AdamOptions>(1e-2, 0.0, false),
                                                       adam_options<AdamOptions>(5e-3, 0.05, true), device, dtype);
  check_equivalent<AdamW, torch::optim::AdamWParamState>(adam_options<AdamWOptions>(1e-2, 0.1, true),
                                                         adam_options<AdamWOptions>(5e-3, 0.0, false), device, dtype);
  struct SgdCase {
    double momentum, dampening, weight_decay;
    bool nesterov;
  };
  for (const auto c :
       {SgdCase{0, 0, 0, false}, SgdCase{0.9, 0, 0, false}, SgdCase{0.9, 0.1, 0, false}, SgdCase{0.9, 0, 0, true},
        SgdCase{0, 0, 1e-2, false}, SgdCase{0.9, 0.2, 1e-2, false}, SgdCase{0.8, 0, 1e-2, true}}) {
    INFO("SGD momentum " << c.momentum << " dampening " << c.dampening << " weight_decay " << c.weight_decay
                         << " nesterov " << c.nesterov);
    check_equivalent<SGD, torch::optim::SGDParamState>(
        sgd_options(0.1, c.momentum, c.dampening, c.weight_decay, c.nesterov),
        sgd_options(0.03, c.momentum, c.dampening, c.weight_decay / 2, c.nesterov), device, dtype);
  }
}

/// Restores the process-wide kernel choice on exit.
struct KernelsGuard {
  StepPath saved = fabric::detail::optimizer_step_kernels();
  ~KernelsGuard() { fabric::detail::optimizer_step_kernels() = saved; }
};

struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 16));
    fc2 = register_module("fc2", torch::nn::Linear(16, 2));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::relu(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

Net copy_of(const Net& net) {
  Net copy;
  torch::NoGradGuard no_grad;
  auto src = net->parameters();
  auto dst = copy->parameters();
  for (std::size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  return copy;
}

bool same_parameters(const Net& a, const Net& b, Tolerance tol) {
  auto pa = a->parameters();
  auto pb = b->parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (!close(pa[i].to(torch::kCPU), pb[i].to(torch::kCPU), tol)) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("the fast step matches Adam, AdamW and SGD's own step on the CPU", "[optim]") {
  check_all_optimizers(torch::kCPU);
}

TEST_CASE("the fast step with foreach kernels only matches the own step on the CPU", "[optim]") {
  KernelsGuard guard;
  fabric::detail::optimizer_step_kernels() = StepPath::foreach;
  check_equivalent<torch::optim::AdamW, torch::optim::AdamWParamState>(
      adam_options<torch::optim::AdamWOptions>(1e-2, 0.1, false),
      adam_options<torch::optim::AdamWOptions>(3e-2, 0.0, true), torch::kCPU);
  CHECK(fabric::detail::last_optimizer_step_path() == StepPath::foreach);
}

TEST_CASE("Fabric's optimizer.step() takes the fast path for AdamW and the own step for the rest", "[optim]") {
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(3);
  Net net, net_own;
  net_own = copy_of(net);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  torch::optim::AdamW adamw_own(net_own->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  const auto x = torch::randn({32, 8});
  const auto y = torch::randint(0, 2, {32});

  for (int step = 0; step < 3; ++step) {
    fabric.backward(torch::nn::functional::cross_entropy(model(x), y));
    optimizer.step();
    CHECK(fabric::detail::last_step_was_fast());
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(net_own(x), y).backward();
    adamw_own.step();
    adamw_own.zero_grad();
  }
  CHECK(same_parameters(net, net_own, {1e-6, 1e-7}));

  SECTION("a closure goes to the own step") {
    int calls = 0;
    auto loss = optimizer.step([&] {
      ++calls;
      optimizer.zero_grad();
      auto l = torch::nn::functional::cross_entropy(model(x), y);
      l.backward();
      return l;
    });
    CHECK(calls == 1);
    CHECK(loss.defined());
    CHECK_FALSE(fabric::detail::last_step_was_fast());
  }
  SECTION("FABRIC_FOREACH_STEP=0 (optimizer_step_kernels() = own) goes to the own step") {
    KernelsGuard guard;
    fabric::detail::optimizer_step_kernels() = StepPath::own;
    fabric.backward(torch::nn::functional::cross_entropy(model(x), y));
    optimizer.step();
    CHECK_FALSE(fabric::detail::last_step_was_fast());
  }
}

TEST_CASE("RMSprop and subclasses of Adam keep their own step and give the same result", "[optim]") {
  fabric::Fabric<fabric::CPU> fabric;
  fabric.seed_everything(5);
  Net net;
  Net net_own = copy_of(net);
  torch::optim::RMSprop rmsprop(net->parameters(), torch::optim::RMSpropOptions(1e-2).momentum(0.5));
  torch::optim::RMSprop rmsprop_own(net_own->parameters(), torch::optim::RMSpropOptions(1e-2).momentum(0.5));
  auto [model, optimizer] = fabric.setup(net, rmsprop);
  const auto x = torch::randn({16, 8});
  const auto y = torch::randint(0, 2, {16});
  for (int step = 0; step < 3; ++step) {
    fabric.backward(torch::nn::functional::cross_entropy(model(x), y));
    optimizer.step();
    CHECK_FALSE(fabric::detail::last_step_was_fast());
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(net_own(x), y).backward();
    rmsprop_own.step();
    rmsprop_own.zero_grad();
  }
  CHECK(same_parameters(net, net_own, {0, 0}));

  struct CountingAdam : torch::optim::Adam {
    using torch::optim::Adam::Adam;
    torch::Tensor step(LossClosure closure = nullptr) override {
      ++steps;
      return torch::optim::Adam::step(std::move(closure));
    }
    int steps = 0;
  };
  Net other;
  CountingAdam counting(other->parameters());
  torch::optim::Adam& as_adam = counting;
  torch::nn::functional::cross_entropy(other(x), y).backward();
  fabric::detail::optimizer_step(as_adam, nullptr);
  CHECK(counting.steps == 1);
  CHECK_FALSE(fabric::detail::last_step_was_fast());
}

TEST_CASE("through the base class and GradScaler the step is chosen from the dynamic type", "[optim]") {
  auto params = make_params(torch::kCPU, torch::kFloat);
  auto own_params = clone_params(params);
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD sgd_own(own_params, torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::Optimizer& base = sgd;
  set_grads(params, own_params, 0);
  fabric::detail::optimizer_step(base, nullptr);
  CHECK(fabric::detail::last_step_was_fast());
  sgd_own.step();

  for (std::size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = torch::Tensor();
    own_params[i].mutable_grad() = torch::Tensor();
  }
  fabric::GradScaler scaler;
  auto loss = scaler.scale(params[0].sum() + params[1].pow(2).sum());
  loss.backward();
  (own_params[0].sum() + own_params[1].pow(2).sum()).backward();
  scaler.step(base, nullptr);
  CHECK(fabric::detail::last_step_was_fast());
  sgd_own.step();
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(close(params[i], own_params[i], {1e-6, 1e-7}));
}

TEST_CASE("sparse gradients go to the own step and fail there as LibTorch does", "[optim]") {
  auto p = torch::zeros({4, 3}).requires_grad_();
  torch::optim::Adam adam(std::vector<torch::Tensor>{p});
  p.mutable_grad() = torch::zeros({4, 3}).to_sparse();
  CHECK_THROWS_WITH(fabric::detail::optimizer_step(adam, nullptr), ContainsSubstring("sparse"));
  CHECK_FALSE(fabric::detail::last_step_was_fast());
}

TEST_CASE("the fast step matches the own step on CUDA", "[optim][cuda]") {
  if (!fabric::CUDA::is_available()) SKIP("no CUDA device here");
  const torch::Device cuda(torch::kCUDA, 0);
  SECTION("float32, fused kernels where this LibTorch has them") { check_all_optimizers(cuda); }
  SECTION("float32, foreach kernels only") {
    KernelsGuard guard;
    fabric::detail::optimizer_step_kernels() = StepPath::foreach;
    check_all_optimizers(cuda);
  }
  SECTION("bfloat16 parameters (foreach)") { check_all_optimizers(cuda, torch::kBFloat16); }
  SECTION("bf16-mixed: float32 master weights through Fabric") {
    fabric::Fabric<fabric::CUDA, fabric::SingleDevice, fabric::BF16Mixed> fabric;
    fabric.seed_everything(11);
    Net net;
    Net net_own = copy_of(net);
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    torch::optim::AdamW adamw_own(net_own->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    auto [model, optimizer] = fabric.setup(net, adamw);
    auto [model_own, optimizer_own] = fabric.setup(net_own, adamw_own);
    const auto x = torch::randn({32, 8}).to(cuda);
    const auto y = torch::randint(0, 2, {32}).to(cuda);
    for (int step = 0; step < 5; ++step) {
      fabric.backward(torch::nn::functional::cross_entropy(model(x), y));
      optimizer.step();
      CHECK(fabric::detail::last_step_was_fast());
      optimizer.zero_grad();
      fabric.backward(torch::nn::functional::cross_entropy(model_own(x), y));
      optimizer_own->step();
      optimizer_own.zero_grad();
    }
    CHECK(same_parameters(net, net_own, {1e-5, 1e-6}));
  }
}
