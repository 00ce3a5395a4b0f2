// bf16-master keeps whole float32 masters in the optimizer; DP makes replicas per forward: refused.
// EXPECT: fabric: bf16-master is not supported with DP
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::CUDA, fabric::DP, fabric::BF16Master> fabric;
  return fabric.world_size();
}
