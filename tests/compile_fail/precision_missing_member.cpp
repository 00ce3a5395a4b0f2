// A precision without the step members is rejected with one message naming them.
// EXPECT: fabric: a Precision needs backward
#include <fabric/fabric.hpp>

struct ContextOnly {
  using category = fabric::precision_tag;
  static constexpr std::string_view name = "context_only";
  static constexpr c10::ScalarType param_dtype() noexcept { return c10::ScalarType::Float; }
  template <class A>
  static constexpr void check() noexcept {}
  void setup_device(const c10::Device&) {}
  template <class M>
  void convert_module(M&) {}
  template <class T>
  T convert_input(T x) {
    return x;
  }
  template <class T>
  T convert_output(T x) {
    return x;
  }
  fabric::NullGuard forward_context() const { return {}; }
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, ContextOnly> fabric;
  return fabric.world_size();
}
