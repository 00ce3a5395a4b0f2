#include <fabric/distributed.hpp>

#include <ATen/ops/ones.h>

// DDP on a world of one: the distributed half compiles and runs from the header alone.
int second_world_size() {
  fabric::Fabric<fabric::CPU, fabric::DDP> fabric;
  fabric.launch();
  const auto sum = fabric.all_reduce(at::ones({2}), fabric::ReduceOp::sum);
  return sum[1].item<float>() == 1.0f ? fabric.world_size() : -1;
}
