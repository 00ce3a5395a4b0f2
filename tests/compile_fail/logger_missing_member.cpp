// A logger of one's own (not derived from fabric::Logger) without log_hyperparams is rejected with one
// message naming the member.
// EXPECT: fabric: a Logger needs `void log_hyperparams
#include <fabric/fabric.hpp>

#include <memory>

struct Printer {
  std::string name() const { return "printer"; }
  std::string version() const { return "0"; }
  void log_metrics(const fabric::Metrics&, std::optional<std::int64_t>) {}
};

int main() {
  fabric::Fabric<fabric::CPU> fabric{{.loggers = {fabric::as_logger(std::make_shared<Printer>())}}};
  return fabric.world_size();
}
