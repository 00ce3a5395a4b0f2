// A strategy that keeps a state per module but has no setup_module making it is rejected with one
// message naming the member (before: a raw "no member named" error from inside Fabric).
// EXPECT: fabric: a Strategy needs setup_module
#include <fabric/fabric.hpp>

struct Counting : fabric::SingleDevice {
  static constexpr std::string_view name = "counting";
  struct ModuleState {
    int forwards = 0;
  };
};

int main() {
  fabric::Fabric<fabric::CPU, Counting, fabric::FP32> fabric;
  return fabric.world_size();
}
