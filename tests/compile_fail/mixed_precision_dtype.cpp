// Mixed precision autocasts to bfloat16 or float16 only; another dtype is rejected at compile time.
// Lightning: tests_fabric/plugins/precision/test_amp.py::test_amp_precision_parameter_validation
// EXPECT: fabric: mixed precision autocasts to bfloat16 or float16; use BF16Mixed or FP16Mixed
#include <fabric/fabric.hpp>

int main() {
  fabric::MixedPrecision<c10::ScalarType::Float> precision;
  return precision.param_dtype() == c10::ScalarType::Float ? 0 : 1;
}
