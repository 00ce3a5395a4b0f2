#pragma once
// CRC-32 (the zip checksum, polynomial 0xEDB88320) and CRC-32C (Castagnoli, 0x82F63B78; the SSE4.2 crc32
// instruction where the CPU has it): the checksums of checkpoint files. Torch-free.

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define FABRIC_CRC32C_X86 1
#endif

namespace fabric::detail {

/// Slicing-by-8 tables of a reflected CRC polynomial.
template <std::uint32_t Poly>
struct CrcTables {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  constexpr CrcTables() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1U) != 0 ? (c >> 1) ^ Poly : c >> 1;
      t[0][i] = c;
    }
    for (std::uint32_t i = 0; i < 256; ++i) {
      for (std::size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFU];
    }
  }
};

template <std::uint32_t Poly>
inline constexpr CrcTables<Poly> crc_tables{};

/// Continues a reflected CRC over bytes in software (slicing by 8); crc is the running value, not inverted.
template <std::uint32_t Poly>
inline std::uint32_t crc_software(std::uint32_t crc, const unsigned char* p, std::size_t n) noexcept {
  const auto& t = crc_tables<Poly>.t;
  while (n >= 8) {
    std::uint32_t lo = 0;
    std::uint32_t hi = 0;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    if constexpr (std::endian::native == std::endian::big) {
      lo = __builtin_bswap32(lo);
      hi = __builtin_bswap32(hi);
    }
    lo ^= crc;
    crc = t[7][lo & 0xFFU] ^ t[6][(lo >> 8) & 0xFFU] ^ t[5][(lo >> 16) & 0xFFU] ^ t[4][lo >> 24] ^ t[3][hi & 0xFFU] ^
          t[2][(hi >> 8) & 0xFFU] ^ t[1][(hi >> 16) & 0xFFU] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFFU];
  return crc;
}

/// Returns the CRC-32 of bytes as zip files store it, continuing from a previous result (0 to start).
inline std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t previous = 0) noexcept {
  return ~crc_software<0xEDB88320U>(~previous, static_cast<const unsigned char*>(data), n);
}

#ifdef FABRIC_CRC32C_X86
__attribute__((target("sse4.2"))) inline std::uint32_t crc32c_sse42(std::uint32_t crc, const unsigned char* p,
                                                                    std::size_t n) noexcept {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t v = 0;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  auto c32 = static_cast<std::uint32_t>(c);
  while (n-- > 0) c32 = __builtin_ia32_crc32qi(c32, *p++);
  return c32;
}

inline bool cpu_has_sse42() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_SSE4_2) != 0;
}
#endif

/// Returns the CRC-32C of bytes, continuing from a previous result (0 to start); uses the CPU's crc32
/// instruction when it has one (several GB/s), else tables.
inline std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t previous = 0) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
#ifdef FABRIC_CRC32C_X86
  static const bool hardware = cpu_has_sse42();
  if (hardware) return ~crc32c_sse42(~previous, p, n);
#endif
  return ~crc_software<0x82F63B78U>(~previous, p, n);
}

}  // namespace fabric::detail
