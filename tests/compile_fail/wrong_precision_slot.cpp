// An accelerator in the precision's slot is rejected.
// Lightning: tests_fabric/test_connector.py::test_validate_precision_type
// EXPECT: fabric: the third argument of Fabric must be a precision policy
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::CPU> fabric;
  return fabric.world_size();
}
