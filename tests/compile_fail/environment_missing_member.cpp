// A cluster environment without topology() is rejected with one message naming the member.
// EXPECT: fabric: a ClusterEnvironment needs `fabric::Topology topology
#include <fabric/distributed.hpp>

struct DetectOnly {
  static constexpr std::string_view name = "detect_only";
  static bool detect(const fabric::EnvLookup&) { return true; }
};

int main() {
  fabric::DDP ddp({.cluster_environment = DetectOnly{}});
  return ddp.world_size();
}
