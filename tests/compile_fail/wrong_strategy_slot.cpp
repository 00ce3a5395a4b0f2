// A precision in the strategy's slot is rejected (Lightning's strategy="cocofruit" is a run-time error).
// Lightning: tests_fabric/test_connector.py::test_invalid_strategy_choice
// EXPECT: fabric: the second argument of Fabric must be a strategy policy
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::CPU, fabric::FP32> fabric;
  return fabric.world_size();
}
