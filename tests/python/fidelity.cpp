// fabric's half of the fidelity check against Python (tests/python/fidelity.py drives it; issue 14):
// the same seed and the same model built in the same order give Python's initial weights bit for bit,
// and training on the CPU in float32 gives Python's loss curve. Commands (every number printed in C's %a):
//   fabric_fidelity init
//       prints "compiler <name>" and "<how>|<tensor name>|<values>" for the model built with braces
//       (how=braced, elements evaluated left to right as Python builds nn.Sequential) and with parentheses
//       (how=parenthesized, an unspecified evaluation order: g++ builds the last Linear first).
//   fabric_fidelity train --optimizer sgd|adamw --steps N [--resume FILE] [--save FILE]
//       trains N steps (continuing a checkpoint of fabric's or Python's, if --resume), prints
//       "loss <step> <value>" per step and saves {"model", "optimizer", "step"} with TorchCheckpointIO.
#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

/// The model as Python's `nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))`. The braces matter:
/// the elements of a braced list are evaluated left to right, so the first Linear draws its weights first.
torch::nn::Sequential make_model() {
  return torch::nn::Sequential{torch::nn::Linear(4, 16), torch::nn::Tanh(), torch::nn::Linear(16, 1)};
}

/// The trap: function arguments are evaluated in an unspecified order (g++: right to left), so the same
/// seed gives other weights than Python's.
torch::nn::Sequential make_model_parenthesized() {
  return torch::nn::Sequential(torch::nn::Linear(4, 16), torch::nn::Tanh(), torch::nn::Linear(16, 1));
}

void print_tensors(const char* how, const torch::nn::Module& model) {
  for (const auto& item : model.named_parameters()) {
    auto values = item.value().detach().contiguous().to(torch::kFloat).reshape(-1);
    std::printf("%s|%s|", how, item.key().c_str());
    const float* data = values.data_ptr<float>();
    for (std::int64_t i = 0; i < values.numel(); ++i) std::printf(i ? " %a" : "%a", static_cast<double>(data[i]));
    std::printf("\n");
  }
}

const char* compiler() {
#if defined(__clang__)
  return "clang";
#elif defined(__GNUC__)
  return "g++";
#else
  return "other";
#endif
}

struct Args {
  std::string command, optimizer = "sgd", resume, save;
  std::int64_t steps = 20;
};

Args parse(int argc, char** argv) {
  Args args;
  if (argc < 2)
    throw std::runtime_error(
        "usage: fabric_fidelity init | train --optimizer sgd|adamw --steps N "
        "[--resume FILE] [--save FILE]");
  args.command = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--optimizer")
      args.optimizer = value;
    else if (key == "--steps")
      args.steps = std::stoll(value);
    else if (key == "--resume")
      args.resume = value;
    else if (key == "--save")
      args.save = value;
    else
      throw std::runtime_error("unknown option " + key);
  }
  return args;
}

template <typename Optimizer>
int train(const Args& args, torch::nn::Sequential net, Optimizer& raw) {
  fabric::Fabric<fabric::CPU> fabric({}, fabric::SingleDevice({.checkpoint_io = fabric::TorchCheckpointIO{}}), {});
  auto [model, optimizer] = fabric.setup(net, raw);
  std::int64_t step = 0;
  if (!args.resume.empty()) {
    fabric::State state{{"model", model}, {"optimizer", optimizer}, {"step", std::ref(step)}};
    fabric.load(args.resume, state);
  }
  // The data: its own seed, after the model, so that a resumed run (whose model weights come from the
  // checkpoint) sees the same batches. Step s trains on rows [16 (s % 4), 16 (s % 4) + 16).
  torch::manual_seed(7);
  auto x = torch::randn({64, 4});
  auto y = torch::sin(x.sum(1, true));
  for (std::int64_t end = step + args.steps; step < end; ++step) {
    auto rows = (step % 4) * 16;
    optimizer.zero_grad();
    auto loss = torch::mse_loss(model(x.narrow(0, rows, 16)), y.narrow(0, rows, 16));
    fabric.backward(loss);
    optimizer.step();
    std::printf("loss %lld %a\n", static_cast<long long>(step + 1), static_cast<double>(loss.template item<float>()));
  }
  if (!args.save.empty()) fabric.save(args.save, {{"model", model}, {"optimizer", optimizer}, {"step", step}});
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const auto args = parse(argc, argv);
  if (args.command == "init") {
    std::printf("compiler %s\n", compiler());
    fabric::seed_everything(42);
    print_tensors("braced", *make_model());
    fabric::seed_everything(42);
    print_tensors("parenthesized", *make_model_parenthesized());
    return 0;
  }
  if (args.command != "train") throw std::runtime_error("unknown command " + args.command);
  fabric::seed_everything(42);
  auto net = make_model();
  if (args.optimizer == "sgd") {
    torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
    return train(args, net, sgd);
  }
  if (args.optimizer == "adamw") {
    torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(1e-2));
    return train(args, net, adamw);
  }
  throw std::runtime_error("unknown optimizer " + args.optimizer);
} catch (const std::exception& e) {
  std::fprintf(stderr, "fabric_fidelity: %s\n", e.what());
  return 1;
}
