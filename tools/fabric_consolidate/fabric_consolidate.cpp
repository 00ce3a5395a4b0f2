// fabric-consolidate: Lightning's `fabric consolidate <folder> [--output_file F]`. Writes a sharded checkpoint
// directory (fabric's sharded save) as one file of PyTorch's torch.save format, next to the folder with the suffix
// ".consolidated" unless --output_file names another path, which must not exist yet. Single-device fabric,
// Python's torch.load(weights_only=True) and Lightning's fabric.load read the file.

#include <fabric/io/sharded.hpp>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  CLI::App app(
      "Converts a sharded checkpoint (a folder written by fabric's sharded save) into a single file that "
      "torch.load() and fabric's load read.",
      "fabric-consolidate");
  std::string folder;
  std::string output;
  app.add_option("checkpoint_folder", folder, "Path to a checkpoint folder, containing the sharded checkpoint files")
      ->required();
  app.add_option("--output_file", output,
                 "Path to the file where the converted checkpoint should be saved. The file should not already exist. "
                 "If no path is provided, the file will be saved next to the input checkpoint folder with the same "
                 "name and a '.consolidated' suffix.");
  CLI11_PARSE(app, argc, argv);
  try {
    fabric::consolidate_checkpoint(folder, output);
  } catch (const std::exception& error) {
    fmt::print(stderr, "fabric-consolidate: error: {}\n", error.what());
    return 1;
  }
  const std::string written =
      output.empty() ? fabric::detail::sharded::normalize(folder).string() + ".consolidated" : output;
  fmt::print("fabric-consolidate: wrote {}\n", written);
  return 0;
}
