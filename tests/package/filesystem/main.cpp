// A user's program calling std::filesystem itself and through every path where fabric does: checkpoint
// save (parent directories created) and load (native, safetensors, torch.save), a missing file, remove_checkpoint
// (remove_all), the CSV and TensorBoard loggers (create_directories, exists, rename, file_size, resize_file,
// directory_iterator for the next version). Exits 0 and prints "filesystem_user: ok" when all of it worked.
#include <torch/torch.h>
#include <unistd.h>
#include <fabric/fabric.hpp>

#include <cstdio>
#include <filesystem>
#include <string>

namespace fs = std::filesystem;

#define REQUIRE_OK(cond)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "filesystem_user: failed: %s (line %d)\n", #cond, __LINE__); \
      return 1;                                                                         \
    }                                                                                   \
  } while (false)

int main() try {
  const fs::path root = fs::temp_directory_path() / ("fabric_filesystem_user_" + std::to_string(::getpid()));
  fs::remove_all(root);  // the user's own calls first
  fs::create_directories(root / "own" / "nested");
  REQUIRE_OK(fs::is_directory(root / "own" / "nested"));

  auto csv = std::make_shared<fabric::CSVLogger>(fabric::CSVLogger::Options{.root_dir = root / "logs"});
  auto tb = std::make_shared<fabric::TensorBoardLogger>(
      fabric::TensorBoardLogger::Options{.root_dir = root / "logs", .flush_secs = 0});
  fabric::Fabric<fabric::CPU> fabric{{.loggers = {csv, tb}}};
  fabric.seed_everything(1);
  torch::nn::Linear net(3, 2);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  auto [model, optimizer] = fabric.setup(net, sgd);
  for (int step = 0; step < 3; ++step) {
    auto loss = model(torch::randn({4, 3})).pow(2).sum();
    fabric.backward(loss);
    optimizer.step();
    optimizer.zero_grad();
    fabric.log("loss", loss.item<double>(), step);
  }
  const auto expected = net->weight.detach().clone();
  for (const char* name : {"deep/er/last.ckpt", "deep/model.safetensors"}) {
    const auto path = root / name;
    fabric.save(path, {{"model", model}, {"optimizer", optimizer}, {"step", 3}});
    REQUIRE_OK(fs::is_regular_file(path));
    torch::NoGradGuard no_grad;
    net->weight.zero_();
    fabric::State state{{"model", model}, {"optimizer", optimizer}};
    fabric.load(path, state, false);
    REQUIRE_OK(torch::equal(net->weight, expected));
    fabric.strategy().remove_checkpoint(path);
    REQUIRE_OK(!fs::exists(path));
  }
  fabric::Fabric<fabric::CPU> python({}, fabric::SingleDevice({.checkpoint_io = fabric::TorchCheckpointIO{}}), {});
  python.save(root / "py" / "run.ckpt", {{"model", net}, {"step", 3}});
  REQUIRE_OK(python.load(root / "py" / "run.ckpt").contains("step"));
  python.strategy().remove_checkpoint(root / "py" / "run.ckpt");
  REQUIRE_OK(!fs::exists(root / "py" / "run.ckpt"));
  try {
    fabric.load(root / "missing.ckpt");
    REQUIRE_OK(false);
  } catch (const fabric::Error&) {
  }
  csv->finalize("success");
  tb->finalize("success");
  auto second = fabric::CSVLogger(fabric::CSVLogger::Options{.root_dir = root / "logs"});
  second.log_metrics({{"x", 1.0}}, 0);
  second.finalize("success");
  REQUIRE_OK(fs::is_regular_file(fs::path(csv->log_dir()) / "metrics.csv"));
  REQUIRE_OK(fs::is_regular_file(fs::path(second.log_dir()) / "metrics.csv"));
  REQUIRE_OK(fs::path(second.log_dir()) != fs::path(csv->log_dir()));
  std::uintmax_t removed = fs::remove_all(root);  // a tree of files and directories: where the wheel's copy crashed
  REQUIRE_OK(!fs::exists(root));
  std::printf("filesystem_user: ok (removed %ju files and directories)\n", removed);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "filesystem_user: %s\n", e.what());
  return 1;
}
