#pragma once
// The one place that knows how LibTorch's distributed engine (c10d) is spelled in each version:
// stores, process groups (a Gloo group *is* a ProcessGroup in 1.13; 2.x wraps Backends in one),
// the DDP Reducer's constructor, and the bf16 gradient-compression hook.

#include "fabric/core/error.hpp"
#include "fabric/detail/torch_version.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/debug.h>
#include <torch/version.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
// NOTE: reducer.hpp needs a distributed-autograd header that Debian's libtorch-dev omits; fabric then
// declares the Reducer's members it calls itself.
#if __has_include(<torch/csrc/distributed/autograd/context/context.h>)
#include <torch/csrc/distributed/c10d/reducer.hpp>
#define FABRIC_REDUCER_COMPAT 0
#else
#include "fabric/detail/reducer_compat.hpp"
#define FABRIC_REDUCER_COMPAT 1
#endif

// NOTE: LibTorch's CMake config defines USE_C10D_GLOO even where the gloo headers are missing (the
// PyTorch wheel), and a plain compiler line does not define it at all: fabric decides by the headers, and
// defines the macro ProcessGroupGloo.hpp is guarded by where they exist (Debian's libtorch-dev with
// libgloo-dev, whose libtorch_cpu has Gloo built in).
#if __has_include(<gloo/config.h>) && __has_include(<torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>)
#define FABRIC_HAS_GLOO 1
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#else
#define FABRIC_HAS_GLOO 0
#endif
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define FABRIC_HAS_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#else
#define FABRIC_HAS_NCCL 0
#endif

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric::detail {

/// Where and how the processes of a job meet.
struct Rendezvous {
  std::string address;
  int port = 0;
  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
  /// Rank 0 serves the store unless the launcher does (torchrun's agent).
  bool launcher_hosts_store = false;
};

/// Names the ranks in `missing` for a message: "rank 1", "ranks 1, 3 and 5", "ranks 1, 2, 3, ... (7 in all)".
inline std::string rank_list(const std::vector<int>& missing) {
  std::string text = missing.size() == 1 ? "rank " : "ranks ";
  const std::size_t shown = std::min<std::size_t>(missing.size(), 8);
  for (std::size_t i = 0; i < shown; ++i) {
    if (i > 0) text += i + 1 == missing.size() ? " and " : ", ";
    text += std::to_string(missing[i]);
  }
  if (shown < missing.size()) text += fmt::format(", ... ({} in all)", missing.size());
  return text;
}

/// Connects to the job's TCPStore (rank 0 serves it, unless the launcher does) and waits, within the
/// timeout, until every rank has checked in; returns a store private to the default group. A rank
/// that cannot reach the store, or a world in which some ranks never arrive, fails with an error that
/// names the address and the missing ranks.
inline c10::intrusive_ptr<c10d::Store> make_store(const Rendezvous& r) {
  using clock = std::chrono::steady_clock;
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(r.timeout).count();
  const auto deadline = clock::now() + r.timeout;
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(r.port);
  options.isServer = r.rank == 0 && !r.launcher_hosts_store;
  // NOTE: the store does not wait for the workers itself: fabric's own check-in below honours the
  // timeout and can say which ranks are missing.
  options.waitWorkers = false;
  options.timeout = r.timeout;
  c10::intrusive_ptr<c10d::TCPStore> tcp;
  try {
    tcp = c10::make_intrusive<c10d::TCPStore>(r.address, options);
  } catch (const std::exception& e) {
    if (options.isServer) {
      raise("rank 0 could not serve the rendezvous store at {}:{} ({}); check that MASTER_PORT is free on this node",
            r.address, r.port, first_line(e.what()));
    }
    raise(
        "rank {} could not reach the rendezvous store at {}:{} within {} s ({}); {} did not come up: check "
        "MASTER_ADDR and MASTER_PORT, and that the process of rank 0 was started",
        r.rank, r.address, r.port, seconds, first_line(e.what()),
        r.launcher_hosts_store ? "the launcher's store" : "rank 0");
  }
  // NOTE: keys of an earlier attempt of the same job (torchrun restarts workers on the agent's store)
  // must not count: they carry the attempt.
  const char* attempt = std::getenv("TORCHELASTIC_RESTART_COUNT");
  const std::string prefix = fmt::format("fabric/rendezvous/{}/", attempt != nullptr ? attempt : "0");
  try {
    tcp->set(prefix + std::to_string(r.rank), std::vector<std::uint8_t>{1});
    const std::int64_t arrived = tcp->add(prefix + "arrived", 1);
    for (std::int64_t count = arrived; count < r.world_size; count = tcp->add(prefix + "arrived", 0)) {
      if (clock::now() >= deadline) {
        std::vector<int> missing;
        for (int rank = 0; rank < r.world_size; ++rank) {
          if (!tcp->check({prefix + std::to_string(rank)})) missing.push_back(rank);
        }
        raise(
            "rank {} waited {} s at {}:{} for the other processes of a world of {}, and {} never arrived; start "
            "every process of the job (devices * num_nodes = WORLD_SIZE), or raise the timeout",
            r.rank, seconds, r.address, r.port, r.world_size, rank_list(missing));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  } catch (const fabric::Error&) {
    throw;
  } catch (const std::exception& e) {
    raise(
        "rank {} lost the rendezvous store at {}:{} while waiting for the other processes ({}); the process that "
        "serves it (rank 0) probably ended",
        r.rank, r.address, r.port, first_line(e.what()));
  }
  return c10::make_intrusive<c10d::PrefixStore>("default_pg", std::move(tcp));
}

/// Returns true when this LibTorch can make a process group with the named backend.
inline bool has_backend(std::string_view backend) {
  if (backend == "gloo") return FABRIC_HAS_GLOO;
  if (backend == "nccl") return FABRIC_HAS_NCCL;
  return false;
}

#if FABRIC_HAS_GLOO
inline bool is_loopback(const std::string& address) {
  return address == "localhost" || address.rfind("127.", 0) == 0 || address == "::1";
}
#endif

/// Creates the backend's group over a store every rank has checked in to.
inline c10::intrusive_ptr<c10d::ProcessGroup> connect_group(const std::string& backend,
                                                            const c10::intrusive_ptr<c10d::Store>& store,
                                                            const Rendezvous& r, bool single_node) {
  [[maybe_unused]] const bool single = single_node;
#if FABRIC_HAS_GLOO
  if (backend == "gloo") {
    auto options = c10d::ProcessGroupGloo::Options::create(r.timeout);
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0') {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (single && is_loopback(r.address)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, r.rank, r.world_size, options);
#if FABRIC_TORCH_PROCESS_GROUP_BACKENDS
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, r.rank, r.world_size);
    pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO,
                   c10::intrusive_ptr<c10d::Backend>(gloo));
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    return pg;
#else
    return gloo;
#endif
  }
#endif
#if FABRIC_HAS_NCCL
  if (backend == "nccl") {
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = r.timeout;
    auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, r.rank, r.world_size, options);
#if FABRIC_TORCH_PROCESS_GROUP_BACKENDS
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, r.rank, r.world_size);
    pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL,
                   c10::intrusive_ptr<c10d::Backend>(nccl));
    pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
    return pg;
#else
    return nccl;
#endif
  }
#endif
  raise("unknown process group backend \"{}\"; expected \"gloo\" or \"nccl\"", backend);
}

/// The default process group of a job and the store its processes met at (new groups meet there too).
struct Connection {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
};

/// Creates the default process group of the job with the backend ("gloo" or "nccl"): the rendezvous,
/// then the backend's connections, each within the timeout and failing with a fabric::Error.
inline Connection make_process_group(const std::string& backend, const Rendezvous& r, bool single_node) {
  if (!has_backend(backend)) {
    raise(
        "the process group backend \"{}\" is not available in this LibTorch (gloo: {}, nccl: {}); use the "
        "accelerator whose backend exists (gloo for the CPU, nccl for CUDA) or set DDP's process_group_backend",
        backend, FABRIC_HAS_GLOO ? "yes" : "no", FABRIC_HAS_NCCL ? "yes" : "no");
  }
  c10d::setDebugLevelFromEnvironment();
  auto store = make_store(r);
  try {
    auto pg = connect_group(backend, store, r, single_node);
    return {std::move(store), std::move(pg)};
  } catch (const fabric::Error&) {
    throw;
  } catch (const std::exception& e) {
    raise(
        "rank {} could not connect the {} process group of {} processes ({}); another process probably ended "
        "during the rendezvous, or the network between the nodes is blocked (GLOO_SOCKET_IFNAME chooses the "
        "interface)",
        r.rank, backend, r.world_size, first_line(e.what()));
  }
}

/// Creates the backend's group of `ranks` (global ranks, sorted) over a store of its own under the job's
/// store; only the members call it, `rank` being this process's index in `ranks`. `index` numbers the
/// groups of the job (every process creates them in the same order).
inline c10::intrusive_ptr<c10d::ProcessGroup> make_subgroup(const std::string& backend,
                                                            const c10::intrusive_ptr<c10d::Store>& store,
                                                            std::size_t index, const std::vector<int>& ranks, int rank,
                                                            const Rendezvous& world, bool single_node) {
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(fmt::format("fabric/group/{}", index), store);
  Rendezvous r = world;
  r.rank = rank;
  r.world_size = static_cast<int>(ranks.size());
  try {
    return connect_group(backend, prefixed, r, single_node);
  } catch (const fabric::Error&) {
    throw;
  } catch (const std::exception& e) {
    raise(
        "new_group: rank {} could not connect the {} group of ranks [{}] ({}); every member must call new_group with "
        "the same ranks, after the same earlier new_group calls",
        world.rank, backend, fmt::join(ranks, ", "), first_line(e.what()));
  }
}

/// Shuts a process group down where LibTorch has that step (2.x; NCCL warns at exit without it).
template <class PG>
void shutdown_process_group(PG& pg) {
  if constexpr (requires { pg->shutdown(); }) {
    try {
      pg->shutdown();
    } catch (...) {  // NOTE: teardown must not throw; a failed shutdown only means the peers are gone.
    }
  }
}

/// Creates c10d's Reducer (PyTorch's DDP engine) with whichever constructor this LibTorch has.
template <class R = c10d::Reducer>
std::unique_ptr<R> make_reducer(std::vector<at::Tensor> params, std::vector<std::vector<std::size_t>> buckets,
                                std::vector<std::size_t> bucket_limits,
                                const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::int64_t bucket_bytes,
                                bool find_unused, bool gradient_as_bucket_view,
                                std::unordered_map<std::size_t, std::string> names, std::int64_t first_bucket_bytes) {
  using Params = std::vector<at::Tensor>;
  using Buckets = std::vector<std::vector<std::size_t>>;
  using Names = std::unordered_map<std::size_t, std::string>;
  using PG = c10::intrusive_ptr<c10d::ProcessGroup>;
  std::vector<bool> sparse(params.size(), false);
  if constexpr (std::is_constructible_v<R, Params, Buckets, std::vector<std::size_t>, PG, std::vector<bool>,
                                        std::int64_t, bool, bool, Names, std::int64_t>) {
    // LibTorch 1.13
    return std::make_unique<R>(std::move(params), std::move(buckets), std::move(bucket_limits), pg, std::move(sparse),
                               bucket_bytes, find_unused, gradient_as_bucket_view, std::move(names),
                               first_bucket_bytes);
  } else if constexpr (std::is_constructible_v<R, Params, Buckets, PG, std::vector<bool>, std::int64_t, bool, bool,
                                               Names, std::int64_t, bool, bool, std::vector<std::int64_t>>) {
    // LibTorch 2.x: skip_all_reduce_unused_params, use_python_reducer, bucket_bytes_cap_list
    (void)bucket_limits;
    return std::make_unique<R>(std::move(params), std::move(buckets), pg, std::move(sparse), bucket_bytes, find_unused,
                               gradient_as_bucket_view, std::move(names), first_bucket_bytes, false, false,
                               std::vector<std::int64_t>{});
  } else if constexpr (std::is_constructible_v<R, Params, Buckets, PG, std::vector<bool>, std::int64_t, bool, bool,
                                               Names, std::int64_t, bool, bool, std::vector<std::int64_t>, bool>) {
    // later 2.x: batched_grad_copy
    (void)bucket_limits;
    return std::make_unique<R>(std::move(params), std::move(buckets), pg, std::move(sparse), bucket_bytes, find_unused,
                               gradient_as_bucket_view, std::move(names), first_bucket_bytes, false, false,
                               std::vector<std::int64_t>{}, false);
  } else {
    static_assert(sizeof(R) == 0,
                  "fabric: this LibTorch's c10d::Reducer constructor is not known; add it to make_reducer in "
                  "fabric/detail/c10d.hpp");
  }
}

/// The bf16 gradient-compression hook (c10d has only fp16 built in): each bucket is cast to bfloat16,
/// divided by the world size, all-reduced and copied back.
// NOTE: derives from CommHookInterface, not CppCommHookInterface, whose parse helper Debian's 1.13
// does not export.
class BF16CompressHook final : public c10d::CommHookInterface {
 public:
  explicit BF16CompressHook(c10::intrusive_ptr<c10d::ProcessGroup> pg) : pg_(std::move(pg)) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    at::Tensor buffer = bucket.getBufferRef();
    std::vector<at::Tensor> compressed{buffer.to(at::kBFloat16).div_(pg_->getSize())};
    return pg_->allreduce(compressed)
        ->getFuture()
        ->then(
            [buffer](c10::ivalue::Future& f) {
              at::Tensor out = buffer;
              out.copy_(f.value().toTensorVector()[0]);
              return c10::IValue(out);
            },
            c10::TensorType::get());
  }
  at::Tensor parseHookResult(const c10::IValue& result) override {
    return result.isTensor() ? result.toTensor() : result.toTensorVector()[0];
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
};

}  // namespace fabric::detail
