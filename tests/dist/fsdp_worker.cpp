// The program behind the multi-process FSDP tests (tests/dist/CMakeLists.txt): real processes, real Gloo.
//
//     fsdp_worker SCENARIO [--devices N] [--steps N] [--sharding shard_grad_op|no_shard] [--optimizer sgd|adamw]
//                 [--accumulate K] [--separate] [--clip norm|value] [--timeout-s S] [--fault kill]
//                 [--forward-prefetch] [--backward-prefetch pre|post|none] [--no-limit] [--order-change]
//                 [--num-nodes N] (--sharding also hybrid_shard|hybrid_shard_zero2)
//
// Scenarios: train (the parameters after N steps equal those of one process on the global batches, which
// DDP's train scenario equals), memory (bytes held per rank, printed against DDP's), half (--param-dtype half:
// float16 collectives equal a reference that rounds as they do).
//
// Each scenario checks its own results and exits 0 only when they hold; a failed check prints
// "rank R: FAILED: ..." and exits 1.

#include <fabric/distributed.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

struct Args {
  std::string scenario;
  int devices = 2;
  int steps = 5;
  std::string sharding = "full_shard";
  std::string optimizer = "sgd";
  int accumulate = 1;
  bool separate = false;
  std::string clip;
  int timeout_s = 20;
  std::string fault;
  std::string model = "net";
  bool units = false;
  bool checkpointing = false;
  std::string phase;
  std::string dir = ".";
  std::string format = "sharded";
  bool forward_prefetch = false;
  std::string backward_prefetch = "pre";
  bool limit = true;
  bool order_change = false;
  int num_nodes = 1;
  std::string param_dtype;  ///< "half": FSDP's param_dtype (and so reduce_dtype) float16
};

int rank_of_env() {
  for (const char* name : {"RANK", "SLURM_PROCID", "LOCAL_RANK"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

class CheckFailed : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define WORKER_CHECK(cond, ...)                                                                                        \
  do {                                                                                                                 \
    if (!(cond)) throw CheckFailed(fmt::format("{}:{}: {}: {}", __FILE__, __LINE__, #cond, fmt::format(__VA_ARGS__))); \
  } while (false)

Args parse(int argc, char** argv) {
  if (argc < 2) throw std::invalid_argument("usage: fsdp_worker SCENARIO [options]");
  Args a;
  a.scenario = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
      return std::string(argv[++i]);
    };
    if (flag == "--devices")
      a.devices = std::stoi(value());
    else if (flag == "--steps")
      a.steps = std::stoi(value());
    else if (flag == "--sharding")
      a.sharding = value();
    else if (flag == "--optimizer")
      a.optimizer = value();
    else if (flag == "--accumulate")
      a.accumulate = std::stoi(value());
    else if (flag == "--separate")
      a.separate = true;
    else if (flag == "--clip")
      a.clip = value();
    else if (flag == "--timeout-s")
      a.timeout_s = std::stoi(value());
    else if (flag == "--fault")
      a.fault = value();
    else if (flag == "--model")
      a.model = value();
    else if (flag == "--units")
      a.units = true;
    else if (flag == "--checkpointing")
      a.checkpointing = true;
    else if (flag == "--phase")
      a.phase = value();
    else if (flag == "--dir")
      a.dir = value();
    else if (flag == "--format")
      a.format = value();
    else if (flag == "--forward-prefetch")
      a.forward_prefetch = true;
    else if (flag == "--backward-prefetch")
      a.backward_prefetch = value();
    else if (flag == "--no-limit")
      a.limit = false;
    else if (flag == "--order-change")
      a.order_change = true;
    else if (flag == "--num-nodes")
      a.num_nodes = std::stoi(value());
    else if (flag == "--param-dtype")
      a.param_dtype = value();
    else if (flag == "--tag")
      (void)value();
    else
      throw std::invalid_argument("unknown flag " + flag);
  }
  return a;
}

/// Sizes that no world size of 2 or 3 divides (the flat buffer is padded), and parameters that straddle
/// the shards' boundaries.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc1(register_module("fc1", torch::nn::Linear(16, 33))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({33})))),
        fc2(register_module("fc2", torch::nn::Linear(33, 5))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(norm(fc1(x)))); }
  torch::nn::Linear fc1;
  torch::nn::LayerNorm norm;
  torch::nn::Linear fc2;
};
TORCH_MODULE(Net);

/// A residual block, sharded as a unit: FABRIC_UNIT in place of TORCH_MODULE is the model's one change.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(int width) : fc(register_module("fc", torch::nn::Linear(width, width))) {}
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::tanh(fc(x)); }
  torch::nn::Linear fc;
};
FABRIC_UNIT(Block);

/// Parameters outside the units (the root unit: fc1, norm, fc2) around three units.
struct DeepImpl : torch::nn::Module {
  DeepImpl()
      : fc1(register_module("fc1", torch::nn::Linear(16, 33))),
        norm(register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({33})))),
        fc2(register_module("fc2", torch::nn::Linear(33, 5))) {
    for (int i = 0; i < 3; ++i) blocks.push_back(register_module("block" + std::to_string(i), Block(33)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = norm(fc1(x));
    std::vector<int> order{0, 1, 2};
    if (reverse) std::reverse(order.begin(), order.end());
    for (int i : order) {
      if (i != skip) h = blocks[static_cast<std::size_t>(i)](h);
    }
    return fc2(torch::tanh(h));
  }
  torch::nn::Linear fc1;
  torch::nn::LayerNorm norm;
  std::vector<Block> blocks;
  torch::nn::Linear fc2;
  int skip = -1;         ///< a block the forward leaves out
  bool reverse = false;  ///< the blocks run last to first
};
TORCH_MODULE(Deep);

std::pair<torch::Tensor, torch::Tensor> global_batch(int step, int size) {
  auto gen = at::detail::createCPUGenerator(1000 + step);
  auto x = at::randn({size, 16}, gen);
  auto y = at::randn({size, 5}, gen);
  return {x, y};
}

template <class Model = Net>
Model make_net() {
  torch::manual_seed(7);
  return Model();
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind, std::vector<at::Tensor> params) {
  if (kind == "sgd") {
    return std::make_unique<torch::optim::SGD>(std::move(params), torch::optim::SGDOptions(0.05).momentum(0.9));
  }
  if (kind == "adamw") {
    return std::make_unique<torch::optim::AdamW>(std::move(params), torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  }
  throw std::invalid_argument("unknown --optimizer " + kind);
}

fabric::FSDP::Options fsdp_options(const Args& a) {
  fabric::FSDP::Options o;
  if (a.sharding == "full_shard") {
    o.sharding_strategy = fabric::ShardingStrategy::FULL_SHARD;
  } else if (a.sharding == "shard_grad_op") {
    o.sharding_strategy = fabric::ShardingStrategy::SHARD_GRAD_OP;
  } else if (a.sharding == "no_shard") {
    o.sharding_strategy = fabric::ShardingStrategy::NO_SHARD;
  } else if (a.sharding == "hybrid_shard") {
    o.sharding_strategy = fabric::ShardingStrategy::HYBRID_SHARD;
  } else if (a.sharding == "hybrid_shard_zero2") {
    o.sharding_strategy = fabric::ShardingStrategy::HYBRID_SHARD_ZERO2;
  } else {
    throw std::invalid_argument("unknown --sharding " + a.sharding);
  }
  o.timeout = std::chrono::seconds(a.timeout_s);
  if (a.units) o.units = fabric::module_types<BlockImpl>();
  if (a.checkpointing) o.activation_checkpointing = fabric::module_types<BlockImpl>();
  o.state_dict_type = a.format;
  o.forward_prefetch = a.forward_prefetch;
  if (a.backward_prefetch == "pre") {
    o.backward_prefetch = fabric::BackwardPrefetch::BACKWARD_PRE;
  } else if (a.backward_prefetch == "post") {
    o.backward_prefetch = fabric::BackwardPrefetch::BACKWARD_POST;
  } else if (a.backward_prefetch == "none") {
    o.backward_prefetch = fabric::BackwardPrefetch::NONE;
  } else {
    throw std::invalid_argument("unknown --backward-prefetch " + a.backward_prefetch);
  }
  o.limit_all_gathers = a.limit;
  if (a.param_dtype == "half") {
    o.param_dtype = at::kHalf;
  } else if (!a.param_dtype.empty()) {
    throw std::invalid_argument("unknown --param-dtype " + a.param_dtype);
  }
  return o;
}

std::vector<std::pair<at::Tensor, at::Tensor>> zip(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  std::vector<std::pair<at::Tensor, at::Tensor>> out;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) out.emplace_back(a[i], b[i]);
  return out;
}

// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_clip_gradients
// Lightning: tests_fabric/strategies/test_fsdp.py::test_activation_checkpointing
/// FSDP over W ranks, each on its slice of the global batch, against one process on the whole batch (DDP's
/// train scenario shows DDP equals it within 1e-5: so FSDP equals DDP on the same global batches).
template <class Model, class F>
int train_equivalence(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const int local = 4;
  Model reference = make_net<Model>();
  Model net = make_net<Model>();
  if (rank != 0) {
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.add_(1.0);
  }
  auto ref_opt = make_optimizer(a.optimizer, reference->parameters());
  std::unique_ptr<torch::optim::Optimizer> opt;
  auto setup = [&] {
    if (a.separate) {
      // Lightning's setup_module, then an optimizer created over the set-up module, then setup_optimizers.
      auto model = fabric.setup_module(net);
      opt = make_optimizer(a.optimizer, net->parameters());
      auto optimizer = fabric.setup_optimizers(*opt);
      return std::pair{std::move(model), std::move(optimizer)};
    }
    opt = make_optimizer(a.optimizer, net->parameters());
    auto [model, optimizer] = fabric.setup(net, *opt);
    return std::pair{std::move(model), std::move(optimizer)};
  };
  auto [model, optimizer] = setup();
  {
    // NOTE: under FULL_SHARD the parameters hold no data between steps: gather them to read them.
    auto full = fabric.strategy().summon_full_params(model.strategy_state());
    for (const auto& [p, q] : zip(net->parameters(), reference->parameters())) {
      WORKER_CHECK(torch::equal(p, q), "parameters differ from rank 0's after setup");
    }
  }
  const int micro = a.accumulate;
  for (int step = 0; step < a.steps; ++step) {
    if (a.fault == "kill" && rank == 1 && step == 2) std::raise(SIGKILL);
    if constexpr (std::is_same_v<Model, Deep>) {
      // Odd steps leave block 1 out, step 2 runs the blocks in reverse: the recorded order changes.
      net->skip = reference->skip = a.order_change && step % 2 == 1 ? 1 : -1;
      net->reverse = reference->reverse = a.order_change && step == 2;
    }
    auto [x, y] = global_batch(step, local * world * micro);
    for (int k = 0; k < micro; ++k) {
      const int begin = (k * world + rank) * local;
      auto xs = x.narrow(0, begin, local);
      auto ys = y.narrow(0, begin, local);
      auto guard = fabric.no_backward_sync(model, k != micro - 1);
      fabric.backward(torch::mse_loss(model(xs), ys) / micro);
    }
    std::optional<at::Tensor> norm;
    if (a.clip == "norm") norm = fabric.clip_gradients(model, optimizer, {.max_norm = 0.5});
    if (a.clip == "value") fabric.clip_gradients(model, optimizer, {.clip_val = 0.01});
    optimizer.step();
    optimizer.zero_grad();

    torch::mse_loss(reference(x), y).backward();
    if (a.clip == "norm") {
      auto ref_norm = torch::nn::utils::clip_grad_norm_(reference->parameters(), 0.5);
      WORKER_CHECK(std::abs(norm->template item<double>() - ref_norm) <= 1e-5 * std::max(1.0, ref_norm),
                   "global gradient norm {} over the shards, {} on one process", norm->template item<double>(),
                   ref_norm);
    }
    if (a.clip == "value") torch::nn::utils::clip_grad_value_(reference->parameters(), 0.01);
    ref_opt->step();
    ref_opt->zero_grad();
  }
  const double tolerance = 1e-5;
  double worst = 0;
  auto full = fabric.strategy().summon_full_params(model.strategy_state());
  for (const auto& [p, q] : zip(net->parameters(), reference->parameters())) {
    worst = std::max(worst, (p - q).abs().max().template item<double>());
    auto gathered = fabric.all_gather(p.detach().clone());
    for (int r = 1; r < world; ++r)
      WORKER_CHECK(torch::equal(gathered[0], gathered[r]), "ranks hold different parameters");
  }
  WORKER_CHECK(worst <= tolerance, "max |FSDP - single process| = {} > {}", worst, tolerance);
  if (a.units && fabric.strategy().full_shard()) {
    // Prefetch, observed: all-gathers issued ahead and used, and the most units gathered at once (the root
    // unit aside), counted from the flat buffers' bytes as each all-gather was issued.
    const auto& stats = fabric.strategy().prefetch_stats();
    const auto order = fabric.strategy().unit_order(model.strategy_state());
    WORKER_CHECK(order.size() == 3 && order.front() == "unit `block0`", "recorded order of {} units, first {}",
                 order.size(), order.empty() ? "none" : order.front());
    const bool any = a.forward_prefetch || a.backward_prefetch != "none";
    WORKER_CHECK(any ? stats.used > 0 : stats.issued == 0, "prefetch: {} issued, {} used", stats.issued, stats.used);
    if (a.limit) WORKER_CHECK(stats.max_gathered <= 2, "{} units gathered at once", stats.max_gathered);
    if (!a.order_change && !a.checkpointing && micro == 1) {
      // Each forward after the first (which records the order) prefetches block0 (from the root), block1 and
      // block2; each backward block1 and block0.
      const auto steps = static_cast<std::size_t>(a.steps);
      const std::size_t expected =
          (a.forward_prefetch ? 3 * (steps - 1) : 0U) + (a.backward_prefetch != "none" ? 2 * steps : 0U);
      WORKER_CHECK(stats.used == expected && stats.issued == expected,
                   "prefetch: {} issued, {} used, expected {} (the next unit of the order, each time)", stats.issued,
                   stats.used, expected);
    }
    fabric.print("prefetch: {} all-gathers issued ahead, {} used, {} held back by the limit, at most {} units gathered",
                 stats.issued, stats.used, stats.skipped_by_limit, stats.max_gathered);
  }
  fabric.print(
      "equivalence ok: {} world {} steps {} {} accumulate {} clip {} max |FSDP - single| = {:.3g} (tolerance {})",
      a.sharding, world, a.steps, a.optimizer, micro, a.clip.empty() ? "none" : a.clip, worst, tolerance);
  return 0;
}

/// param_dtype float16 (and so reduce_dtype) on float32 parameters over W ranks, against one process that
/// rounds as they do: forward reads the float32 masters rounded to float16 (not under NO_SHARD, which
/// gathers nothing), each rank's gradient is rounded to float16 and the ranks' sum taken in float16 (in rank
/// order: Gloo's for two ranks, whose sum commutes), then averaged in float32. The parameters also differ
/// from those of float32 collectives (the train scenario's reference) by far more: the rounding is seen.
template <class Model, class F>
int half_collectives(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const int local = 4;
  Model master = make_net<Model>();
  Model rounded = make_net<Model>();
  Model exact = make_net<Model>();
  Model net = make_net<Model>();
  auto master_opt = make_optimizer(a.optimizer, master->parameters());
  auto exact_opt = make_optimizer(a.optimizer, exact->parameters());
  auto opt = make_optimizer(a.optimizer, net->parameters());
  auto [model, optimizer] = fabric.setup(net, *opt);
  const bool gathers = a.sharding != "no_shard";
  const auto dtypes = fabric.strategy().communication_dtypes(model.strategy_state());
  WORKER_CHECK(dtypes.parameters == (gathers ? at::kHalf : at::kFloat) && dtypes.gradients == at::kHalf,
               "communication dtypes {} and {}", c10::toString(dtypes.parameters), c10::toString(dtypes.gradients));
  const auto half = [](const at::Tensor& t) { return t.detach().to(at::kHalf).to(at::kFloat); };
  const auto masters = master->parameters();
  const auto reads = rounded->parameters();
  for (int step = 0; step < a.steps; ++step) {
    auto [x, y] = global_batch(step, local * world);
    fabric.backward(torch::mse_loss(model(x.narrow(0, rank * local, local)), y.narrow(0, rank * local, local)));
    optimizer.step();
    optimizer.zero_grad();

    {
      torch::NoGradGuard no_grad;
      for (std::size_t i = 0; i < reads.size(); ++i) reads[i].copy_(gathers ? half(masters[i]) : masters[i].detach());
    }
    std::vector<at::Tensor> sums(reads.size());
    for (int k = 0; k < world; ++k) {
      torch::mse_loss(rounded(x.narrow(0, k * local, local)), y.narrow(0, k * local, local)).backward();
      for (std::size_t i = 0; i < reads.size(); ++i) {
        const at::Tensor g = reads[i].grad().to(at::kHalf);
        sums[i] = k == 0 ? g.clone() : sums[i] + g;
        reads[i].mutable_grad() = at::Tensor();
      }
    }
    for (std::size_t i = 0; i < masters.size(); ++i) masters[i].mutable_grad() = sums[i].to(at::kFloat) / world;
    master_opt->step();
    master_opt->zero_grad();
    torch::mse_loss(exact(x), y).backward();
    exact_opt->step();
    exact_opt->zero_grad();
  }
  double emulated = 0;
  double float32 = 0;
  {
    auto full = fabric.strategy().summon_full_params(model.strategy_state());
    const auto params = net->parameters();
    const auto exacts = exact->parameters();
    for (std::size_t i = 0; i < params.size(); ++i) {
      emulated = std::max(emulated, (params[i] - masters[i]).abs().max().template item<double>());
      float32 = std::max(float32, (params[i] - exacts[i]).abs().max().template item<double>());
    }
  }
  const double tolerance = 1e-6;
  WORKER_CHECK(emulated <= tolerance, "max |FSDP - rounding reference| = {} > {}", emulated, tolerance);
  WORKER_CHECK(float32 > 20 * tolerance, "max |FSDP - float32 collectives| = {}: the float16 rounding does not show",
               float32);
  fabric.print(
      "float16 collectives ok: {} world {} steps {}: max |FSDP - rounding reference| = {:.3g}, "
      "max |FSDP - float32 collectives| = {:.3g}",
      a.sharding, world, a.steps, emulated, float32);
  return 0;
}

/// The bytes this rank holds after a step: the parameters, the gradients and the optimizer state, counted
/// from the tensors (each storage once), against what DDP holds (everything whole on every rank).
template <class F>
int memory(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  Net net = make_net();
  auto opt = make_optimizer("adamw", net->parameters());
  auto [model, optimizer] = fabric.setup(net, *opt);
  auto [x, y] = global_batch(0, 4);
  fabric.backward(torch::mse_loss(model(x), y));
  optimizer.step();
  // Gradients as they are between backward and zero_grad.
  fabric.backward(torch::mse_loss(model(x), y));
  const auto held = fabric.strategy().memory(model.strategy_state());
  std::vector<at::Tensor> state;
  for (const auto& [key, s] : optimizer->state()) {
    const auto& adam = static_cast<const torch::optim::AdamWParamState&>(*s);
    state.push_back(adam.exp_avg());
    state.push_back(adam.exp_avg_sq());
  }
  std::int64_t numel = 0;
  for (const auto& p : net->parameters()) numel += p.numel();
  const std::int64_t ddp = numel * 4;  // what DDP holds of each: fp32 parameters, gradients, exp_avg and exp_avg_sq
  std::int64_t opt_bytes = 0;
  for (const auto& t : state) opt_bytes += t.numel() * static_cast<std::int64_t>(t.element_size());
  fabric.print(
      "memory ({}, {} ranks, AdamW, {} parameters): per rank parameters {} B (DDP {}), gradients {} B (DDP {}), "
      "optimizer state {} B (DDP {})",
      a.sharding, world, numel, held.parameters, ddp, held.gradients, ddp, opt_bytes, 2 * ddp);
  // The elements of this rank's shard that are parameters (the last shard ends in padding).
  const std::int64_t per_rank = (numel + world - 1) / world;
  const std::int64_t shard = std::min(per_rank, numel - fabric.global_rank() * per_rank) * 4;
  if (a.sharding == "shard_grad_op" || a.sharding == "no_shard") {
    WORKER_CHECK(held.parameters == world * per_rank * 4, "parameters held {} B, expected DDP's (padded) {} B",
                 held.parameters, world * per_rank * 4);
  }
  if (a.sharding == "full_shard") {
    WORKER_CHECK(held.parameters == per_rank * 4, "parameters held {} B, expected one (padded) shard of {} B",
                 held.parameters, per_rank * 4);
  }
  if (a.sharding != "no_shard") {
    WORKER_CHECK(held.gradients == shard, "gradients held {} B, expected one shard of {} B", held.gradients, shard);
    WORKER_CHECK(opt_bytes == 2 * shard, "optimizer state {} B, expected two shards of {} B", opt_bytes, shard);
  } else {
    WORKER_CHECK(held.gradients == ddp, "gradients held {} B, expected DDP's {} B", held.gradients, ddp);
    WORKER_CHECK(opt_bytes == 2 * ddp, "optimizer state {} B, expected DDP's {} B", opt_bytes, 2 * ddp);
  }
  return 0;
}

/// One process's training on the global batches: the reference the checkpoint scenario compares with.
struct Reference {
  Deep model = make_net<Deep>();
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  explicit Reference(const std::string& kind) : optimizer(make_optimizer(kind, model->parameters())) {}
  void steps(int from, int to, int size) {
    for (int step = from; step < to; ++step) {
      auto [x, y] = global_batch(step, size);
      torch::mse_loss(model(x), y).backward();
      optimizer->step();
      optimizer->zero_grad();
    }
  }
};

template <class F>
double max_difference(F& fabric, fabric::Module<DeepImpl, F>& model, Deep& net, Deep& reference) {
  double worst = 0;
  auto check = [&] {
    for (const auto& [p, q] : zip(net->parameters(), reference->parameters())) {
      worst = std::max(worst, (p - q).abs().max().template item<double>());
    }
  };
  if constexpr (requires { fabric.strategy().summon_full_params(model.strategy_state()); }) {
    auto full = fabric.strategy().summon_full_params(model.strategy_state());
    check();
  } else {
    check();
  }
  return worst;
}

// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_train_save_load
// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_save_full_state_dict
// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_load_full_state_dict_into_sharded_model
// Lightning: tests_fabric/strategies/test_fsdp_integration.py::test_save_sharded_and_consolidate_and_load
/// Save after `steps` steps on W processes; load into V processes (or one device) and go on: the parameters
/// and the next steps equal one process's on the same global batches (16 samples a step whatever the world).
template <class F>
int checkpoint(F& fabric, const Args& a) {
  const int world = fabric.world_size();
  const int rank = fabric.global_rank();
  const int global = 12;  // divisible by 1, 2 and 3
  const int local = global / world;
  Deep net = make_net<Deep>();
  auto opt = make_optimizer(a.optimizer, net->parameters());
  auto [model, optimizer] = fabric.setup(net, *opt);
  auto train = [&](int from, int to) {
    for (int step = from; step < to; ++step) {
      auto [x, y] = global_batch(step, global);
      fabric.backward(torch::mse_loss(model(x.narrow(0, rank * local, local)), y.narrow(0, rank * local, local)));
      optimizer.step();
      optimizer.zero_grad();
    }
  };
  std::string path = a.dir + (a.format == "full" ? "/full.ckpt" : "/sharded");
  if (a.phase == "load-single" && a.format == "sharded") {
    // Lightning's `fabric consolidate`: the sharded directory as one torch.save file.
    const std::string consolidated = a.dir + "/consolidated.ckpt";
    std::filesystem::remove(consolidated);
    fabric::consolidate_checkpoint(path, consolidated);
    path = consolidated;
  }
  Reference reference(a.optimizer);
  const double tolerance = 1e-5;
  if (a.phase == "save") {
    train(0, a.steps);
    fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"step", a.steps}});
    reference.steps(0, a.steps, global);
    const double worst = max_difference(fabric, model, net, reference.model);
    WORKER_CHECK(worst <= tolerance, "before saving: max |FSDP - single| = {}", worst);
    fabric.print("saved {} after {} steps on {} ranks", path, a.steps, world);
    return 0;
  }
  auto rest = fabric.load(path, {{"model", model}, {"optimizer", optimizer}});
  WORKER_CHECK(rest.contains("step") && rest.at("step").template get<std::int64_t>() == a.steps,
               "the plain entry \"step\" did not come back");
  reference.steps(0, a.steps, global);
  double worst = max_difference(fabric, model, net, reference.model);
  WORKER_CHECK(worst <= tolerance, "after loading: max |FSDP - single| = {}", worst);
  train(a.steps, a.steps + 3);
  reference.steps(a.steps, a.steps + 3, global);
  worst = max_difference(fabric, model, net, reference.model);
  WORKER_CHECK(worst <= tolerance, "three steps after loading: max |FSDP - single| = {} (the optimizer state?)", worst);
  fabric.print("loaded {} ({}) on {} ranks and went on: max |FSDP - single| = {:.3g}", path, a.format, world, worst);
  return 0;
}

int run(const Args& a) {
  if (a.scenario == "checkpoint" && a.phase == "load-single") {
    // The full checkpoint in one-device fabric (TorchCheckpointIO, by the extension).
    fabric::Fabric<fabric::CPU, fabric::SingleDevice> single;
    return checkpoint(single, a);
  }
  fabric::Fabric<fabric::CPU, fabric::FSDP> fabric(fabric::Options{.devices = a.devices, .num_nodes = a.num_nodes},
                                                   fabric::FSDP(fsdp_options(a)), fabric::FP32{});
  fabric.launch();
  if (a.scenario == "train") {
    return a.model == "deep" ? train_equivalence<Deep>(fabric, a) : train_equivalence<Net>(fabric, a);
  }
  if (a.scenario == "memory") return memory(fabric, a);
  if (a.scenario == "half")
    return a.model == "deep" ? half_collectives<Deep>(fabric, a) : half_collectives<Net>(fabric, a);
  if (a.scenario == "checkpoint") return checkpoint(fabric, a);
  throw std::invalid_argument("unknown scenario " + a.scenario);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const CheckFailed& e) {
    fmt::print(stderr, "rank {}: FAILED: {}\n", rank_of_env(), e.what());
  } catch (const std::exception& e) {
    fmt::print(stderr, "rank {}: error: {}\n", rank_of_env(), e.what());
  }
  return 1;
}
