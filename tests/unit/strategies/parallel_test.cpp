// The parallel base's process settings: the threads each local process gets.
#include <fabric/distributed.hpp>

#include <torch/torch.h>
#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include <stdlib.h>

namespace {

/// Restores torch's thread count and OMP_NUM_THREADS when the test ends.
class ThreadsGuard {
 public:
  ThreadsGuard() : threads_(at::get_num_threads()) {
    if (const char* v = std::getenv("OMP_NUM_THREADS")) omp_ = v;
  }
  ~ThreadsGuard() {
    at::set_num_threads(threads_);
    if (omp_) {
      ::setenv("OMP_NUM_THREADS", omp_->c_str(), 1);
    } else {
      ::unsetenv("OMP_NUM_THREADS");
    }
  }
  ThreadsGuard(const ThreadsGuard&) = delete;
  ThreadsGuard& operator=(const ThreadsGuard&) = delete;

 private:
  int threads_;
  std::optional<std::string> omp_{};
};

}  // namespace

// Lightning: tests_fabric/utilities/test_distributed.py::test_set_num_threads_if_needed
TEST_CASE("local processes share the cores when OMP_NUM_THREADS is unset, as in Lightning", "[ddp][threads]") {
  ThreadsGuard guard;
  const int cpus = fabric::detail::available_cpus();
  CHECK(cpus >= 1);
  CHECK(cpus <= static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));

  ::unsetenv("OMP_NUM_THREADS");
  at::set_num_threads(cpus);
  fabric::detail::set_num_threads_if_needed(1);  // one process per node: nothing to share
  CHECK(at::get_num_threads() == cpus);
  CHECK(std::getenv("OMP_NUM_THREADS") == nullptr);

  fabric::detail::set_num_threads_if_needed(2);
  const int expected = std::max(1, cpus / 2);
  CHECK(at::get_num_threads() == expected);
  REQUIRE(std::getenv("OMP_NUM_THREADS") != nullptr);
  CHECK(std::string(std::getenv("OMP_NUM_THREADS")) == std::to_string(expected));

  // More processes than cores: one thread each, never zero.
  ::unsetenv("OMP_NUM_THREADS");
  fabric::detail::set_num_threads_if_needed(cpus + 1);
  CHECK(at::get_num_threads() == 1);
  CHECK(std::string(std::getenv("OMP_NUM_THREADS")) == "1");

  // A user's value is kept, and so are torch's threads.
  ::setenv("OMP_NUM_THREADS", "7", 1);
  at::set_num_threads(3);
  fabric::detail::set_num_threads_if_needed(2);
  CHECK(at::get_num_threads() == 3);
  CHECK(std::string(std::getenv("OMP_NUM_THREADS")) == "7");
}
