// libFuzzer target of fabric's safetensors header parser (torch-free): any bytes either parse into a
// header whose byte ranges cover the file's data exactly, or give fabric::Error; never a crash, a hang
// or a sanitizer report. Built by tools/test.sh with clang-19 -fsanitize=fuzzer,address,undefined.
#include <fabric/detail/safetensors_header.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto header = fabric::detail::safetensors::parse_header(std::span<const unsigned char>(data, size), size);
    // What the parser promises: every tensor lies inside the file, in order, and they end at its end.
    std::uint64_t at = 0;
    for (const auto& t : header.tensors) {
      if (t.begin != at || t.end < t.begin || header.data_start + t.end > size) std::abort();
      at = t.end;
    }
    if (header.data_start + at != size) std::abort();
  } catch (const fabric::Error&) {
  }
  return 0;
}
