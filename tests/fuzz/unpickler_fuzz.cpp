// libFuzzer target of fabric's restricted unpickler and the zip reader before it (torch-free): any
// bytes, read as a pickle and as a torch.save zip file, either give a value tree or fabric::Error;
// never a crash, a hang or a sanitizer report. Built by tools/test.sh with clang-19
// -fsanitize=fuzzer,address,undefined; the seeds are pickles and small files of Python's torch.save.
#include <fabric/detail/unpickler.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <string_view>

namespace {

namespace pickle = fabric::detail::pickle;

// What the reader promises of a tree: tensors name storages whose records exist in the archive.
// Each value once: a memoized value can appear many times (a DAG), or inside itself.
void check(const pickle::ValuePtr& v, const pickle::ZipArchive* zip, const std::string& prefix,
           std::set<const pickle::Value*>& seen) {
  if (!seen.insert(v.get()).second) return;
  if (v->kind == pickle::Value::Kind::tensor) {
    if (!v->tensor || !v->tensor->storage || v->tensor->size.size() != v->tensor->stride.size()) std::abort();
    if (zip != nullptr) (void)zip->contains(prefix + "/data/" + v->tensor->storage->key);
  }
  for (const auto& item : v->items) {
    if (!item) std::abort();
    check(item, zip, prefix, seen);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  pickle::Limits limits;
  limits.max_values = 1u << 16;  // small bounds keep each input fast
  limits.max_stack = 1u << 14;
  limits.max_memo = 1u << 14;
  try {
    std::set<const pickle::Value*> seen;
    const pickle::Tree tree(bytes, limits);
    check(tree.root(), nullptr, "", seen);
  } catch (const fabric::Error&) {
  }
  try {
    const pickle::ZipArchive zip(bytes, limits);
    for (const auto& [name, where] : zip.entries()) {
      if (where.first > size || where.second > size - where.first) std::abort();
    }
    const std::string prefix = pickle::archive_prefix(zip);
    std::set<const pickle::Value*> seen;
    const pickle::Tree tree(zip.record(prefix + "/data.pkl"), limits);
    check(tree.root(), &zip, prefix, seen);
  } catch (const fabric::Error&) {
  }
  (void)pickle::legacy_torch_file(bytes);
  return 0;
}
