// libFuzzer target of the rank files of fabric's sharded checkpoints (torch-free): any bytes either parse into
// shards whose byte ranges lie inside the file and whose element ranges lie inside their shapes, or give
// fabric::Error; the ranges of the shards then pass or fail check_ranges, never crash. Built by tools/test.sh
// with clang-19 -fsanitize=fuzzer,address,undefined.
#include <fabric/detail/sharded_index.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <span>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace sharded = fabric::detail::sharded;
  try {
    const auto shards = sharded::parse_rank_file(std::span<const unsigned char>(data, size), size, 0, 1);
    std::map<std::string, std::vector<sharded::Range>> ranges;
    for (const auto& s : shards) {
      // What the parser promises: the bytes lie in the file, the elements in the shape.
      if (s.offset > size || s.bytes > size - s.offset) std::abort();
      if (s.begin < 0 || s.count < 0 || s.begin + s.count > s.numel) std::abort();
      ranges[s.key].push_back({0, s.begin, s.count});
    }
    for (const auto& s : shards) sharded::check_ranges("fuzz", s.key, s.shape, s.numel, ranges[s.key]);
  } catch (const fabric::Error&) {
  }
  return 0;
}
