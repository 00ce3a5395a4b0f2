// The program behind the multi-process tests (tests/dist/CMakeLists.txt): real processes, real Gloo.
//
//     ddp_worker SCENARIO [--devices N] [--num-nodes N] [--steps N] [--bucket-cap-mb X] [--grad-as-view]
//                [--static-graph] [--find-unused] [--comm-hook fp16|bf16] [--accumulate K] [--timeout-s S]
//                [--dir D] [--fault throw|kill|hang] [--catch] [--env scheduler|kubeflow] [--external] [--cuda]
//                [--tag T] [--threads auto|N]
//
// Scenarios: train, collectives, sampler, mismatch, save, loggers, shard, bypass, bypass-bf16, barrier-timeout,
// checkpoint.
//
// Each scenario checks its own results and exits 0 only when they hold; any failed check prints
// "rank R: FAILED: ..." and exits 1. With --catch a fabric::Error during training is caught while the
// Fabric lives ("rank R: caught: ...") and the worker returns 2, as a training loop that handles its errors
// does. --env picks the cluster environment: "scheduler" is one written in this file (SCHED_* variables,
// see fake_scheduler.sh), "kubeflow" fabric::KubeflowEnvironment.

#include <fabric/distributed.hpp>

#include <fmt/ranges.h>

#include "unit/strategies/environments/scheduler.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sched.h>
#include <unistd.h>

namespace {

struct Args {
  std::string scenario;
  int devices = 2;
  int num_nodes = 1;
  int steps = 5;
  double bucket_cap_mb = 25.0;
  bool grad_as_view = false;
  bool static_graph = false;
  bool find_unused = false;
  bool use_extra = false;
  std::string comm_hook = "none";
  int accumulate = 1;
  int timeout_s = 20;
  std::string dir = ".";
  std::string fault;
  bool catch_errors = false;
  std::string env;
  bool external = false;
  bool cuda = false;
  std::string threads;
};

int rank_of_env() {
  for (const char* name : {"RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "SCHED_RANK", "LOCAL_RANK"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

template <class T>
std::string str(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

class CheckFailed : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define WORKER_CHECK(cond, ...)                                                                                        \
  do {                                                                                                                 \
    if (!(cond)) throw CheckFailed(fmt::format("{}:{}: {}: {}", __FILE__, __LINE__, #cond, fmt::format(__VA_ARGS__))); \
  } while (false)

Args parse(int argc, char** argv) {
  if (argc < 2) throw std::invalid_argument("usage: ddp_worker SCENARIO [options]");
  Args a;
  a.scenario = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      return std::string(argv[++i]);
    };
    if (flag == "--devices") {
      // NOTE: "auto" leaves devices at fabric's default: the launcher's processes per node.
      const std::string devices = value();
      a.devices = devices == "auto" ? fabric::Options::auto_devices : std::stoi(devices);
    } else if (flag == "--num-nodes")
      a.num_nodes = std::stoi(value());
    else if (flag == "--catch")
      a.catch_errors = true;
    else if (flag == "--env")
      a.env = value();
    else if (flag == "--steps")
      a.steps = std::stoi(value());
    else if (flag == "--bucket-cap-mb")
      a.bucket_cap_mb = std::stod(value());
    else if (flag == "--grad-as-view")
      a.grad_as_view = true;
    else if (flag == "--static-graph")
      a.static_graph = true;
    else if (flag == "--find-unused")
      a.find_unused = true;
    else if (flag == "--comm-hook")
      a.comm_hook = value();
    else if (flag == "--accumulate")
      a.accumulate = std::stoi(value());
    else if (flag == "--timeout-s")
      a.timeout_s = std::stoi(value());
    else if (flag == "--dir")
      a.dir = value();
    else if (flag == "--fault")
      a.fault = value();
    else if (flag == "--external")
      a.external = true;
    else if (flag == "--cuda")
      a.cuda = true;
    else if (flag == "--threads")
      a.threads = value();
    else if (flag == "--tag")
      (void)value();
    else
      throw std::invalid_argument("unknown flag " + flag);
  }
  return a;
}

/// Two layers and, for find_unused_parameters, a third that the forward skips.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int hidden = 32, bool with_extra = false)
      : fc1(register_module("fc1", torch::nn::Linear(16, hidden))),
        fc2(register_module("fc2", torch::nn::Linear(hidden, 4))) {
    if (with_extra) extra = register_module("extra", torch::nn::Linear(hidden, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1, fc2, extra{nullptr};
};
TORCH_MODULE(Net);

/// The global batch of a step, the same on every rank.
std::pair<torch::Tensor, torch::Tensor> global_batch(int step, int size) {
  auto gen = at::detail::createCPUGenerator(1000 + step);
  auto x = at::randn({size, 16}, gen);
  auto y = at::randn({size, 4}, gen);
  return {x, y};
}

Net make_net(int hidden = 32, bool with_extra = false) {
  torch::manual_seed(7);
  return Net(hidden, with_extra);
}

void copy_params(const Net& from, Net& to) {
  torch::NoGradGuard no_grad;
  auto src = from->parameters();
  auto dst = to->parameters();
  for (std::size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
}

fabric::DDP::Options ddp_options(const Args& a) {
  fabric::DDP::Options o;
  o.bucket_cap_mb = a.bucket_cap_mb;
  o.gradient_as_bucket_view = a.grad_as_view;
  o.static_graph = a.static_graph;
  o.find_unused_parameters = a.find_unused;
  o.timeout = std::chrono::seconds(a.timeout_s);
  if (a.comm_hook == "fp16") o.comm_hook = fabric::DDP::CommHook::fp16;
  if (a.comm_hook == "bf16") o.comm_hook = fabric::DDP::CommHook::bf16;
  if (a.env == "scheduler") o.cluster_environment = fabric_test::SchedulerEnvironment{};
  if (a.env == "kubeflow") o.cluster_environment = fabric::KubeflowEnvironment{};
  if (!a.env.empty() && a.env != "scheduler" && a.env != "kubeflow") throw std::invalid_argument("unknown --env");
  return o;
}

template <class A, class B>
std::vector<std::pair<A, B>> ranges_zip(const std::vector<A>& a, const std::vector<B>& b) {
  std::vector<std::pair<A, B>> out;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) out.emplace_back(a[i], b[i]);
  return out;
}

/// DDP over W ranks, each on its slice of the global batch, against one process on the whole batch.
template <class F>
int train_equivalence(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const int local = 4;  // samples per rank and micro-batch
  Net reference = make_net(32, a.find_unused);
  Net net = make_net(32, a.find_unused);
  if (rank != 0) {
    // Different starting weights on the other ranks: setup must replace them with rank 0's.
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.add_(1.0);
  }
  torch::optim::SGD ref_opt(reference->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  auto [model, optimizer] = fabric.setup(net, sgd);
  for (const auto& [p, q] : ranges_zip(net->parameters(), reference->parameters())) {
    WORKER_CHECK(torch::equal(p.cpu(), q), "parameters differ from rank 0's after setup");
  }
  const int micro = a.accumulate;
  for (int step = 0; step < a.steps; ++step) {
    try {
      if (!a.fault.empty() && rank == 1 && step == 2) {
        if (a.fault == "throw") {
          // NOTE: say it before throwing: unwinding closes this rank's connections, the others fail at
          // once, and the launcher may stop this process before main prints the exception.
          fmt::print(stderr, "rank 1: throwing: injected failure on rank 1\n");
          throw std::runtime_error("injected failure on rank 1");
        }
        if (a.fault == "kill") std::raise(SIGKILL);
        if (a.fault == "hang") std::this_thread::sleep_for(std::chrono::hours(1));
      }
      auto [x, y] = global_batch(step, local * world * micro);
      for (int k = 0; k < micro; ++k) {
        const int begin = (k * world + rank) * local;
        auto xs = x.narrow(0, begin, local).to(fabric.device());
        auto ys = y.narrow(0, begin, local).to(fabric.device());
        const bool last = k == micro - 1;
        auto guard = fabric.no_backward_sync(model, !last);
        auto loss = torch::mse_loss(model(xs), ys) / micro;
        fabric.backward(loss);
      }
      optimizer.step();
      optimizer.zero_grad();
      auto loss = torch::mse_loss(reference(x), y);
      loss.backward();
      ref_opt.step();
      ref_opt.zero_grad();
    } catch (const fabric::Error& e) {
      if (!a.catch_errors) throw;
      // NOTE: the Fabric still lives: its teardown must end the processes it started, hung peers included.
      fmt::print(stderr, "rank {}: caught: {}\n", rank, e.what());
      return 2;
    }
  }
  // Every rank holds the same parameters, and they are those of one process on the global batches.
  const double tolerance = a.comm_hook == "none" ? 1e-5 : 5e-3;
  double worst = 0;
  for (const auto& [p, q] : ranges_zip(net->parameters(), reference->parameters())) {
    worst = std::max(worst, (p.cpu() - q).abs().max().template item<double>());
    auto gathered = fabric.all_gather(p.detach().clone());
    WORKER_CHECK(torch::equal(gathered[0], gathered[world - 1]), "ranks hold different parameters");
  }
  WORKER_CHECK(worst <= tolerance, "max |DDP - single process| = {} > {}", worst, tolerance);
  fabric.print("equivalence ok: world {} steps {} accumulate {} max |DDP - single| = {:.3g} (tolerance {})", world,
               a.steps, micro, worst, tolerance);
  return 0;
}

/// all_gather with sync_grads (Lightning's _AllGather), process groups from new_group, and their errors.
// Lightning: tests_fabric/test_fabric.py::test_all_gather
template <class F>
void groups_and_gradients(F& fabric) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const auto dev = fabric.device();
  const double triangle = world * (world + 1) / 2.0;
  // Each rank's loss weighs the gathered rows by (q + 1) * (rank + 1); the gradient of rank r's input is
  // the sum over every rank p of d loss_p / d x_r = (r + 1) * (p + 1), so (r + 1) * W (W + 1) / 2.
  auto x = (torch::tensor({1.0, 2.0}) * (rank + 1)).to(dev).requires_grad_();
  auto gathered = fabric.all_gather(x, {}, /*sync_grads=*/true);
  WORKER_CHECK(gathered.sizes() == torch::IntArrayRef({world, 2}), "gather shape {}", str(gathered.sizes()));
  WORKER_CHECK(gathered.requires_grad(), "a gather with sync_grads must be part of the graph");
  for (int q = 0; q < world; ++q) {
    WORKER_CHECK(gathered[q][1].template item<double>() == 2.0 * (q + 1), "gathered row {}: {}", q, str(gathered));
  }
  auto weights = (torch::arange(1, world + 1, torch::kDouble).to(dev) * (rank + 1)).to(x.dtype()).unsqueeze(1);
  (gathered * weights).sum().backward();
  WORKER_CHECK(x.grad().defined(), "no gradient through all_gather(sync_grads = true)");
  WORKER_CHECK(torch::allclose(x.grad().cpu(), torch::full({2}, (rank + 1) * triangle, x.grad().cpu().options())),
               "gradient {} on rank {}, expected {}", str(x.grad()), rank, (rank + 1) * triangle);
  // Without sync_grads the gather is a constant, as Lightning's (under torch.no_grad).
  WORKER_CHECK(!fabric.all_gather(x).requires_grad(), "a gather without sync_grads must not require grad");
  // A container: every tensor gathered, each with its gradient.
  auto y = torch::ones({1}, torch::TensorOptions().device(dev)).requires_grad_();
  auto both = fabric.all_gather(std::vector<torch::Tensor>{x, y}, {}, true);
  (both[1].sum() * (rank + 1)).backward();
  WORKER_CHECK(y.grad().template item<double>() == triangle, "container gradient {}", str(y.grad()));

  // Groups: every rank creates them in the same order; members use them.
  const std::vector<int> members = world == 1 ? std::vector<int>{0} : std::vector<int>{0, world - 1};
  auto ends = world == 1 ? fabric.new_group({0}) : fabric.new_group({world - 1, 0});  // sorted: [0, world - 1]
  WORKER_CHECK(ends.ranks() == members, "group ranks");
  const bool member = std::find(members.begin(), members.end(), rank) != members.end();
  WORKER_CHECK(ends.is_member() == member, "membership of rank {}", rank);
  double member_sum = 0;
  for (int m : members) member_sum += m + 1;
  const int last = members.back();
  if (member) {
    WORKER_CHECK(ends.rank() == (rank == 0 ? 0 : 1), "group rank {}", ends.rank());
    auto summed = fabric.all_reduce(torch::full({1}, rank + 1.0).to(dev), ends, fabric::ReduceOp::sum);
    WORKER_CHECK(summed.template item<double>() == member_sum, "group sum {}", str(summed));
    auto mean = fabric.all_reduce(torch::full({1}, rank + 1.0).to(dev), ends);
    WORKER_CHECK(mean.template item<double>() == member_sum / members.size(), "group mean {}", str(mean));
    auto g = fabric.all_gather(torch::tensor({rank}).to(dev), ends);
    WORKER_CHECK(g.size(0) == static_cast<int64_t>(members.size()) && g[0].template item<int64_t>() == 0 &&
                     g[g.size(0) - 1].template item<int64_t>() == last,
                 "group gather {}", str(g));
    WORKER_CHECK(fabric.broadcast(rank * 10, last, ends) == last * 10, "group broadcast");
    fabric.barrier("ends", ends);
    // The gradient through a group's gather sums over the members only.
    auto z = torch::ones({1}, torch::TensorOptions().device(dev)).requires_grad_();
    (fabric.all_gather(z, ends, true).sum() * (rank + 1)).backward();
    WORKER_CHECK(z.grad().template item<double>() == member_sum, "group gradient {}", str(z.grad()));
    // src must belong to the group.
    if (world > 2) {
      bool refused = false;
      try {
        (void)fabric.broadcast(1, 1, ends);
      } catch (const fabric::Error& e) {
        refused = std::string(e.what()).find("member of the group") != std::string::npos;
      }
      WORKER_CHECK(refused, "broadcast from a src outside the group must fail");
    }
  } else {
    // A collective on a group this process is not a member of is a clear error, not a hang.
    bool refused = false;
    try {
      (void)fabric.all_reduce(torch::ones({1}).to(dev), ends);
    } catch (const fabric::Error& e) {
      refused = std::string(e.what()).find("expected a member of the group of ranks [0, " + std::to_string(world - 1) +
                                           "], found rank " + std::to_string(rank)) != std::string::npos;
    }
    WORKER_CHECK(refused, "a collective on a group of others must fail on rank {}", rank);
  }
  // A second group, created after the first, gets a connection of its own.
  auto all = fabric.new_group([&] {
    std::vector<int> ranks(world);
    for (int r = 0; r < world; ++r) ranks[r] = r;
    return ranks;
  }());
  WORKER_CHECK(fabric.all_reduce(torch::ones({1}).to(dev), all, fabric::ReduceOp::sum).template item<double>() == world,
               "second group");
  // Ranks that differ between processes fail on every process.
  if (world > 1) {
    bool refused = false;
    try {
      (void)fabric.new_group({rank == 0 ? 0 : 1});
    } catch (const fabric::Error& e) {
      refused = std::string(e.what()).find("expected the same ranks on every process") != std::string::npos;
    }
    WORKER_CHECK(refused, "new_group with different ranks must fail on rank {}", rank);
  }
  bool bad_rank = false;
  try {
    (void)fabric.new_group({0, world});
  } catch (const fabric::Error& e) {
    bad_rank = std::string(e.what()).find("expected ranks in [0, " + std::to_string(world) + ")") != std::string::npos;
  }
  WORKER_CHECK(bad_rank, "new_group with a rank outside the world must fail");
}

// Lightning: tests_fabric/test_fabric.py::test_all_reduce, tests_fabric/test_fabric.py::test_broadcast
// Lightning: tests_fabric/test_fabric.py::test_barrier, tests_fabric/test_fabric.py::test_rank_zero_first
template <class F>
int collectives(F& fabric, const Args& /*a*/) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const double sum_ranks = world * (world - 1) / 2.0;
  const auto dev = fabric.device();
  auto on = [&](torch::Tensor t) { return t.to(dev); };
  // all_reduce: every op, in place, tensors and containers, numbers.
  auto t = on(torch::full({3}, static_cast<float>(rank + 1)));
  auto reduced = fabric.all_reduce(t, fabric::ReduceOp::sum);
  WORKER_CHECK(torch::allclose(reduced.cpu(), torch::full({3}, static_cast<float>(sum_ranks + world))), "sum {}",
               str(reduced));
  WORKER_CHECK(t.data_ptr() == reduced.data_ptr() && t[0].template item<float>() == sum_ranks + world, "not in place");
  auto mean = fabric.all_reduce(on(torch::full({2}, rank, torch::kDouble)));
  WORKER_CHECK(torch::allclose(mean.cpu(), torch::full({2}, sum_ranks / world, torch::kDouble)), "mean {}", str(mean));
  auto mn = fabric.all_reduce(on(torch::tensor({rank, -rank})), fabric::ReduceOp::min);
  WORKER_CHECK(mn[0].template item<int64_t>() == 0 && mn[1].template item<int64_t>() == -(world - 1), "min {}",
               str(mn));
  auto mx = fabric.all_reduce(on(torch::tensor({rank, -rank})), fabric::ReduceOp::max);
  WORKER_CHECK(mx[0].template item<int64_t>() == world - 1 && mx[1].template item<int64_t>() == 0, "max {}", str(mx));
  auto int_mean = fabric.all_reduce(on(torch::tensor({2 * rank})));
  WORKER_CHECK(
      int_mean.is_floating_point() && std::abs(int_mean.template item<double>() - 2 * sum_ranks / world) < 1e-6,
      "integer mean {}", str(int_mean));
  std::map<std::string, std::vector<torch::Tensor>> nested{{"a", {on(torch::ones({1}) * rank), on(torch::ones({2}))}}};
  auto nested_sum = fabric.all_reduce(nested, fabric::ReduceOp::sum);
  WORKER_CHECK(
      nested_sum["a"][0].template item<float>() == sum_ranks && nested_sum["a"][1][1].template item<float>() == world,
      "nested");
  auto number = fabric.all_reduce(rank + 0.5, fabric::ReduceOp::max);
  WORKER_CHECK(number.template item<double>() == world - 0.5, "number {}", str(number));
  // all_gather: a leading world-size dimension.
  auto gathered = fabric.all_gather(on(torch::full({2, 3}, rank)));
  WORKER_CHECK(gathered.sizes() == torch::IntArrayRef({world, 2, 3}), "gather shape {}", str(gathered));
  for (int r = 0; r < world; ++r) WORKER_CHECK(gathered[r].eq(r).all().template item<bool>(), "gather value at {}", r);
  auto gathered_list = fabric.all_gather(std::vector<torch::Tensor>{on(torch::tensor({rank}))});
  WORKER_CHECK(gathered_list[0].sizes() == torch::IntArrayRef({world, 1}), "gather list");
  bool shape_error = false;
  try {
    (void)fabric.all_gather(on(torch::zeros({rank + 1})));
  } catch (const fabric::Error& e) {
    shape_error = std::string(e.what()).find("same shape") != std::string::npos;
  }
  WORKER_CHECK(world == 1 || shape_error, "all_gather with different shapes must fail on every rank");
  // broadcast: tensors and serializable values.
  const int src = world - 1;
  auto bt = fabric.broadcast(on(torch::full({2}, rank)), src);
  WORKER_CHECK(bt.eq(src).all().template item<bool>(), "broadcast tensor {}", str(bt));
  WORKER_CHECK(fabric.broadcast(rank * 10, src) == src * 10, "broadcast int");
  WORKER_CHECK(fabric.broadcast(rank + 0.25, 0) == 0.25, "broadcast double");
  WORKER_CHECK(fabric.broadcast(std::string(rank + 1, 'x'), src) == std::string(src + 1, 'x'), "broadcast string");
  auto vec = fabric.broadcast(std::vector<int64_t>(rank + 1, rank), src);
  WORKER_CHECK(vec == std::vector<int64_t>(src + 1, src), "broadcast vector");
  WORKER_CHECK(fabric.broadcast(rank == 0, 0), "broadcast bool");
  bool bad_src = false;
  try {
    (void)fabric.broadcast(1, world);
  } catch (const fabric::Error&) {
    bad_src = true;
  }
  WORKER_CHECK(bad_src, "broadcast from a rank that does not exist must fail");
  // Boolean decisions.
  WORKER_CHECK(fabric.strategy().reduce_boolean_decision(rank == 0, false), "any");
  WORKER_CHECK(fabric.strategy().reduce_boolean_decision(rank == 0, true) == (world == 1), "all");
  // rank_zero_first: the others enter only after rank zero has left.
  const auto marker = std::filesystem::path(std::getenv("FABRIC_TEST_TMP") ? std::getenv("FABRIC_TEST_TMP") : "/tmp") /
                      fmt::format("rank_zero_first_{}", fabric.broadcast(static_cast<int64_t>(::getpid()), 0));
  {
    auto guard = fabric.rank_zero_first();
    if (rank == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      std::ofstream(marker) << "done";
    } else {
      WORKER_CHECK(std::filesystem::exists(marker), "rank {} entered before rank zero finished", rank);
    }
  }
  fabric.barrier();
  if (rank == 0) std::filesystem::remove(marker);
  groups_and_gradients(fabric);
  fabric.barrier("collectives done");
  fabric.print("collectives ok: world {}", world);
  return 0;
}

/// A barrier that one rank never reaches: the other fails within the timeout, naming the barrier.
template <class F>
int barrier_timeout(F& fabric, const Args& a) {
  if (fabric.global_rank() == 1) {
    std::this_thread::sleep_for(std::chrono::seconds(3 * a.timeout_s));
    return 0;
  }
  fabric.barrier("before eval");
  return 0;
}

struct IndexDataset : torch::data::datasets::Dataset<IndexDataset> {
  explicit IndexDataset(std::size_t n) : n_(n) {}
  torch::data::Example<> get(std::size_t i) override {
    return {torch::tensor({static_cast<int64_t>(i)}), torch::tensor({0})};
  }
  torch::optional<std::size_t> size() const override { return n_; }
  std::size_t n_;
};

std::vector<int64_t> one_epoch(auto& loader) {
  std::vector<int64_t> seen;
  for (auto& batch : loader) {
    for (int64_t i = 0; i < batch.data.size(0); ++i) seen.push_back(batch.data[i][0].template item<int64_t>());
  }
  return seen;
}

template <class F>
int sampler(F& fabric, const Args& /*a*/) {
  const int world = fabric.world_size();
  const int n = 10;
  fabric.seed_everything(3);
  auto loader =
      fabric.dataloader(IndexDataset(n).map(torch::data::transforms::Stack<>()), {.batch_size = 2, .shuffle = true});
  auto epoch0 = one_epoch(loader);
  auto epoch1 = one_epoch(loader);
  const int per_rank = (n + world - 1) / world;
  WORKER_CHECK(static_cast<int>(epoch0.size()) == per_rank, "rank sees {} samples, expected {}", epoch0.size(),
               per_rank);
  auto all0 = fabric.all_gather(torch::tensor(epoch0).to(fabric.device())).cpu();
  auto all1 = fabric.all_gather(torch::tensor(epoch1).to(fabric.device())).cpu();
  std::multiset<int64_t> s0(all0.template data_ptr<int64_t>(), all0.template data_ptr<int64_t>() + all0.numel());
  std::set<int64_t> distinct(s0.begin(), s0.end());
  WORKER_CHECK(static_cast<int>(distinct.size()) == n, "the shards cover {} of {} samples", distinct.size(), n);
  WORKER_CHECK(static_cast<int>(s0.size()) == per_rank * world, "padding: {} samples in all", s0.size());
  // Disjoint apart from the padding: exactly per_rank*world - n samples appear twice.
  int repeats = 0;
  for (auto v : distinct) repeats += static_cast<int>(s0.count(v)) - 1;
  WORKER_CHECK(repeats == per_rank * world - n, "{} repeated samples, expected {}", repeats, per_rank * world - n);
  WORKER_CHECK(!torch::equal(all0, all1), "epoch 1 must be shuffled differently from epoch 0");
  auto unsharded = fabric.dataloader(IndexDataset(n).map(torch::data::transforms::Stack<>()), {.batch_size = 3},
                                     {.use_distributed_sampler = false});
  auto everything = one_epoch(unsharded);
  WORKER_CHECK(static_cast<int>(everything.size()) == n, "use_distributed_sampler = false must not shard");
  fabric.print("sampler ok: world {} per rank {} repeats {}", world, per_rank, repeats);
  return 0;
}

template <class F>
int mismatch(F& fabric, const Args& /*a*/) {
  Net net = make_net(fabric.global_rank() == 1 ? 33 : 32);
  try {
    auto model = fabric.setup(net);
  } catch (const fabric::Error& e) {
    const std::string what = e.what();
    fmt::print("rank {}: expected error: {}\n", fabric.global_rank(), what);
    if (fabric.global_rank() == 1) {
      WORKER_CHECK(what.find("fc1.weight") != std::string::npos && what.find("[33, 16]") != std::string::npos,
                   "the error must name the parameter and both shapes: {}", what);
    }
    return 0;
  }
  WORKER_CHECK(false, "setup with different models on the ranks must fail");
  return 1;
}

template <class F>
int save_load(F& fabric, const Args& a) {
  Net net = make_net();
  auto model = fabric.setup(net);
  const auto dir = std::filesystem::path(a.dir);
  const auto path = dir / "ddp.ckpt";
  fabric.save(path, {{"model", model}, {"step", 5}});
  WORKER_CHECK(std::filesystem::exists(path), "rank {} does not see the checkpoint after save", fabric.global_rank());
  Net other(32);
  fabric::State state{{"model", other}};
  auto rest = fabric.load(path, state);
  WORKER_CHECK(rest.at("step").value().toInt() == 5, "step");
  WORKER_CHECK(torch::equal(other->fc1->weight.cpu(), net->fc1->weight.cpu()), "loaded weights differ");
  // Rank 0 cannot write: every rank fails instead of waiting at the barrier.
  const auto blocked = dir / "a-file";
  if (fabric.is_global_zero()) std::ofstream(blocked) << "x";
  fabric.barrier();
  bool failed = false;
  try {
    fabric.save(blocked / "ckpt", {{"step", 1}});
  } catch (const std::exception& e) {
    failed = true;
    fmt::print("rank {}: expected error: {}\n", fabric.global_rank(), e.what());
  }
  WORKER_CHECK(failed, "a failed save on rank 0 must fail on every rank");
  fabric.print("save ok");
  return 0;
}

/// Every rank logs through Fabric and calls the loggers directly, as a training script does; only rank
/// zero may write: one version directory per logger, each row once, one progress bar.
template <class Accelerator>
int loggers(const Args& a) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(a.dir);
  // NOTE: rank 0 starts first (the others are started by its launch()), so it clears the last run alone.
  if (rank_of_env() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  const fs::path progress = dir / fmt::format("progress-{}.txt", rank_of_env());
  std::FILE* out = std::fopen(progress.c_str(), "w");
  WORKER_CHECK(out != nullptr, "cannot write {}", progress.string());
  auto csv = std::make_shared<fabric::CSVLogger>(
      fabric::CSVLogger::Options{.root_dir = dir / "csv", .flush_logs_every_n_steps = 1});
  auto tb = std::make_shared<fabric::TensorBoardLogger>(fabric::TensorBoardLogger::Options{.root_dir = dir / "tb"});
  using Bar = fabric::ProgressBar;
  fabric::Fabric<Accelerator, fabric::DDP, fabric::FP32, Bar> fabric(
      fabric::Options{.devices = a.devices, .num_nodes = a.num_nodes, .loggers = {csv, tb}},
      fabric::DDP(ddp_options(a)), fabric::FP32{}, Bar({.stream = out, .mode = Bar::Mode::lines, .line_interval = {}}));
  fabric.launch();
  Net net = make_net();
  auto model = fabric.setup(net);
  const auto rank = static_cast<double>(fabric.global_rank());
  fabric.call(fabric::hooks::on_train_epoch_start, 0, 3);
  for (std::int64_t i = 0; i < 3; ++i) {
    fabric.log_dict({{"loss", 1.0 / static_cast<double>(i + 1)}, {"rank", rank}}, i);
    fabric.call(fabric::hooks::on_train_batch_end, i);
  }
  fabric.call(fabric::hooks::on_train_epoch_end);
  for (const auto& logger : fabric.loggers()) {  // direct calls, on every rank
    logger->log_hyperparams({{"world_size", std::to_string(fabric.world_size())}});
    logger->log_metrics({{"direct", rank}}, 10);
    logger->finalize("success");
  }
  std::fclose(out);
  fabric.barrier();
  if (!fabric.is_global_zero()) return 0;

  const auto entries = [](const fs::path& p) {
    std::vector<std::string> names;
    if (fs::is_directory(p)) {
      for (const auto& e : fs::directory_iterator(p)) names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    return names;
  };
  WORKER_CHECK(entries(dir / "csv" / "lightning_logs") == std::vector<std::string>{"version_0"}, "csv versions: {}",
               fmt::join(entries(dir / "csv" / "lightning_logs"), " "));
  WORKER_CHECK(entries(dir / "tb" / "lightning_logs") == std::vector<std::string>{"version_0"},
               "tensorboard versions: {}", fmt::join(entries(dir / "tb" / "lightning_logs"), " "));
  std::ifstream csv_file(csv->metrics_file());
  std::vector<std::string> lines;
  for (std::string line; std::getline(csv_file, line);) lines.push_back(line);
  const std::vector<std::string> expected{"direct,loss,rank,step", ",1.0,0.0,0", ",0.5,0.0,1",
                                          ",0.3333333333333333,0.0,2", "0.0,,,10"};
  WORKER_CHECK(lines == expected, "metrics.csv:\n{}", fmt::join(lines, "\n"));
  const auto events = entries(tb->log_dir());
  WORKER_CHECK(events.size() == 1 && events[0].rfind("events.out.tfevents.", 0) == 0, "event files: {}",
               fmt::join(events, " "));
  for (int r = 0; r < fabric.world_size(); ++r) {
    const auto size = fs::file_size(dir / fmt::format("progress-{}.txt", r));
    WORKER_CHECK((r == 0) == (size > 0), "rank {} wrote {} bytes of progress", r, size);
  }
  std::ifstream bar_file(dir / "progress-0.txt");
  std::string bar_line;
  std::getline(bar_file, bar_line);
  WORKER_CHECK(bar_line.rfind("Epoch 0: 1/3 (33%)", 0) == 0, "progress line: {}", bar_line);
  fabric.print("loggers ok");
  return 0;
}

/// A user's LibTorch loader ported by one change (torch::data::make_data_loader -> fabric.make_data_loader):
/// each rank reads its own part of the data, the parts are disjoint and cover it, and every epoch draws a
/// new order. With --threads, torch's intra-op threads and OMP_NUM_THREADS must be N, or with "auto"
/// (OMP_NUM_THREADS unset at the start) max(1, cores / local processes), as Lightning sets them.
template <class F>
int shard(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const int n = 5 * world;
  fabric.seed_everything(17);
  auto loader = fabric.make_data_loader(IndexDataset(n).map(torch::data::transforms::Stack<>()),
                                        torch::data::DataLoaderOptions(2));
  const auto epoch0 = one_epoch(loader);
  const auto epoch1 = one_epoch(loader);
  WORKER_CHECK(static_cast<int>(epoch0.size()) == 5, "rank {} saw {} samples, expected {} of {}", rank, epoch0.size(),
               5, n);
  auto all0 = fabric.all_gather(torch::tensor(epoch0).to(fabric.device())).cpu();
  auto all1 = fabric.all_gather(torch::tensor(epoch1).to(fabric.device())).cpu();
  std::multiset<int64_t> s0(all0.template data_ptr<int64_t>(), all0.template data_ptr<int64_t>() + all0.numel());
  std::set<int64_t> distinct(s0.begin(), s0.end());
  WORKER_CHECK(static_cast<int>(s0.size()) == n && static_cast<int>(distinct.size()) == n,
               "the ranks' parts hold {} samples, {} distinct, expected {} disjoint ones", s0.size(), distinct.size(),
               n);
  WORKER_CHECK(*distinct.begin() == 0 && *distinct.rbegin() == n - 1, "samples outside 0..{}", n - 1);
  WORKER_CHECK(!torch::equal(all0, all1), "epoch 1 must be shuffled differently from epoch 0");
  // A loader built by LibTorch itself would give every rank every sample: refused, and kept when asked.
  bool refused = false;
  try {
    (void)fabric.setup_dataloaders(torch::data::make_data_loader(
        IndexDataset(n).map(torch::data::transforms::Stack<>()), torch::data::DataLoaderOptions(2)));
  } catch (const fabric::Error& e) {
    refused = std::string(e.what()).find(fmt::format("shards across the {} processes", world)) != std::string::npos;
  }
  WORKER_CHECK(refused, "setup_dataloaders accepted a RandomSampler loader under DDP");
  auto kept = fabric.setup_dataloaders(
      {.use_distributed_sampler = false},
      torch::data::make_data_loader(IndexDataset(n).map(torch::data::transforms::Stack<>()), 3));
  WORKER_CHECK(static_cast<int>(one_epoch(kept).size()) == n, "the kept loader must yield every sample");
  if (!a.threads.empty()) {
    int expected = 0;
    if (a.threads == "auto") {
      cpu_set_t set;
      CPU_ZERO(&set);
      WORKER_CHECK(::sched_getaffinity(0, sizeof(set), &set) == 0, "sched_getaffinity");
      expected = std::max(1, CPU_COUNT(&set) / a.devices);
    } else {
      expected = std::stoi(a.threads);
    }
    const char* omp = std::getenv("OMP_NUM_THREADS");
    WORKER_CHECK(omp != nullptr && std::string(omp) == std::to_string(expected),
                 "rank {}: OMP_NUM_THREADS = {}, expected {}", rank, omp ? omp : "(unset)", expected);
    WORKER_CHECK(torch::get_num_threads() == expected, "rank {}: torch::get_num_threads() = {}, expected {}", rank,
                 torch::get_num_threads(), expected);
  }
  fabric.print("shard ok: world {}, {} threads per process", world, torch::get_num_threads());
  return 0;
}

/// A forward that bypasses the wrapper (`model->forward`) fails at backward on every rank, naming what it
/// skips, before any collective; the wrapper's forward then trains, its gradients averaged across ranks.
template <class Accelerator, class Precision>
int bypass(const Args& a, std::string_view skipped) {
  fabric::Fabric<Accelerator, fabric::DDP, Precision> fabric(
      fabric::Options{.devices = a.devices, .num_nodes = a.num_nodes}, fabric::DDP(ddp_options(a)), Precision{});
  fabric.launch();
  Net net = make_net();
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05));
  auto [model, optimizer] = fabric.setup(net, sgd);
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  auto [x, y] = global_batch(0, 4 * world);
  const auto xs = x.narrow(0, 4 * rank, 4).to(fabric.device());
  const auto ys = y.narrow(0, 4 * rank, 4).to(fabric.device());
  const std::string expected =
      fmt::format("model->forward(x) skips {}: call the wrapper, model(x) or model.forward(x)", skipped);
  for (int attempt = 0; attempt < 2; ++attempt) {  // through Fabric, then through the wrapper
    std::string error;
    try {
      auto loss = torch::mse_loss(model->forward(xs), ys);
      attempt == 0 ? fabric.backward(loss) : model.backward(loss);
    } catch (const fabric::Error& e) {
      error = e.what();
    }
    WORKER_CHECK(error.find(expected) != std::string::npos,
                 "bypassed forward: expected an error with \"{}\", found \"{}\"", expected, error);
  }
  WORKER_CHECK(!net->fc1->weight.grad().defined(), "the bypassed backward ran");
  model.backward(torch::mse_loss(model(xs), ys));
  const auto grads = fabric.all_gather(net->fc1->weight.grad()).cpu();
  for (int r = 1; r < world; ++r) {
    WORKER_CHECK(torch::allclose(grads[r], grads[0]), "rank {}'s gradient differs from rank 0's: not averaged", r);
  }
  optimizer.step();
  optimizer.zero_grad();
  fabric.print("{} ok", a.scenario);
  return 0;
}

/// A unit with dropout for the activation-checkpointing scenario.
struct CkptBlockImpl : torch::nn::Module {
  CkptBlockImpl()
      : fc1(register_module("fc1", torch::nn::Linear(16, 32))),
        fc2(register_module("fc2", torch::nn::Linear(32, 16))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::dropout(fc2(torch::gelu(fc1(x))), 0.2, true); }
  torch::nn::Linear fc1, fc2;
};
FABRIC_UNIT(CkptBlock);

struct CkptNetImpl : torch::nn::Module {
  CkptNetImpl()
      : h(register_module("h", torch::nn::ModuleList())), head(register_module("head", torch::nn::Linear(16, 4))) {
    for (int i = 0; i < 3; ++i) {
      blocks.emplace_back();
      h->push_back(blocks.back());
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& b : blocks) x = b(x);
    return head(x);
  }
  torch::nn::ModuleList h;
  torch::nn::Linear head;
  std::vector<CkptBlock> blocks;
};
TORCH_MODULE(CkptNet);

/// Counts the recomputations of the units it is installed on.
struct RecomputeCounter : fabric::detail::UnitHook {
  int recomputes = 0;
  void pre_forward(torch::nn::Module&) override { recomputes += fabric::detail::in_recompute() ? 1 : 0; }
  void post_forward(torch::nn::Module&, std::vector<torch::Tensor>&) override {}
};

// Activation checkpointing under DDP: the checkpointed blocks' parameters are inputs of the checkpoint Function,
// so the Reducer's hooks fire once per parameter from the outer backward (twice would fail in the Reducer, never
// would hang) and the averaged gradients equal those of DDP without checkpointing, step after step.
template <class F>
int checkpoint(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  torch::manual_seed(11);
  CkptNet plain_net;
  torch::manual_seed(11);
  CkptNet ckpt_net;
  WORKER_CHECK(fabric::apply_activation_checkpointing(ckpt_net, fabric::module_types<CkptBlockImpl>()) == 3,
               "three blocks to checkpoint");
  auto plain = fabric.setup_module(plain_net);
  auto ckpt = fabric.setup_module(ckpt_net);
  auto counter = std::make_shared<RecomputeCounter>();
  for (auto& b : ckpt_net->blocks) fabric::detail::add_unit_hook(*b, counter);
  torch::optim::SGD sgd_plain(plain_net->parameters(), 0.1);
  torch::optim::SGD sgd_ckpt(ckpt_net->parameters(), 0.1);
  for (int step = 0; step < a.steps; ++step) {
    auto [x, y] = global_batch(step, 4 * world);
    const auto xs = x.narrow(0, 4 * rank, 4).to(fabric.device());
    const auto ys = y.narrow(0, 4 * rank, 4).to(fabric.device());
    torch::manual_seed(100 * step + rank);  // dropout differs per rank and step, the same for both models
    fabric.backward(torch::mse_loss(plain(xs), ys));
    torch::manual_seed(100 * step + rank);
    fabric.backward(torch::mse_loss(ckpt(xs), ys));
    auto pc = ckpt_net->named_parameters();
    for (const auto& item : plain_net->named_parameters()) {
      WORKER_CHECK(pc[item.key()].grad().defined(), "step {}: {} has no gradient with checkpointing", step, item.key());
      WORKER_CHECK(torch::allclose(item.value().grad(), pc[item.key()].grad(), 1e-6, 1e-7),
                   "step {}: {} differs with checkpointing", step, item.key());
    }
    const auto grads = fabric.all_gather(ckpt_net->blocks[0]->fc1->weight.grad()).cpu();
    for (int r = 1; r < world; ++r) {
      WORKER_CHECK(torch::equal(grads[r], grads[0]), "step {}: rank {}'s gradient differs: not averaged", step, r);
    }
    sgd_plain.step();
    sgd_ckpt.step();
    sgd_plain.zero_grad();
    sgd_ckpt.zero_grad();
  }
  WORKER_CHECK(counter->recomputes == 3 * a.steps, "{} recomputations of the blocks in {} steps, expected {}",
               counter->recomputes, a.steps, 3 * a.steps);
  fabric::detail::remove_unit_hook_everywhere(*counter);
  fabric.print("checkpoint ok: {} steps on {} ranks", a.steps, world);
  return 0;
}

// Lightning: tests_fabric/test_fabric.py::test_launch_and_cli_not_allowed
// (Lightning refuses launch() under its CLI; fabric's CLI, fabric-run, starts the processes and launch() then
// only connects them, so the same program runs under every launcher: dist.fabric_run.* call launch() here.)
template <class Accelerator>
int run(const Args& a) {
  if (a.scenario == "loggers") return loggers<Accelerator>(a);
  if (a.scenario == "bypass") return bypass<Accelerator, fabric::FP32>(a, "the strategy (ddp)");
  if (a.scenario == "bypass-bf16") {
    return bypass<Accelerator, fabric::BF16Mixed>(a, "the precision (bf16-mixed) and the strategy (ddp)");
  }
  fabric::Fabric<Accelerator, fabric::DDP> fabric(fabric::Options{.devices = a.devices, .num_nodes = a.num_nodes},
                                                  fabric::DDP(ddp_options(a)), fabric::FP32{});
  fabric.launch();
  if (!a.env.empty()) {
    WORKER_CHECK(fabric.strategy().environment().name == a.env, "environment {}, expected {}",
                 fabric.strategy().environment().name, a.env);
  }
  if (a.devices == fabric::Options::auto_devices) {
    WORKER_CHECK(fabric.options().devices * a.num_nodes == fabric.world_size(),
                 "devices from the launcher: {} per node on {} nodes, but a world of {}", fabric.options().devices,
                 a.num_nodes, fabric.world_size());
    fabric.print("devices from the launcher: {}", fabric.options().devices);
  }
  if (a.scenario == "train") return train_equivalence(fabric, a);
  if (a.scenario == "collectives") return collectives(fabric, a);
  if (a.scenario == "sampler") return sampler(fabric, a);
  if (a.scenario == "mismatch") return mismatch(fabric, a);
  if (a.scenario == "save") return save_load(fabric, a);
  if (a.scenario == "shard") return shard(fabric, a);
  if (a.scenario == "barrier-timeout") return barrier_timeout(fabric, a);
  if (a.scenario == "checkpoint") return checkpoint(fabric, a);
  throw std::invalid_argument("unknown scenario " + a.scenario);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse(argc, argv);
    return args.cuda ? run<fabric::CUDA>(args) : run<fabric::CPU>(args);
  } catch (const CheckFailed& e) {
    fmt::print(stderr, "rank {}: FAILED: {}\n", rank_of_env(), e.what());
  } catch (const std::exception& e) {
    fmt::print(stderr, "rank {}: error: {}\n", rank_of_env(), e.what());
  }
  return 1;
}
