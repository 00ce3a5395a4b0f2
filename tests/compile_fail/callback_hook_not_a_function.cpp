// A callback whose member of a hook's name is not a function is an error at compile time (Lightning warns
// "Skipping the callback `Mock.not_a_method`" at run time and calls nothing).
// Lightning: tests_fabric/test_fabric.py::test_call
// EXPECT: fabric: a callback declares this hook but its signature cannot take the arguments
#include <fabric/fabric.hpp>

struct NotAMethod {
  int on_train_end = 1;
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, NotAMethod> fabric({}, NotAMethod{});
  fabric.call(fabric::hooks::on_train_end);
  return 0;
}
