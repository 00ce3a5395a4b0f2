// A state entry refers to a Stateful object, so it cannot be a temporary (only fabric::RngState, whose
// state is the process's, may be).
// EXPECT: fabric: a Stateful state entry refers to its object
#include <fabric/fabric.hpp>

#include <torch/nn/modules/linear.h>
#include <torch/optim/schedulers/step_lr.h>
#include <torch/optim/sgd.h>

int main() {
  fabric::Fabric<> fabric;
  torch::nn::Linear model(2, 2);
  torch::optim::SGD optimizer(model->parameters(), 0.1);
  fabric.save("ckpt", {{"scheduler", torch::optim::StepLR(optimizer, 2)}});
  return 0;
}
