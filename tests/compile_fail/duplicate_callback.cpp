// The same callback type twice in the list is rejected.
// EXPECT: fabric: a callback type appears twice
#include <fabric/fabric.hpp>

struct Counter {
  int n = 0;
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, Counter, Counter> fabric;
  return fabric.world_size();
}
