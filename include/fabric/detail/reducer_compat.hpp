#pragma once
// c10d::Reducer, declared by fabric where LibTorch's own reducer.hpp cannot be included.
//
// NOTE: reducer.hpp includes <torch/csrc/distributed/autograd/context/context.h>, which Debian's
// libtorch-dev (1.13) leaves out, so no program can include reducer.hpp there. This header declares the
// part of LibTorch 1.13's c10d::Reducer that fabric::DDP calls, exactly as libtorch_cpu exports it: the
// constructor, the destructor and seven member functions, plus compute_bucket_assignment_by_size. The
// object's storage is opaque and larger than LibTorch's object (912 bytes on x86-64; checked by
// tests/unit/strategies/ddp_test.cpp against the real header), so the library's own constructor builds it
// in place. Nothing else of the class is used, and only where the real header is missing.

#include <ATen/core/Tensor.h>
#include <c10/macros/Export.h>
#include <c10/util/Optional.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/default_comm_hooks.hpp>

#include "fabric/detail/reducer_storage.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#if !(TORCH_VERSION_MAJOR == 1 && TORCH_VERSION_MINOR == 13)
#error \
    "fabric: this LibTorch lacks torch/csrc/distributed/autograd/context/context.h, which c10d's reducer.hpp needs, and fabric knows the Reducer of LibTorch 1.13 only; install the LibTorch headers completely"
#endif

namespace c10d {

class Logger;

/// The size of DDP's first gradient bucket, as LibTorch 1.13's reducer.hpp defines it.
constexpr int kDefaultFirstBucketBytes = int(1024 * 1024);

/// LibTorch 1.13's DDP engine, as far as fabric::DDP calls it (see the note above).
class TORCH_API Reducer {
 public:
  explicit Reducer(std::vector<at::Tensor> params, std::vector<std::vector<size_t>> bucket_indices,
                   std::vector<size_t> per_bucket_size_limits, c10::intrusive_ptr<c10d::ProcessGroup> process_group,
                   std::vector<bool> expect_sparse_gradients, int64_t bucket_bytes_cap, bool find_unused_parameters,
                   bool gradient_as_bucket_view, std::unordered_map<size_t, std::string> param_names,
                   int64_t first_bucket_bytes_cap);
  ~Reducer() noexcept(false);
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  void prepare_for_backward(const std::vector<at::Tensor>& outputs);
  void prepare_for_forward();
  void register_comm_hook(std::unique_ptr<CommHookInterface> iface);
  void register_builtin_comm_hook(c10d::BuiltinCommHookType comm_hook_type);
  bool rebuild_buckets();
  void set_static_graph();
  void delay_all_reduce();

 private:
  alignas(alignof(std::max_align_t)) unsigned char storage_[fabric::detail::reducer_storage_bytes];
};

TORCH_API std::tuple<std::vector<std::vector<size_t>>, std::vector<size_t>> compute_bucket_assignment_by_size(
    const std::vector<at::Tensor>& tensors, const std::vector<size_t>& bucket_size,
    const std::vector<bool>& expect_sparse_gradient = {}, const std::vector<int64_t>& tensor_indices = {},
    const c10::optional<std::weak_ptr<c10d::Logger>>& logger = {});

}  // namespace c10d
