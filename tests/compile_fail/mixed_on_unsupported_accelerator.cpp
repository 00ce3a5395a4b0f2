// Mixed precision on an accelerator that no LibTorch can autocast is rejected by the precision.
// EXPECT: fabric: mixed precision needs an accelerator that LibTorch can autocast
#include <fabric/fabric.hpp>

struct MetaAccelerator {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "meta";
  static constexpr c10::DeviceType device_type = c10::DeviceType::Meta;
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
  void check(int) const {}
  c10::Device select_device(int, int) const { return c10::Device(c10::DeviceType::Meta); }
  void teardown() {}
};

int main() {
  fabric::Fabric<MetaAccelerator, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  return fabric.world_size();
}
