// A callback that declares a hook whose parameters cannot take call()'s arguments is an error,
// not a silent skip.
// EXPECT: fabric: a callback declares this hook but its signature cannot take the arguments
#include <fabric/fabric.hpp>

#include <string>

struct Printer {
  void on_train_epoch_end(const std::string& tag) { (void)tag; }
};

int main() {
  fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, Printer> fabric({}, Printer{});
  fabric.call(fabric::hooks::on_train_epoch_end, 3, 0.5);
  return 0;
}
