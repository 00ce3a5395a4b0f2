// bf16-master keeps whole float32 masters in the optimizer, which FSDP shards: refused.
// EXPECT: fabric: bf16-master keeps whole float32 masters in the optimizer, which FSDP shards
#include <fabric/distributed.hpp>

int main() {
  fabric::Fabric<fabric::CPU, fabric::FSDP, fabric::BF16Master> fabric;
  return fabric.world_size();
}
