// A strategy in the accelerator's slot is rejected with the order to write instead.
// Lightning: tests_fabric/test_connector.py::test_invalid_accelerator_choice
// EXPECT: fabric: the first argument of Fabric must be an accelerator policy
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::SingleDevice, fabric::CPU> fabric;
  return fabric.world_size();
}
