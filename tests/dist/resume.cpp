// A training run that resumes from its last checkpoint as if it had never stopped (issue 12): a small model
// with dropout, AdamW, a StepLR scheduler and a shuffled loader built by fabric, checkpointed every few steps
// with model, optimizer, scheduler, loader position and random states. resume.sh runs it uninterrupted,
// then killed mid-epoch (it sends itself SIGKILL a few steps after a checkpoint), then resumed, and compares
// the printed bit patterns of the losses and learning rates.
//
//   fabric_resume --dir DIR [--devices N] [--epochs E] [--steps-per-save K] [--kill-at STEP] [--resume]
//                 [--drop ENTRY]
//
// --devices 2 trains under DDP (Gloo) in two processes started by fabric.launch() (each rank sees half of the
// 64 samples: 8 batches an epoch instead of 16); --drop leaves one entry
// (rng, loader, scheduler) out of the checkpoint, for the check that the comparison can fail.
#include <fabric/distributed.hpp>
#include <fabric/fabric.hpp>

#include <torch/torch.h>

#include <signal.h>

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>

namespace {

struct Args {
  std::filesystem::path dir;
  int devices = 1;
  int every = 5;
  int kill_at = -1;
  bool resume = false;
  std::string drop;
  int epochs = 3;
};

/// 64 samples of 8 features and a target, fixed by their own generator (not the global one).
struct Synthetic : torch::data::datasets::Dataset<Synthetic> {
  Synthetic() {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
    x = torch::randn({64, 8}, generator);
    y = x.sum(1, true) * 0.5 + torch::randn({64, 1}, generator) * 0.1;
  }
  torch::data::Example<> get(std::size_t i) override {
    const auto k = static_cast<std::int64_t>(i);
    return {x[k], y[k]};
  }
  torch::optional<std::size_t> size() const override { return 64; }
  torch::Tensor x, y;
};

std::string bits(double value) {
  return fmt::format("{:08x}", std::bit_cast<std::uint32_t>(static_cast<float>(value)));
}

template <class F>
int train(F& fabric, const Args& a) {
  fabric.seed_everything(42);
  torch::nn::Sequential net(torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Dropout(0.3),
                            torch::nn::Linear(16, 1));
  torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2));
  torch::optim::StepLR scheduler(adamw, /*step_size=*/4, /*gamma=*/0.8);
  auto [model, optimizer] = fabric.setup(net, adamw);
  auto loader =
      fabric.dataloader(Synthetic().map(torch::data::transforms::Stack<>()), {.batch_size = 4, .shuffle = true});

  int step = 0;
  int epoch = 0;
  const auto path = a.dir / "last.ckpt";
  auto state = [&] {
    fabric::State s{{"model", model}, {"optimizer", optimizer}, {"step", std::ref(step)}, {"epoch", std::ref(epoch)}};
    if (a.drop != "scheduler") s.emplace("scheduler", scheduler);
    if (a.drop != "loader") s.emplace("loader", loader);
    if (a.drop != "rng") s.emplace("rng", fabric::RngState{});
    return s;
  };
  if (a.resume) {
    auto s = state();
    fabric.load(path, s);
    fabric.print("resumed at step {} epoch {}", step, epoch);
  }
  model->train();
  for (; epoch < a.epochs; ++epoch) {
    for (auto& batch : loader) {
      ++step;
      const auto loss = torch::mse_loss(model(batch.data), batch.target);
      fabric.backward(loss);
      optimizer.step();
      optimizer.zero_grad();
      scheduler.step();
      const double lr = adamw.param_groups().at(0).options().get_lr();
      fabric.print("step {} epoch {} loss {} lr {}", step, epoch, bits(loss.template item<float>()), bits(lr));
      if (step % a.every == 0) fabric.save(path, state());
      if (step == a.kill_at) ::raise(SIGKILL);
    }
  }
  fabric.print("done at step {}", step);
  return 0;
}

int run(const Args& a) {
  if (a.devices == 1) {
    fabric::Fabric<fabric::CPU> fabric;
    return train(fabric, a);
  }
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric({.devices = a.devices});
  fabric.launch();
  return train(fabric, a);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "fabric_resume: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--dir") {
      a.dir = next();
    } else if (arg == "--devices") {
      a.devices = std::stoi(next());
    } else if (arg == "--steps-per-save") {
      a.every = std::stoi(next());
    } else if (arg == "--kill-at") {
      a.kill_at = std::stoi(next());
    } else if (arg == "--epochs") {
      a.epochs = std::stoi(next());
    } else if (arg == "--resume") {
      a.resume = true;
    } else if (arg == "--drop") {
      a.drop = next();
    } else {
      std::fprintf(stderr, "fabric_resume: unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  if (a.dir.empty()) {
    std::fprintf(stderr, "fabric_resume: --dir is required\n");
    return 2;
  }
  try {
    return run(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fabric_resume: error: %s\n", e.what());
    return 1;
  }
}
