// libFuzzer target of fabric's zip validator (torch-free): any bytes either give fabric::Error or a checked
// archive whose every entry, local header and record lies inside the buffer, in the folder it names, not
// overlapping another; never a crash, a hang or a sanitizer report. Built with clang-19
// -fsanitize=fuzzer,address,undefined (FABRIC_FUZZ=ON); tools/test.sh runs it for about a minute.
#include <fabric/detail/zip_check.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A copy of exactly size bytes, so that AddressSanitizer sees any read past the end.
  const std::vector<char> bytes(data, data + size);
  try {
    const auto archive = fabric::detail::check_torch_zip(bytes.data(), bytes.size(), "fuzz input");
    if (archive.entries.empty() || archive.prefix.empty()) std::abort();
    std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
    for (const auto& e : archive.entries) {
      if (e.header_offset + 30 + e.name.size() > e.data_offset || e.data_offset > size || e.size > size - e.data_offset)
        std::abort();
      if (!e.name.starts_with(archive.prefix + "/")) std::abort();
      ranges.emplace_back(e.header_offset, e.data_offset + e.size);
    }
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t i = 1; i < ranges.size(); ++i) {
      if (ranges[i].first < ranges[i - 1].second) std::abort();
    }
    if (archive.find("data.pkl") == nullptr) std::abort();
    // Reads every entry's bytes (what LibTorch's reader would read).
    fabric::detail::check_zip_crcs(
        bytes.data(), archive, [](const fabric::detail::ZipEntry&) { return true; }, "fuzz input");
  } catch (const fabric::Error&) {
  }
  return 0;
}
