// Mixed precision on an accelerator that no LibTorch can autocast is rejected by the precision.
// EXPECT: fabric: mixed precision needs an accelerator that LibTorch can autocast
#include <fabric/fabric.hpp>

struct MetaAccelerator {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "meta";
  static constexpr c10::DeviceType device_type = c10::DeviceType::Meta;
  static bool is_available() noexcept { return true; }
  static int device_count() noexcept { return 1; }
  static void check_devices(int) {}
  static c10::Device device(int) { return c10::Device(c10::DeviceType::Meta); }
  static void setup_device(const c10::Device&) {}
};

int main() {
  fabric::Fabric<MetaAccelerator, fabric::SingleDevice, fabric::BF16Mixed> fabric;
  return fabric.world_size();
}
