// DP replicates the module onto GPUs: with the CPU accelerator it is rejected by the strategy.
// Lightning: tests_fabric/test_connector.py::test_unsupported_strategy_types_on_cpu_and_fallback
// EXPECT: fabric: DP runs one process on several GPUs; use fabric::CUDA or fabric::Auto with DP, or fabric::DDP for
// several CPU processes
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::CPU, fabric::DP> fabric;
  return fabric.world_size();
}
