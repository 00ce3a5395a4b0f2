// A strategy in the accelerator's slot is rejected with the order to write instead.
// EXPECT: fabric: the first argument of Fabric must be an accelerator policy
#include <fabric/fabric.hpp>

int main() {
  fabric::Fabric<fabric::SingleDevice, fabric::CPU> fabric;
  return fabric.world_size();
}
