// An accelerator without select_device is rejected with one message naming the member.
// EXPECT: fabric: an Accelerator needs `c10::Device select_device
#include <fabric/fabric.hpp>

struct NoSelect {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "no_select";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
  void check(int) const {}
  void teardown() {}
};

int main() {
  fabric::Fabric<NoSelect, fabric::SingleDevice, fabric::FP32> fabric;
  return fabric.world_size();
}
