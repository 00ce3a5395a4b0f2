// The memory of fabric::FSDP against DDP (bench/fsdp_memory.sh; README, "fabric::FSDP"): GPT-2 trained a few
// steps in bf16-mixed under one strategy, and the peak memory the caching allocator saw (CUDA), with the bytes
// of parameters, gradients and optimizer state this process holds after a step (counted from the tensors).
//
//     bench_fsdp_memory --strategy ddp|no_shard|shard_grad_op|full_shard [--checkpointing] [--gpt2-config small]
//                       [--batch 8] [--steps 3] [--device cuda|cpu] [--prefetch none|backward|all]
//
// One process per run (a world of 1 on NCCL: what sharding itself costs and what activation checkpointing
// saves); under fabric-run --devices N each process prints its own figures. Prints one JSON line.

#include "common.hpp"

#include <fabric/distributed.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <set>
#include <string>

namespace {

struct Settings {
  std::string strategy = "full_shard";
  bool checkpointing = false;
  std::string gpt2_config = "small";
  int batch = 8;
  int steps = 3;
  std::string device = "cuda";
  std::string prefetch = "backward";
};

std::int64_t bytes_of(const std::vector<at::Tensor>& tensors) {
  std::set<const void*> seen;
  std::int64_t total = 0;
  for (const auto& t : tensors) {
    if (!t.defined() || !seen.insert(t.storage().unsafeGetStorageImpl()).second) continue;
    total += static_cast<std::int64_t>(t.storage().nbytes());
  }
  return total;
}

std::int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  std::int64_t total = 0;
  for (const auto& [key, s] : optimizer.state()) {
    const auto& adam = static_cast<const torch::optim::AdamWParamState&>(*s);
    total += adam.exp_avg().nbytes() + adam.exp_avg_sq().nbytes();
  }
  return total;
}

template <class S>
nlohmann::json run(const Settings& s, S strategy) {
  using Accelerator = fabric::Auto;
  fabric::Fabric<Accelerator, S, fabric::BF16Mixed> fabric({.devices = 1}, std::move(strategy), {});
  fabric.launch();
  // NOTE: the device with its index (cuda:<local rank>): the allocator's statistics are per device, and
  // index -1 is "Invalid device argument".
  const torch::Device device = s.device == "cuda" ? fabric.device() : torch::Device(torch::kCPU);
  const gpt2::Config config = s.gpt2_config == "tiny" ? gpt2::Config::tiny() : gpt2::Config{};
  torch::manual_seed(1337);
  gpt2::GPT net(config);
  if (s.checkpointing) fabric::apply_activation_checkpointing(net, fabric::module_types<gpt2::BlockImpl>());
  bench::reset_memory(device);
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(3e-4).weight_decay(0.1));
  auto [model, optimizer] = fabric.setup(net, adamw);
  auto idx = torch::randint(config.vocab_size, {s.batch, config.block_size}, torch::dtype(torch::kLong)).to(device);
  auto targets = torch::randint(config.vocab_size, {s.batch, config.block_size}, torch::dtype(torch::kLong)).to(device);
  std::int64_t gradients = 0;
  for (int step = 0; step < s.steps; ++step) {
    fabric.backward(gpt2::loss(model(idx), targets));
    if (step + 1 == s.steps) {
      std::vector<at::Tensor> grads;
      for (const auto& p : net->parameters()) grads.push_back(p.grad());
      for (const auto& group : optimizer->param_groups()) {
        for (const auto& p : group.params()) grads.push_back(p.grad());
      }
      gradients = bytes_of(grads);
    }
    optimizer.step();
    optimizer.zero_grad();
  }
  bench::synchronize(device);
  const auto [allocated, reserved] = bench::peak_memory(device);
  std::int64_t parameters = 0;
  nlohmann::json prefetch = nullptr;
  if constexpr (std::is_same_v<S, fabric::FSDP>) {
    parameters = fabric.strategy().memory(model.strategy_state()).parameters;
    const auto& stats = fabric.strategy().prefetch_stats();
    prefetch = {{"mode", s.prefetch},
                {"issued", stats.issued},
                {"used", stats.used},
                {"max_units_gathered", stats.max_gathered}};
  } else {
    parameters = bytes_of(net->parameters());
  }
  return {{"strategy", s.strategy},
          {"prefetch", prefetch},
          {"activation_checkpointing", s.checkpointing},
          {"gpt2_config", s.gpt2_config},
          {"batch", s.batch},
          {"world_size", fabric.world_size()},
          {"rank", fabric.global_rank()},
          {"parameters_bytes", parameters},
          {"gradients_bytes", gradients},
          {"optimizer_state_bytes", optimizer_state_bytes(*optimizer)},
          {"peak_allocated_bytes", allocated},
          {"peak_reserved_bytes", reserved}};
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"fabric::FSDP's memory against DDP: GPT-2 in bf16-mixed, peak CUDA memory and bytes held"};
  bench::configure(app, 30);
  bench::add_choice(app, "--strategy", s.strategy, {"ddp", "no_shard", "shard_grad_op", "full_shard"}, "the strategy");
  app.add_flag("--checkpointing", s.checkpointing, "activation checkpointing of the blocks");
  bench::add_choice(app, "--gpt2-config", s.gpt2_config, {"small", "tiny"}, "GPT-2 small (124M) or a tiny one");
  bench::add_int(app, "--batch", s.batch, 1, "sequences per step");
  bench::add_int(app, "--steps", s.steps, 1, "training steps");
  bench::add_choice(app, "--device", s.device, {"cuda", "cpu"}, "where to train");
  bench::add_choice(app, "--prefetch", s.prefetch, {"none", "backward", "all"},
                    "FSDP's prefetch: none, backward (BACKWARD_PRE, the default) or all (and forward_prefetch)");
  try {
    if (!bench::parse(app, argc, argv)) return 0;
    nlohmann::json out;
    if (s.strategy == "ddp") {
      out = run(s, fabric::DDP());
    } else {
      fabric::FSDP::Options o;
      o.sharding_strategy = s.strategy == "no_shard"        ? fabric::ShardingStrategy::NO_SHARD
                            : s.strategy == "shard_grad_op" ? fabric::ShardingStrategy::SHARD_GRAD_OP
                                                            : fabric::ShardingStrategy::FULL_SHARD;
      o.units = fabric::module_types<gpt2::BlockImpl>();
      o.backward_prefetch =
          s.prefetch == "none" ? fabric::BackwardPrefetch::NONE : fabric::BackwardPrefetch::BACKWARD_PRE;
      o.forward_prefetch = s.prefetch == "all";
      out = run(s, fabric::FSDP(o));
    }
    std::printf("%s\n", out.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_fsdp_memory: %s\n", e.what());
    return 1;
  }
  return 0;
}
