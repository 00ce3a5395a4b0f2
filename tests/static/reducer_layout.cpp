// Where LibTorch lacks the distributed-autograd header that c10d's reducer.hpp includes (Debian's 1.13),
// fabric declares the Reducer's members itself over opaque storage (fabric/detail/reducer_compat.hpp).
// This test compiles the real reducer.hpp (with a stand-in for the missing header) and checks that the
// real object fits that storage, and that the constructor fabric calls is the one the header declares.
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include <fabric/detail/reducer_storage.hpp>

#include <cstddef>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

static_assert(sizeof(c10d::Reducer) <= fabric::detail::reducer_storage_bytes,
              "c10d::Reducer outgrew the storage of fabric/detail/reducer_compat.hpp; raise reducer_storage_bytes");
static_assert(alignof(c10d::Reducer) <= alignof(std::max_align_t));
static_assert(
    std::is_constructible_v<c10d::Reducer, std::vector<at::Tensor>, std::vector<std::vector<std::size_t>>,
                            std::vector<std::size_t>, c10::intrusive_ptr<c10d::ProcessGroup>, std::vector<bool>,
                            std::int64_t, bool, bool, std::unordered_map<std::size_t, std::string>, std::int64_t>);
static_assert(c10d::kDefaultFirstBucketBytes == 1024 * 1024);

int main() { return 0; }
