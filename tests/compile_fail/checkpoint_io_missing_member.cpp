// A checkpoint format without remove_checkpoint is rejected with one message naming the member.
// EXPECT: fabric: a CheckpointIO needs `void remove_checkpoint
#include <fabric/fabric.hpp>

struct WriteOnly {
  void save_checkpoint(const fabric::Checkpoint&, const std::filesystem::path&) {}
  fabric::Checkpoint load_checkpoint(const std::filesystem::path&) {
    return fabric::Checkpoint(c10::StringType::get(), c10::AnyType::get());
  }
};

int main() {
  fabric::SingleDevice strategy({.checkpoint_io = WriteOnly{}});
  return strategy.world_size();
}
