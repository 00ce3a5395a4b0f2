#pragma once
// A torch-free validator of the zip archives torch writes (torch::pickle_save, torch::save, Python's
// torch.save), run on a file's bytes before LibTorch's zip reader sees them: LibTorch reads an
// in-memory archive without bounds checks, so a truncated or hostile file could crash the process.

#include "fabric/core/error.hpp"
#include "fabric/detail/crc.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace fabric::detail {

/// One stored entry of a checked zip archive: its name and where its bytes lie in the file.
struct ZipEntry {
  std::string name;
  std::uint64_t header_offset = 0;
  std::uint64_t data_offset = 0;
  std::uint64_t size = 0;      ///< bytes in the file
  std::uint64_t unpacked = 0;  ///< bytes once inflated (size when stored)
  std::uint32_t crc = 0;       ///< the zip CRC-32 of the unpacked bytes
  bool stored = true;          ///< stored as is, else deflated (LibTorch's archives deflate some code records)
};

/// A checked zip archive: the folder its entries share (torch's archive name) and its entries, in the
/// order of its central directory.
struct ZipArchive {
  std::string prefix;
  std::vector<ZipEntry> entries;
  /// Returns the entry named prefix + "/" + name, or null.
  const ZipEntry* find(std::string_view name) const {
    for (const auto& e : entries) {
      if (e.name.size() == prefix.size() + 1 + name.size() && e.name.compare(prefix.size() + 1, name.size(), name) == 0)
        return &e;
    }
    return nullptr;
  }
};

namespace zip {

inline constexpr std::uint32_t local_sig = 0x04034b50U;
inline constexpr std::uint32_t central_sig = 0x02014b50U;
inline constexpr std::uint32_t end_sig = 0x06054b50U;
inline constexpr std::uint32_t end64_sig = 0x06064b50U;
inline constexpr std::uint32_t locator64_sig = 0x07064b50U;
inline constexpr std::size_t local_size = 30;
inline constexpr std::size_t central_size = 46;
inline constexpr std::size_t end_size = 22;
inline constexpr std::size_t end64_size = 56;
inline constexpr std::size_t locator64_size = 20;

inline std::uint64_t le(const unsigned char* p, int bytes) noexcept {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace zip

/// Checks that bytes hold a zip archive as torch writes it, so that LibTorch's reader only reads inside
/// the buffer: the end-of-central-directory record (and the zip64 records, if any) found and consistent,
/// every directory entry and its local header inside the file, sizes and offsets without overflow, entries
/// stored (uncompressed) or deflated within deflate's ratio (LibTorch's own archives deflate their code
/// records), not overlapping, names sane and unique, all in one folder, with torch's `data.pkl` and
/// `version` records. Raises fabric::Error naming `what` (the file) and what was `expected` otherwise.
inline ZipArchive check_torch_zip(const char* bytes, std::size_t size, std::string_view what,
                                  std::string_view expected = "a zip archive as torch writes it") {
  const auto* d = reinterpret_cast<const unsigned char*>(bytes);
  auto fail = [&](const std::string& found) {
    raise(
        "could not read {}: expected {}, found {}; the file is truncated, corrupt or of another format: write it "
        "again or restore it from a good copy",
        what, expected, found);
  };
  using zip::le;
  if (size < zip::end_size) fail(fmt::format("a file of {} bytes, too short for a zip archive", size));
  // NOTE: miniz takes the last end-of-central-directory signature of the file; so does this search.
  std::size_t end = size;
  const std::size_t lowest = size - zip::end_size > 65535 ? size - zip::end_size - 65535 : 0;
  for (std::size_t pos = size - zip::end_size + 1; pos-- > lowest;) {
    if (le(d + pos, 4) == zip::end_sig) {
      end = pos;
      break;
    }
  }
  if (end == size) fail("no end-of-central-directory record (the end of the file is missing or it is no zip)");
  const std::uint64_t comment = le(d + end + 20, 2);
  if (end + zip::end_size + comment != size) {
    fail(
        fmt::format("an end-of-central-directory record at byte {} whose comment ({} bytes) does not end the file "
                    "({} bytes)",
                    end, comment, size));
  }
  if (le(d + end + 4, 2) != 0 || le(d + end + 6, 2) != 0 || le(d + end + 8, 2) != le(d + end + 10, 2)) {
    fail("an archive spanning several disks");
  }
  std::uint64_t count = le(d + end + 10, 2);
  std::uint64_t dir_size = le(d + end + 12, 4);
  std::uint64_t dir_offset = le(d + end + 16, 4);
  std::uint64_t dir_end = end;
  if (end >= zip::locator64_size && le(d + end - zip::locator64_size, 4) == zip::locator64_sig) {
    const auto* loc = d + end - zip::locator64_size;
    const std::uint64_t record = le(loc + 8, 8);
    const std::uint64_t locator = end - zip::locator64_size;
    if (le(loc + 4, 4) != 0 || le(loc + 16, 4) != 1) fail("a zip64 archive spanning several disks");
    if (record > locator || locator - record < zip::end64_size || le(d + record, 4) != zip::end64_sig) {
      fail(fmt::format("a zip64 locator pointing at byte {}, where there is no zip64 end-of-central-directory record",
                       record));
    }
    const auto* r = d + record;
    if (le(r + 4, 8) != locator - record - 12) fail("a zip64 end-of-central-directory record of the wrong size");
    if (le(r + 16, 4) != 0 || le(r + 20, 4) != 0 || le(r + 24, 8) != le(r + 32, 8)) {
      fail("a zip64 archive spanning several disks");
    }
    count = le(r + 32, 8);
    dir_size = le(r + 40, 8);
    dir_offset = le(r + 48, 8);
    dir_end = record;
  }
  if (dir_offset > dir_end || dir_end - dir_offset != dir_size) {
    fail(
        fmt::format("a central directory of {} bytes at byte {} that does not end where the end record begins "
                    "(byte {})",
                    dir_size, dir_offset, dir_end));
  }
  if (count == 0) fail("an archive without entries");
  if (count > dir_size / zip::central_size) {
    fail(fmt::format("{} entries announced in a central directory of {} bytes", count, dir_size));
  }
  ZipArchive archive;
  archive.entries.reserve(static_cast<std::size_t>(count));
  std::uint64_t p = dir_offset;
  for (std::uint64_t i = 0; i < count; ++i) {
    auto bad = [&](const std::string& found) { fail(fmt::format("central directory entry {}: {}", i, found)); };
    if (dir_end - p < zip::central_size || le(d + p, 4) != zip::central_sig) bad("no entry header");
    const auto* c = d + p;
    const std::uint64_t flags = le(c + 8, 2);
    const std::uint64_t method = le(c + 10, 2);
    std::uint64_t packed = le(c + 20, 4);
    std::uint64_t unpacked = le(c + 24, 4);
    const std::uint64_t name_len = le(c + 28, 2);
    const std::uint64_t extra_len = le(c + 30, 2);
    const std::uint64_t comment_len = le(c + 32, 2);
    std::uint64_t disk = le(c + 34, 2);
    std::uint64_t header = le(c + 42, 4);
    if (dir_end - p - zip::central_size < name_len + extra_len + comment_len)
      bad("a name or extra field past the directory");
    if ((flags & 0x41U) != 0) bad("an encrypted entry");
    if (method != 0 && method != 8) {
      bad(
          fmt::format("compression method {} (torch stores entries uncompressed or deflated; an archive re-packed by "
                      "a zip tool must be stored with `zip -0`)",
                      method));
    }
    const std::string name(reinterpret_cast<const char*>(c + zip::central_size), static_cast<std::size_t>(name_len));
    // The zip64 extended information: 8-byte values for those of the fixed fields that are saturated.
    const auto* extra = c + zip::central_size + name_len;
    for (std::uint64_t x = 0; x < extra_len;) {
      if (extra_len - x < 4) bad("a malformed extra field");
      const std::uint64_t id = le(extra + x, 2);
      const std::uint64_t len = le(extra + x + 2, 2);
      if (extra_len - x - 4 < len) bad("a malformed extra field");
      if (id == 1) {
        const auto* z = extra + x + 4;
        std::uint64_t left = len;
        auto take = [&](std::uint64_t& field, std::uint64_t saturated, int bytes) {
          if (field != saturated) return;
          if (left < static_cast<std::uint64_t>(bytes)) bad("a zip64 field missing from the extra field");
          field = le(z, bytes);
          z += bytes;
          left -= static_cast<std::uint64_t>(bytes);
        };
        take(unpacked, 0xFFFFFFFFU, 8);
        take(packed, 0xFFFFFFFFU, 8);
        take(header, 0xFFFFFFFFU, 8);
        take(disk, 0xFFFFU, 4);
      }
      x += 4 + len;
    }
    if (packed == 0xFFFFFFFFU || unpacked == 0xFFFFFFFFU || header == 0xFFFFFFFFU)
      bad("a zip64 size or offset without its extra field");
    if (disk != 0) bad("an entry on another disk");
    if (method == 0 && packed != unpacked) {
      bad(fmt::format("a stored entry of {} bytes that unpacks to {}", packed, unpacked));
    }
    // NOTE: deflate expands at most 1032 times; a larger claim would only make the reader allocate.
    constexpr std::uint64_t max_inflated = std::uint64_t{1} << 30;
    if (method == 8 && (unpacked > max_inflated || unpacked / 1032 > packed)) {
      bad(fmt::format("a deflated entry of {} bytes that claims to inflate to {}", packed, unpacked));
    }
    const bool name_ok = !name.empty() && name.size() <= 4096 && name.front() != '/' &&
                         name.find('\0') == std::string::npos && name.find('\\') == std::string::npos &&
                         name.find('/') != std::string::npos && name.find('/') != 0 &&
                         name.find("//") == std::string::npos && name != ".." && !name.starts_with("../") &&
                         name.find("/../") == std::string::npos && !name.ends_with("/..") && !name.ends_with("/");
    if (!name_ok)
      bad(fmt::format("the name \"{}\", not a file inside torch's archive folder", fmt::format("{:.64}", name)));
    const std::string prefix = name.substr(0, name.find('/'));
    if (i == 0) {
      archive.prefix = prefix;
    } else if (prefix != archive.prefix) {
      bad(fmt::format("\"{}\" outside the archive folder \"{}\"", name, archive.prefix));
    }
    if (header > dir_offset || dir_offset - header < zip::local_size || le(d + header, 4) != zip::local_sig) {
      bad(fmt::format("\"{}\": no local header at byte {}", name, header));
    }
    const auto* l = d + header;
    const std::uint64_t local_name = le(l + 26, 2);
    const std::uint64_t local_extra = le(l + 28, 2);
    if (le(l + 8, 2) != method) bad(fmt::format("\"{}\": a local header of another compression method", name));
    if (dir_offset - header - zip::local_size < local_name + local_extra)
      bad(fmt::format("\"{}\": a local header past the data", name));
    if (local_name != name_len ||
        std::string_view(reinterpret_cast<const char*>(l + zip::local_size), local_name) != name) {
      bad(fmt::format("\"{}\": a local header of another name", name));
    }
    const std::uint64_t data = header + zip::local_size + local_name + local_extra;
    if (dir_offset - data < packed) {
      bad(fmt::format("\"{}\": {} bytes at byte {}, past the end of the entries (byte {})", name, packed, data,
                      dir_offset));
    }
    archive.entries.push_back(
        {name, header, data, packed, unpacked, static_cast<std::uint32_t>(le(c + 16, 4)), method == 0});
    p += zip::central_size + name_len + extra_len + comment_len;
  }
  if (p != dir_end) fail(fmt::format("{} bytes after the last central directory entry", dir_end - p));
  std::vector<const ZipEntry*> order;
  order.reserve(archive.entries.size());
  for (const auto& e : archive.entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->header_offset < b->header_offset; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (order[i]->header_offset < order[i - 1]->data_offset + order[i - 1]->size) {
      fail(fmt::format("the entries \"{}\" and \"{}\" overlapping", order[i - 1]->name, order[i]->name));
    }
  }
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    if (order[i]->name == order[i - 1]->name) fail(fmt::format("the entry \"{}\" twice", order[i]->name));
  }
  if (archive.find("data.pkl") == nullptr) fail(fmt::format("no \"{}/data.pkl\" record", archive.prefix));
  if (archive.find("version") == nullptr && archive.find(".data/version") == nullptr) {
    fail(fmt::format("no \"{}/version\" record", archive.prefix));
  }
  return archive;
}

/// Checks the zip CRC-32 of the stored entries of a checked archive that `select(entry)` picks (deflated
/// ones are left to the inflater); raises fabric::Error naming the first corrupt entry.
template <class Select>
void check_zip_crcs(const char* bytes, const ZipArchive& archive, Select&& select, std::string_view what) {
  for (const auto& e : archive.entries) {
    if (!e.stored || !select(e)) continue;
    const std::uint32_t crc = crc32(bytes + e.data_offset, static_cast<std::size_t>(e.size));
    if (crc != e.crc) {
      raise(
          "{} is corrupt: the record \"{}\" ({} bytes) has CRC-32 {:08x}, expected {:08x} as its zip header says; "
          "restore the file from a good copy",
          what, e.name, e.size, crc, e.crc);
    }
  }
}

}  // namespace fabric::detail
