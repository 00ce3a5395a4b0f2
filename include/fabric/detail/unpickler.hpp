#pragma once
// The torch-free core of reading and writing Python's checkpoints: a reader of the zip container
// torch.save writes (stored entries, zip64, every offset and size checked against the file), a
// restricted unpickler that builds a tree of plain values from the pickle opcodes torch.save emits
// (protocols 2-5) and refuses every global outside an allow-list (it never calls anything), and a
// writer of protocol-2 pickles. fabric::TorchCheckpointIO (io/torch_pickle.hpp) turns the tree into
// tensors and dictionaries; the fuzz target tests/fuzz/unpickler_fuzz.cpp drives this file alone.

#include "fabric/core/error.hpp"

#include <fmt/format.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fabric::detail::pickle {

// ---- the value tree ------------------------------------------------------------------------------

struct Value;
using ValuePtr = std::shared_ptr<Value>;

/// A storage named by a persistent id ('storage', torch.FloatStorage, key, location, numel).
struct StorageRef {
  std::string dtype;  ///< "Float", "Long", "BFloat16", ... ("Byte" for an untyped storage)
  std::string key;    ///< the record data/<key> holding its bytes
  std::string location;
  std::int64_t numel = 0;  ///< elements of dtype (bytes for an untyped storage)
};

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
struct TensorRef {
  std::shared_ptr<StorageRef> storage;
  std::int64_t offset = 0;
  std::vector<std::int64_t> size;
  std::vector<std::int64_t> stride;
  bool requires_grad = false;
};

/// One value of the tree. Lists, tuples and dictionaries hold shared children (a memoized value can
/// appear several times); dictionaries keep their insertion order as alternating keys and values.
struct Value {
  enum class Kind { none, boolean, integer, floating, string, bytes, list, tuple, dict, global, storage, tensor };
  Kind kind = Kind::none;
  bool boolean = false;
  std::int64_t integer = 0;
  double floating = 0.0;
  std::string text;  ///< string, bytes, or the "module.name" of a global
  std::vector<ValuePtr> items;
  std::shared_ptr<StorageRef> storage;
  std::shared_ptr<TensorRef> tensor;

  static ValuePtr make(Kind k) {
    auto v = std::make_shared<Value>();
    v->kind = k;
    return v;
  }
};

inline const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::none:
      return "None";
    case Value::Kind::boolean:
      return "a bool";
    case Value::Kind::integer:
      return "an int";
    case Value::Kind::floating:
      return "a float";
    case Value::Kind::string:
      return "a str";
    case Value::Kind::bytes:
      return "bytes";
    case Value::Kind::list:
      return "a list";
    case Value::Kind::tuple:
      return "a tuple";
    case Value::Kind::dict:
      return "a dict";
    case Value::Kind::global:
      return "a global";
    case Value::Kind::storage:
      return "a storage";
    case Value::Kind::tensor:
      return "a tensor";
  }
  return "a value";
}

// ---- limits ---------------------------------------------------------------------------------------

/// Bounds of the reader: a hostile file fails with fabric::Error instead of exhausting memory.
struct Limits {
  std::size_t max_stack = 1u << 20;        ///< values on the stack and mark stack together
  std::size_t max_memo = 1u << 20;         ///< memo entries
  std::size_t max_values = 1u << 24;       ///< values created in all
  std::size_t max_container = 1u << 24;    ///< items in one list, tuple or dictionary
  std::size_t max_zip_entries = 1u << 20;  ///< records in the zip archive
  std::size_t max_dims = 64;               ///< dimensions of a tensor
};

// ---- the allow-list -------------------------------------------------------------------------------

/// The element type of a storage global ("torch.FloatStorage" -> "Float"), empty when it is not one.
inline std::string storage_dtype(std::string_view global) {
  static constexpr const char* typed[] = {"Double",       "Float",         "Half",  "BFloat16", "Long",
                                          "Int",          "Short",         "Char",  "Byte",     "Bool",
                                          "ComplexFloat", "ComplexDouble", "QInt8", "QUInt8"};
  if (global == "torch.UntypedStorage" || global == "torch.storage.UntypedStorage" ||
      global == "torch.storage._UntypedStorage" || global == "torch._UntypedStorage") {
    return "Byte";
  }
  for (const char* t : typed) {
    if (global == fmt::format("torch.{}Storage", t) || global == fmt::format("torch.cuda.{}Storage", t)) {
      if (std::string_view(t).starts_with("Q")) return {};
      return t;
    }
  }
  return {};
}

/// The globals a checkpoint may name; everything else is refused. None of them is ever called: each
/// is recognized by name and its effect built from plain values.
inline bool allowed_global(std::string_view name) {
  static constexpr const char* names[] = {
      "collections.OrderedDict",
      "torch._utils._rebuild_tensor_v2",
      "torch._utils._rebuild_tensor",
      "torch._utils._rebuild_parameter",
      "torch._utils._rebuild_parameter_with_state",
      "torch.Size",
      "torch.device",
      // What LibTorch's own pickler (torch::pickle_save, fabric's native checkpoints) writes.
      "torch.jit._pickle.restore_type_tag",
      "torch.jit._pickle.build_intlist",
      "torch.jit._pickle.build_doublelist",
      "torch.jit._pickle.build_boollist",
      "torch.jit._pickle.build_tensorlist",
      "torch.jit._pickle.build_tensor_from_id",
  };
  for (const char* n : names) {
    if (name == n) return true;
  }
  return !storage_dtype(name).empty();
}

// ---- the unpickler --------------------------------------------------------------------------------

class Tree;

/// Reads one pickle into a value tree (use fabric::detail::pickle::Tree, which owns it), refusing opcodes and globals
/// outside what torch.save writes.
class Unpickler {
 public:
  explicit Unpickler(std::string_view data, Limits limits = {}) : data_(data), limits_(limits) {}

  ValuePtr load() {
    while (true) {
      const std::size_t at = pos_;
      const auto op = static_cast<unsigned char>(byte());
      switch (op) {
        case 0x80:  // PROTO
          if (const auto v = static_cast<unsigned char>(byte()); v < 2 || v > 5) {
            fail(at, fmt::format("pickle protocol {}; expected protocol 2 to 5 as torch.save writes", v));
          }
          break;
        case 0x95:  // FRAME: a length hint
          (void)take(8);
          break;
        case '.': {  // STOP
          if (!marks_.empty()) fail(at, "STOP inside an unclosed MARK");
          if (stack_.size() != 1) fail(at, fmt::format("STOP with {} values on the stack; expected 1", stack_.size()));
          return stack_.back();
        }
        case '(':  // MARK
          if (marks_.size() >= limits_.max_stack) fail(at, "too many nested MARKs");
          marks_.push_back(stack_.size());
          break;
        case '0':  // POP
          (void)pop(at);
          break;
        case '1':  // POP_MARK
          (void)pop_mark(at);
          break;
        case '2':  // DUP
          push(top(at), at);
          break;
        case 'N':
          push(Value::make(Value::Kind::none), at);
          break;
        case 0x88:
        case 0x89: {  // NEWTRUE, NEWFALSE
          auto v = Value::make(Value::Kind::boolean);
          v->boolean = op == 0x88;
          push(v, at);
          break;
        }
        case 'J':
          push_int(static_cast<std::int32_t>(little(4)), at);
          break;
        case 'K':
          push_int(static_cast<std::uint8_t>(little(1)), at);
          break;
        case 'M':
          push_int(static_cast<std::uint16_t>(little(2)), at);
          break;
        case 0x8a: {  // LONG1
          const std::size_t n = static_cast<std::uint8_t>(byte());
          push_int(long_value(take(n), at), at);
          break;
        }
        case 0x8b: {  // LONG4
          const std::uint64_t n = little(4);
          if (n > 8) fail(at, fmt::format("an integer of {} bytes; expected at most 8", n));
          push_int(long_value(take(static_cast<std::size_t>(n)), at), at);
          break;
        }
        case 'G': {  // BINFLOAT, big-endian
          const std::string_view b = take(8);
          std::uint64_t bits = 0;
          for (char c : b) bits = (bits << 8) | static_cast<std::uint8_t>(c);
          auto v = Value::make(Value::Kind::floating);
          std::memcpy(&v->floating, &bits, sizeof bits);
          push(v, at);
          break;
        }
        case 0x8c:  // SHORT_BINUNICODE
          push_text(Value::Kind::string, take(static_cast<std::uint8_t>(byte())), at);
          break;
        case 'X':  // BINUNICODE
          push_text(Value::Kind::string, take(checked_length(little(4), at)), at);
          break;
        case 0x8d:  // BINUNICODE8
          push_text(Value::Kind::string, take(checked_length(little(8), at)), at);
          break;
        case 'U':  // SHORT_BINSTRING (Python 2 str, read as text)
          push_text(Value::Kind::string, take(static_cast<std::uint8_t>(byte())), at);
          break;
        case 'T':  // BINSTRING
          push_text(Value::Kind::string, take(checked_length(little(4), at)), at);
          break;
        case 'C':  // SHORT_BINBYTES
          push_text(Value::Kind::bytes, take(static_cast<std::uint8_t>(byte())), at);
          break;
        case 'B':  // BINBYTES
          push_text(Value::Kind::bytes, take(checked_length(little(4), at)), at);
          break;
        case 0x8e:  // BINBYTES8
          push_text(Value::Kind::bytes, take(checked_length(little(8), at)), at);
          break;
        case ']':
          push(Value::make(Value::Kind::list), at);
          break;
        case ')':
          push(Value::make(Value::Kind::tuple), at);
          break;
        case '}':
          push(Value::make(Value::Kind::dict), at);
          break;
        case 'l': {  // LIST
          auto v = Value::make(Value::Kind::list);
          v->items = pop_mark(at);
          push(v, at);
          break;
        }
        case 't': {  // TUPLE
          auto v = Value::make(Value::Kind::tuple);
          v->items = pop_mark(at);
          push(v, at);
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1-3
          const std::size_t n = op - 0x84u;
          if (stack_.size() < base() + n) fail(at, "TUPLE with too few values on the stack");
          auto v = Value::make(Value::Kind::tuple);
          v->items.assign(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
          stack_.resize(stack_.size() - n);
          push(v, at);
          break;
        }
        case 'd': {  // DICT
          auto items = pop_mark(at);
          auto v = Value::make(Value::Kind::dict);
          set_items(*v, items, at);
          push(v, at);
          break;
        }
        case 'a': {  // APPEND
          ValuePtr item = pop(at);
          append(top(at), {item}, at);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark(at);
          append(top(at), items, at);
          break;
        }
        case 's': {  // SETITEM
          ValuePtr value = pop(at);
          ValuePtr key = pop(at);
          ValuePtr dict = top(at);
          if (dict->kind != Value::Kind::dict) fail(at, fmt::format("SETITEM on {}", kind_name(dict->kind)));
          set_items(*dict, {key, value}, at);
          break;
        }
        case 'u': {  // SETITEMS
          auto items = pop_mark(at);
          ValuePtr dict = top(at);
          if (dict->kind != Value::Kind::dict) fail(at, fmt::format("SETITEMS on {}", kind_name(dict->kind)));
          set_items(*dict, items, at);
          break;
        }
        case 'c': {  // GLOBAL "module\nname\n"
          const std::string module = line(at);
          const std::string name = line(at);
          push_global(module + "." + name, at);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          ValuePtr name = pop(at);
          ValuePtr module = pop(at);
          if (name->kind != Value::Kind::string || module->kind != Value::Kind::string) {
            fail(at, "STACK_GLOBAL of values that are not strings");
          }
          push_global(module->text + "." + name->text, at);
          break;
        }
        case 'R': {  // REDUCE
          ValuePtr args = pop(at);
          ValuePtr callable = pop(at);
          push(reduce(callable, args, at), at);
          break;
        }
        case 'b': {  // BUILD: the state of an OrderedDict (its _metadata) or a tensor is dropped
          ValuePtr state = pop(at);
          ValuePtr target = top(at);
          if (target->kind != Value::Kind::dict && target->kind != Value::Kind::tensor) {
            fail(at,
                 fmt::format("BUILD of {}; only dictionaries and tensors may carry state", kind_name(target->kind)));
          }
          (void)state;
          break;
        }
        case 'Q': {  // BINPERSID
          push(persistent(pop(at), at), at);
          break;
        }
        case 'q':  // BINPUT
          memo_put(static_cast<std::uint8_t>(byte()), at);
          break;
        case 'r':  // LONG_BINPUT
          memo_put(little(4), at);
          break;
        case 0x94:  // MEMOIZE
          memo_put(memo_.size(), at);
          break;
        case 'h':  // BINGET
          memo_get(static_cast<std::uint8_t>(byte()), at);
          break;
        case 'j':  // LONG_BINGET
          memo_get(little(4), at);
          break;
        case 0x81:
        case 0x92:
          fail(at, "NEWOBJ: the pickle instantiates a class, which a checkpoint never needs");
        case 'i':
        case 'o':
          fail(at, "INST/OBJ: the pickle instantiates a class, which a checkpoint never needs");
        case 'P':
          fail(at, "PERSID (text persistent id); expected BINPERSID as torch.save writes");
        case 0x8f:
        case 0x90:
        case 0x91:
          fail(at, "a set; checkpoints hold dictionaries, lists and tuples");
        default:
          fail(at, fmt::format("opcode 0x{:02x}, which torch.save does not write", op));
      }
    }
  }

 private:
  [[noreturn]] void fail(std::size_t at, const std::string& what) const {
    raise("the pickle is not a checkpoint fabric can read: {} (at byte {})", what, at);
  }

  char byte() {
    if (pos_ >= data_.size()) fail(pos_, "the pickle ends before its STOP opcode (truncated)");
    return data_[pos_++];
  }
  std::string_view take(std::size_t n) {
    if (n > data_.size() - pos_) {
      fail(pos_, fmt::format("the pickle ends inside a value of {} bytes (truncated)", n));
    }
    std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  std::uint64_t little(std::size_t n) {
    const std::string_view b = take(n);
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(b[i])) << (8 * i);
    return v;
  }
  std::size_t checked_length(std::uint64_t n, std::size_t at) const {
    if (n > data_.size() - pos_) fail(at, fmt::format("a length of {} bytes past the end of the pickle", n));
    return static_cast<std::size_t>(n);
  }
  std::string line(std::size_t at) {
    const std::size_t end = data_.find('\n', pos_);
    if (end == std::string_view::npos || end - pos_ > 512) fail(at, "a GLOBAL without its newline-ended names");
    std::string out(data_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }
  std::int64_t long_value(std::string_view b, std::size_t at) const {
    if (b.size() > 8) fail(at, fmt::format("an integer of {} bytes; expected at most 8 (int64)", b.size()));
    if (b.empty()) return 0;
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < b.size(); ++i)
      v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(b[i])) << (8 * i);
    if (b.size() < 8 && (static_cast<std::uint8_t>(b.back()) & 0x80u) != 0) v |= ~std::uint64_t{0} << (8 * b.size());
    return static_cast<std::int64_t>(v);
  }

  std::size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(ValuePtr v, std::size_t at) {
    if (stack_.size() + marks_.size() >= limits_.max_stack) fail(at, "the stack exceeds its bound");
    if (++created_ > limits_.max_values) fail(at, "more values than the reader's bound");
    if (v->kind == Value::Kind::list || v->kind == Value::Kind::tuple || v->kind == Value::Kind::dict) {
      arena_.push_back(v);
    }
    stack_.push_back(std::move(v));
  }
  void push_int(std::int64_t i, std::size_t at) {
    auto v = Value::make(Value::Kind::integer);
    v->integer = i;
    push(v, at);
  }
  void push_text(Value::Kind k, std::string_view text, std::size_t at) {
    auto v = Value::make(k);
    v->text = std::string(text);
    push(v, at);
  }
  void push_global(const std::string& name, std::size_t at) {
    if (!allowed_global(name)) {
      raise(
          "refused the global {} in the pickle (at byte {}): a checkpoint holds tensors, numbers, strings, "
          "dictionaries, lists and tuples, and fabric never runs pickled code; this file names a Python object that "
          "is not one of those. Save plain data in Python (e.g. model.state_dict(), optimizer.state_dict())",
          name, at);
    }
    auto v = Value::make(Value::Kind::global);
    v->text = name;
    push(v, at);
  }
  ValuePtr pop(std::size_t at) {
    if (stack_.size() <= base()) fail(at, "an opcode pops from an empty stack");
    ValuePtr v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  ValuePtr top(std::size_t at) const {
    if (stack_.size() <= base()) fail(at, "an opcode reads an empty stack");
    return stack_.back();
  }
  std::vector<ValuePtr> pop_mark(std::size_t at) {
    if (marks_.empty()) fail(at, "an opcode needs a MARK that is not there");
    const std::size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(stack_.begin() + static_cast<std::ptrdiff_t>(mark), stack_.end());
    stack_.resize(mark);
    return items;
  }
  void append(const ValuePtr& list, const std::vector<ValuePtr>& items, std::size_t at) {
    if (list->kind != Value::Kind::list) fail(at, fmt::format("APPEND to {}", kind_name(list->kind)));
    if (list->items.size() + items.size() > limits_.max_container) fail(at, "a list exceeds the reader's bound");
    list->items.insert(list->items.end(), items.begin(), items.end());
  }
  void set_items(Value& dict, const std::vector<ValuePtr>& items, std::size_t at) {
    if (items.size() % 2 != 0) fail(at, "SETITEMS with an odd number of values");
    if (dict.items.size() + items.size() > 2 * limits_.max_container) fail(at, "a dict exceeds the reader's bound");
    for (std::size_t i = 0; i < items.size(); i += 2) {
      const Value& k = *items[i];
      if (k.kind != Value::Kind::string && k.kind != Value::Kind::integer && k.kind != Value::Kind::boolean &&
          k.kind != Value::Kind::floating) {
        fail(at, fmt::format("a dictionary key that is {}; expected str, int, float or bool keys", kind_name(k.kind)));
      }
      dict.items.push_back(items[i]);
      dict.items.push_back(items[i + 1]);
    }
  }
  void memo_put(std::uint64_t index, std::size_t at) {
    if (memo_.size() >= limits_.max_memo && !memo_.contains(index)) fail(at, "the memo exceeds the reader's bound");
    memo_[index] = top(at);
  }
  void memo_get(std::uint64_t index, std::size_t at) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) fail(at, fmt::format("a memo lookup of entry {}, which was never stored", index));
    push(it->second, at);
  }

  static std::int64_t int_of(const ValuePtr& v, const char* what, std::size_t at, const Unpickler& self) {
    if (v->kind == Value::Kind::integer) return v->integer;
    if (v->kind == Value::Kind::boolean) return v->boolean ? 1 : 0;
    self.fail(at, fmt::format("{} is {}; expected an int", what, kind_name(v->kind)));
  }
  std::vector<std::int64_t> ints_of(const ValuePtr& v, const char* what, std::size_t at) const {
    if (v->kind != Value::Kind::tuple && v->kind != Value::Kind::list) {
      fail(at, fmt::format("{} is {}; expected a tuple of ints", what, kind_name(v->kind)));
    }
    if (v->items.size() > limits_.max_dims) fail(at, fmt::format("{} has {} dimensions", what, v->items.size()));
    std::vector<std::int64_t> out;
    for (const auto& item : v->items) out.push_back(int_of(item, what, at, *this));
    return out;
  }

  ValuePtr persistent(const ValuePtr& id, std::size_t at) const {
    if (id->kind != Value::Kind::tuple || id->items.size() != 5 || id->items[0]->kind != Value::Kind::string ||
        id->items[0]->text != "storage") {
      fail(at, "a persistent id that is not ('storage', type, key, location, numel)");
    }
    const auto& type = id->items[1];
    const auto& key = id->items[2];
    const auto& location = id->items[3];
    if (type->kind != Value::Kind::global || storage_dtype(type->text).empty()) {
      fail(at, "a persistent id whose storage type is not a torch storage class");
    }
    if (key->kind != Value::Kind::string || location->kind != Value::Kind::string) {
      fail(at, "a persistent id whose key or location is not a string");
    }
    const std::int64_t numel = int_of(id->items[4], "a storage's size", at, *this);
    if (numel < 0) fail(at, fmt::format("a storage of {} elements", numel));
    auto v = Value::make(Value::Kind::storage);
    v->storage = std::make_shared<StorageRef>(StorageRef{storage_dtype(type->text), key->text, location->text, numel});
    return v;
  }

  ValuePtr make_tensor(const std::vector<ValuePtr>& a, bool v2, std::size_t at) const {
    if (a.size() < 4 || a[0]->kind != Value::Kind::storage) {
      fail(at, "_rebuild_tensor without (storage, offset, size, stride)");
    }
    auto t = std::make_shared<TensorRef>();
    t->storage = a[0]->storage;
    t->offset = int_of(a[1], "a tensor's storage offset", at, *this);
    t->size = ints_of(a[2], "a tensor's size", at);
    t->stride = ints_of(a[3], "a tensor's stride", at);
    if (v2 && a.size() >= 5) t->requires_grad = int_of(a[4], "requires_grad", at, *this) != 0;
    if (t->size.size() != t->stride.size()) fail(at, "a tensor whose size and stride differ in length");
    auto v = Value::make(Value::Kind::tensor);
    v->tensor = std::move(t);
    return v;
  }

  ValuePtr reduce(const ValuePtr& callable, const ValuePtr& args, std::size_t at) const {
    if (callable->kind != Value::Kind::global) {
      fail(at, fmt::format("REDUCE calls {}, not an allowed global", kind_name(callable->kind)));
    }
    if (args->kind != Value::Kind::tuple) fail(at, "REDUCE with arguments that are not a tuple");
    const std::string& f = callable->text;
    const auto& a = args->items;
    if (f == "collections.OrderedDict") {
      auto v = Value::make(Value::Kind::dict);
      if (!a.empty()) fail(at, "OrderedDict(...) with arguments; expected OrderedDict() then SETITEMS");
      return v;
    }
    if (f == "torch._utils._rebuild_tensor_v2") {
      if (a.size() < 6 || a.size() > 7) fail(at, "_rebuild_tensor_v2 with other than 6 or 7 arguments");
      return make_tensor(a, true, at);
    }
    if (f == "torch._utils._rebuild_tensor") {
      if (a.size() != 4) fail(at, "_rebuild_tensor with other than 4 arguments");
      return make_tensor(a, false, at);
    }
    if (f == "torch._utils._rebuild_parameter" || f == "torch._utils._rebuild_parameter_with_state") {
      if (a.size() < 3 || a[0]->kind != Value::Kind::tensor) fail(at, "_rebuild_parameter without a tensor");
      return a[0];
    }
    if (f == "torch.Size") {
      if (a.size() != 1) fail(at, "torch.Size with other than one argument");
      auto v = Value::make(Value::Kind::tuple);
      (void)ints_of(a[0], "a torch.Size", at);
      v->items = a[0]->items;
      return v;
    }
    if (f == "torch.device") {
      if (a.empty() || a.size() > 2 || a[0]->kind != Value::Kind::string) fail(at, "torch.device without a type");
      auto v = Value::make(Value::Kind::string);
      v->text = a[0]->text;
      if (a.size() == 2) v->text += fmt::format(":{}", int_of(a[1], "a device index", at, *this));
      return v;
    }
    if (f == "torch.jit._pickle.restore_type_tag") {
      if (a.size() != 2) fail(at, "restore_type_tag with other than 2 arguments");
      return a[0];
    }
    if (f.starts_with("torch.jit._pickle.build_")) {
      if (a.size() != 1 || a[0]->kind != Value::Kind::list) fail(at, fmt::format("{} without a list", f));
      return a[0];
    }
    fail(at, fmt::format("REDUCE calls {}, which builds no value of a checkpoint", f));
  }

  std::string_view data_;
  Limits limits_;
  std::size_t pos_ = 0;
  std::size_t created_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, ValuePtr> memo_;
  std::vector<ValuePtr> arena_;

  friend class Tree;
};

/// A pickle's value tree, which owns its containers: a pickle can make a list that holds itself, so
/// the containers are emptied when the tree goes (shared pointers alone would leak the cycle).
class Tree {
 public:
  explicit Tree(std::string_view data, Limits limits = {}) {
    Unpickler reader(data, limits);
    try {
      root_ = reader.load();
    } catch (...) {
      for (auto& v : reader.arena_) v->items.clear();
      throw;
    }
    arena_ = std::move(reader.arena_);
  }
  Tree(const Tree&) = delete;
  Tree& operator=(const Tree&) = delete;
  ~Tree() {
    for (auto& v : arena_) v->items.clear();
  }
  const ValuePtr& root() const { return root_; }

 private:
  ValuePtr root_;
  std::vector<ValuePtr> arena_;
};

// ---- the zip container ----------------------------------------------------------------------------

/// The records of a zip archive of stored (uncompressed) entries, as torch.save writes: names to the
/// bytes of each, all checked to lie within the file.
class ZipArchive {
 public:
  explicit ZipArchive(std::string_view file, const Limits& limits = {}) : file_(file) { parse(limits); }

  bool contains(const std::string& name) const { return entries_.contains(name); }
  std::string_view record(const std::string& name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) raise("the archive has no record \"{}\"", name);
    return file_.substr(it->second.first, it->second.second);
  }
  const std::map<std::string, std::pair<std::size_t, std::size_t>>& entries() const { return entries_; }

 private:
  [[noreturn]] static void fail(const std::string& what) {
    raise("the file is not a readable zip archive: {}; expected a file written by torch.save", what);
  }
  std::uint64_t at(std::size_t offset, std::size_t n) const {
    if (offset > file_.size() || n > file_.size() - offset) fail("a header runs past the end of the file (truncated)");
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) {
      v |= static_cast<std::uint64_t>(static_cast<std::uint8_t>(file_[offset + i])) << (8 * i);
    }
    return v;
  }

  void parse(const Limits& limits) {
    if (file_.size() < 22) fail("it is shorter than a zip end record");
    // The end-of-central-directory record, within the last 64 KiB + 22 bytes.
    std::size_t eocd = std::string_view::npos;
    const std::size_t lowest = file_.size() > 65557 ? file_.size() - 65557 : 0;
    for (std::size_t p = file_.size() - 22 + 1; p-- > lowest;) {
      if (at(p, 4) == 0x06054b50) {
        eocd = p;
        break;
      }
    }
    if (eocd == std::string_view::npos) fail("no end-of-central-directory record");
    std::uint64_t count = at(eocd + 10, 2);
    std::uint64_t cd_size = at(eocd + 12, 4);
    std::uint64_t cd_offset = at(eocd + 16, 4);
    if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
      if (eocd < 20 || at(eocd - 20, 4) != 0x07064b50) fail("a zip64 archive without its zip64 locator");
      const std::uint64_t record = at(eocd - 20 + 8, 8);
      if (record > file_.size() || at(static_cast<std::size_t>(record), 4) != 0x06064b50) {
        fail("a zip64 locator pointing outside the file");
      }
      count = at(static_cast<std::size_t>(record) + 32, 8);
      cd_size = at(static_cast<std::size_t>(record) + 40, 8);
      cd_offset = at(static_cast<std::size_t>(record) + 48, 8);
    }
    if (count > limits.max_zip_entries) fail(fmt::format("{} entries", count));
    if (cd_offset > file_.size() || cd_size > file_.size() - cd_offset) fail("a central directory outside the file");
    std::size_t p = static_cast<std::size_t>(cd_offset);
    const std::size_t cd_end = static_cast<std::size_t>(cd_offset + cd_size);
    for (std::uint64_t i = 0; i < count; ++i) {
      if (p + 46 > cd_end || at(p, 4) != 0x02014b50) fail(fmt::format("central directory entry {} is malformed", i));
      const std::uint64_t flags = at(p + 8, 2);
      const std::uint64_t method = at(p + 10, 2);
      std::uint64_t compressed = at(p + 20, 4);
      std::uint64_t size = at(p + 24, 4);
      const std::size_t name_len = static_cast<std::size_t>(at(p + 28, 2));
      const std::size_t extra_len = static_cast<std::size_t>(at(p + 30, 2));
      const std::size_t comment_len = static_cast<std::size_t>(at(p + 32, 2));
      std::uint64_t local = at(p + 42, 4);
      if (p + 46 + name_len + extra_len + comment_len > cd_end)
        fail(fmt::format("entry {} runs past its directory", i));
      std::string name(file_.substr(p + 46, name_len));
      // The zip64 extra field holds, in order, the fields that are 0xFFFFFFFF above.
      for (std::size_t e = p + 46 + name_len; e + 4 <= p + 46 + name_len + extra_len;) {
        const std::uint64_t id = at(e, 2);
        const std::size_t len = static_cast<std::size_t>(at(e + 2, 2));
        if (e + 4 + len > p + 46 + name_len + extra_len)
          fail(fmt::format("entry \"{}\" has a malformed extra field", name));
        if (id == 0x0001) {
          std::size_t q = e + 4;
          auto next = [&](std::uint64_t& field) {
            if (field != 0xFFFFFFFF) return;
            if (q + 8 > e + 4 + len) fail(fmt::format("entry \"{}\" has a short zip64 field", name));
            field = at(q, 8);
            q += 8;
          };
          next(size);
          next(compressed);
          next(local);
        }
        e += 4 + len;
      }
      if (method != 0 || (flags & 1u) != 0) {
        fail(fmt::format("entry \"{}\" is compressed or encrypted; torch.save stores records uncompressed", name));
      }
      if (compressed != size) fail(fmt::format("entry \"{}\" has differing stored and real sizes", name));
      if (local > file_.size() || at(static_cast<std::size_t>(local), 4) != 0x04034b50) {
        fail(fmt::format("entry \"{}\" points to no local header", name));
      }
      const std::size_t l = static_cast<std::size_t>(local);
      const std::uint64_t data = local + 30 + at(l + 26, 2) + at(l + 28, 2);
      if (data > file_.size() || size > file_.size() - data) {
        fail(fmt::format("entry \"{}\" ({} bytes) runs past the end of the file (truncated)", name, size));
      }
      if (!entries_.emplace(name, std::make_pair(static_cast<std::size_t>(data), static_cast<std::size_t>(size)))
               .second) {
        fail(fmt::format("entry \"{}\" appears twice", name));
      }
      p += 46 + name_len + extra_len + comment_len;
    }
  }

  std::string_view file_;
  std::map<std::string, std::pair<std::size_t, std::size_t>> entries_;
};

/// The archive's folder ("archive" in "archive/data.pkl"): the one top-level folder with a data.pkl.
inline std::string archive_prefix(const ZipArchive& zip) {
  std::string prefix;
  for (const auto& [name, where] : zip.entries()) {
    const auto slash = name.find('/');
    if (slash == std::string::npos || name.substr(slash + 1) != "data.pkl") continue;
    if (!prefix.empty()) raise("the archive holds two pickles ({}/data.pkl and {}); expected one", prefix, name);
    prefix = name.substr(0, slash);
  }
  if (prefix.empty()) {
    raise(
        "the zip archive has no <name>/data.pkl record, so it was not written by torch.save; expected a file of "
        "torch.save (Python) or fabric");
  }
  return prefix;
}

/// Says whether bytes start like a torch.save file of the legacy format (_use_new_zipfile_serialization=False):
/// a pickle whose first value is torch's magic number 0x1950a86a20f9469cfc6c.
inline bool legacy_torch_file(std::string_view file) {
  static constexpr unsigned char magic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                                            0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  return file.size() >= sizeof magic && std::memcmp(file.data(), magic, sizeof magic) == 0;
}

// ---- the writer -----------------------------------------------------------------------------------

/// Writes a protocol-2 pickle of plain values, as Python's pickle does (without memoization), for
/// files that Python's torch.load reads with weights_only=True.
class Writer {
 public:
  void proto() { out_ += "\x80\x02"; }
  void stop() { out_ += '.'; }
  void mark() { out_ += '('; }
  void none() { out_ += 'N'; }
  void boolean(bool b) { out_ += b ? '\x88' : '\x89'; }
  void integer(std::int64_t v) {
    if (v >= 0 && v < 256) {
      out_ += 'K';
      out_ += static_cast<char>(v);
    } else if (v >= 0 && v < 65536) {
      out_ += 'M';
      put(static_cast<std::uint64_t>(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      out_ += 'J';
      put(static_cast<std::uint64_t>(static_cast<std::uint32_t>(static_cast<std::int32_t>(v))), 4);
    } else {
      out_ += "\x8a\x08";
      put(static_cast<std::uint64_t>(v), 8);
    }
  }
  void floating(double d) {
    out_ += 'G';
    std::uint64_t bits = 0;
    std::memcpy(&bits, &d, sizeof bits);
    for (int i = 7; i >= 0; --i) out_ += static_cast<char>((bits >> (8 * i)) & 0xFF);
  }
  void string(std::string_view s) {
    out_ += 'X';
    put(s.size(), 4);
    out_ += s;
  }
  void global(std::string_view module, std::string_view name) {
    out_ += 'c';
    out_ += module;
    out_ += '\n';
    out_ += name;
    out_ += '\n';
  }
  void empty_dict() { out_ += '}'; }
  void setitems() { out_ += 'u'; }
  void empty_list() { out_ += ']'; }
  void appends() { out_ += 'e'; }
  void empty_tuple() { out_ += ')'; }
  void tuple() { out_ += 't'; }
  void reduce() { out_ += 'R'; }
  void binpersid() { out_ += 'Q'; }
  const std::string& bytes() const { return out_; }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_ += static_cast<char>((v >> (8 * i)) & 0xFF);
  }
  std::string out_;
};

}  // namespace fabric::detail::pickle
