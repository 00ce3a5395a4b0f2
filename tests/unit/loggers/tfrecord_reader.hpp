#pragma once
// fabric_test::tfrecord: a reader of TensorBoard event files written apart from the logger (its own
// bit-by-bit CRC-32C, its own protobuf decoder), to check what TensorBoardLogger writes: every record's two
// checksums, then the Event, Summary, TensorProto and hparams plugin messages decoded back by their field
// numbers (tensorboard/compat/proto/*.proto, tensorboard/plugins/hparams/{api,plugin_data}.proto).

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace fabric_test::tfrecord {

/// A file that is not a valid TFRecord file: a checksum that does not match or a record cut short.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// CRC-32C computed bit by bit (no table), to check the logger's table-driven one independently.
inline std::uint32_t crc32c(std::string_view data) {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (const char ch : data) {
    crc ^= static_cast<unsigned char>(ch);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

/// TFRecord's masked CRC.
inline std::uint32_t masked_crc32c(std::string_view data) {
  const std::uint32_t crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

inline std::uint64_t little_endian(std::string_view bytes) {
  std::uint64_t v = 0;
  for (std::size_t i = bytes.size(); i-- > 0;) v = (v << 8) | static_cast<unsigned char>(bytes[i]);
  return v;
}

/// Returns the file's bytes.
inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Splits TFRecord bytes into the records' data, checking both checksums of every record; throws
/// FormatError("length checksum ...", "data checksum ...", "truncated ...") with the record's offset.
inline std::vector<std::string> split_records(std::string_view bytes) {
  std::vector<std::string> records;
  std::size_t at = 0;
  while (at < bytes.size()) {
    const std::string where = " in the record at byte " + std::to_string(at);
    if (bytes.size() - at < 12) throw FormatError("truncated length" + where);
    const std::string_view length_bytes = bytes.substr(at, 8);
    if (little_endian(bytes.substr(at + 8, 4)) != masked_crc32c(length_bytes))
      throw FormatError("length checksum mismatch" + where);
    const std::uint64_t length = little_endian(length_bytes);
    if (bytes.size() - at - 12 < length || bytes.size() - at - 12 - length < 4)
      throw FormatError("truncated data" + where);
    const std::string_view data = bytes.substr(at + 12, length);
    if (little_endian(bytes.substr(at + 12 + length, 4)) != masked_crc32c(data))
      throw FormatError("data checksum mismatch" + where);
    records.emplace_back(data);
    at += 12 + length + 4;
  }
  return records;
}

// ---- protobuf ----------------------------------------------------------------------------------------

/// One field of a protobuf message as it is on the wire.
struct Field {
  int number = 0;
  int wire_type = 0;
  std::uint64_t scalar = 0;  // varint, fixed64 or fixed32 bits
  std::string bytes;         // length-delimited
};

/// The fields of a message, in order.
class Message {
 public:
  explicit Message(std::string_view data) {
    std::size_t at = 0;
    auto varint = [&] {
      std::uint64_t v = 0;
      for (int shift = 0;; shift += 7) {
        if (at >= data.size() || shift > 63) throw FormatError("bad varint");
        const auto b = static_cast<unsigned char>(data[at++]);
        v |= static_cast<std::uint64_t>(b & 0x7Fu) << shift;
        if ((b & 0x80u) == 0) return v;
      }
    };
    while (at < data.size()) {
      const std::uint64_t key = varint();
      Field f;
      f.number = static_cast<int>(key >> 3);
      f.wire_type = static_cast<int>(key & 7u);
      switch (f.wire_type) {
        case 0:
          f.scalar = varint();
          break;
        case 1:
        case 5: {
          const std::size_t n = f.wire_type == 1 ? 8 : 4;
          if (data.size() - at < n) throw FormatError("truncated fixed field");
          f.scalar = little_endian(data.substr(at, n));
          at += n;
          break;
        }
        case 2: {
          const std::uint64_t n = varint();
          if (data.size() - at < n) throw FormatError("truncated length-delimited field");
          f.bytes = std::string(data.substr(at, n));
          at += n;
          break;
        }
        default:
          throw FormatError("unknown wire type " + std::to_string(f.wire_type));
      }
      fields_.push_back(std::move(f));
    }
  }

  /// The fields numbered n, in order (pointers into this message: keep it alive while using them).
  std::vector<const Field*> all(int n) const& {
    std::vector<const Field*> out;
    for (const auto& f : fields_)
      if (f.number == n) out.push_back(&f);
    return out;
  }
  std::vector<const Field*> all(int n) const&& = delete;  // a temporary's fields would dangle
  /// The last field numbered n (protobuf's rule for a repeated scalar), if any.
  const Field* get(int n, int wire_type) const {
    const Field* found = nullptr;
    for (const auto& f : fields_) {
      if (f.number != n) continue;
      if (f.wire_type != wire_type) throw FormatError("field " + std::to_string(n) + " has the wrong wire type");
      found = &f;
    }
    return found;
  }
  bool has(int n) const { return !all(n).empty(); }
  std::string string(int n) const {
    const Field* f = get(n, 2);
    return f ? f->bytes : std::string();
  }
  std::int64_t int64(int n) const {
    const Field* f = get(n, 0);
    return f ? static_cast<std::int64_t>(f->scalar) : 0;
  }
  double float64(int n) const {
    const Field* f = get(n, 1);
    return f ? std::bit_cast<double>(f->scalar) : 0.0;
  }
  float float32(int n) const {
    const Field* f = get(n, 5);
    return f ? std::bit_cast<float>(static_cast<std::uint32_t>(f->scalar)) : 0.0f;
  }
  Message message(int n) const { return Message(string(n)); }
  std::size_t size() const { return fields_.size(); }

 private:
  std::vector<Field> fields_;
};

// ---- TensorBoard's messages -------------------------------------------------------------------------

/// A TensorProto of strings (the text plugin's).
struct Tensor {
  int dtype = 0;                     // TensorProto.dtype = 1 (DT_STRING = 7)
  std::vector<std::int64_t> dims;    // tensor_shape = 2 -> TensorShapeProto.dim = 2 -> Dim.size = 1
  std::vector<std::string> strings;  // string_val = 8
};

/// A Summary.Value.
struct Value {
  std::string tag;                    // tag = 1
  std::optional<float> simple_value;  // simple_value = 2
  std::optional<std::string> plugin;  // metadata = 9 -> plugin_data = 1 -> plugin_name = 1
  std::string plugin_content;         // ... -> content = 2
  std::optional<Tensor> tensor;       // tensor = 8
};

/// An Event.
struct Event {
  double wall_time = 0;                      // wall_time = 1
  std::int64_t step = 0;                     // step = 2
  std::optional<std::string> file_version;   // file_version = 3
  std::optional<std::string> source_writer;  // source_metadata = 10 -> writer = 1
  bool has_summary = false;                  // summary = 5
  std::vector<Value> values;                 // Summary.value = 1
};

inline Event decode_event(std::string_view data) {
  const Message m(data);
  Event e;
  e.wall_time = m.float64(1);
  e.step = m.int64(2);
  if (m.has(3)) e.file_version = m.string(3);
  if (m.has(10)) e.source_writer = m.message(10).string(1);
  if (m.has(5)) {
    e.has_summary = true;
    const Message summary = m.message(5);
    for (const Field* f : summary.all(1)) {
      const Message vm(f->bytes);
      Value v;
      v.tag = vm.string(1);
      if (vm.has(2)) v.simple_value = vm.float32(2);
      if (vm.has(9)) {
        const Message plugin_data = vm.message(9).message(1);
        v.plugin = plugin_data.string(1);
        v.plugin_content = plugin_data.string(2);
      }
      if (vm.has(8)) {
        const Message tm = vm.message(8);
        Tensor t;
        t.dtype = static_cast<int>(tm.int64(1));
        const Message shape = tm.message(2);  // NOTE: named, as all() points into it
        for (const Field* d : shape.all(2)) t.dims.push_back(Message(d->bytes).int64(1));
        for (const Field* s : tm.all(8)) t.strings.push_back(s->bytes);
        v.tensor = std::move(t);
      }
      e.values.push_back(std::move(v));
    }
  }
  return e;
}

/// Decodes every record of an event file.
inline std::vector<Event> read_events(const std::filesystem::path& path) {
  std::vector<Event> events;
  for (const auto& record : split_records(read_bytes(path))) events.push_back(decode_event(record));
  return events;
}

/// The event files of a directory (not its subdirectories), sorted by name as TensorBoard reads them.
inline std::vector<std::filesystem::path> event_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.is_regular_file() && entry.path().filename().string().starts_with("events.out.tfevents."))
      files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

/// A google.protobuf.Value as the hparams plugin uses it.
struct HparamValue {
  enum class Kind { none, number, string, boolean } kind = Kind::none;
  double number = 0;     // number_value = 2
  std::string string;    // string_value = 3
  bool boolean = false;  // bool_value = 4
};

/// HParamsPluginData decoded.
struct Hparams {
  std::int64_t version = 0;  // version = 1
  enum class Kind { none, experiment, session_start, session_end } kind = Kind::none;
  // experiment = 2: Experiment.hparam_infos = 4 (HParamInfo.name = 1, type = 4), metric_infos = 5
  // (MetricInfo.name = 1 -> MetricName.tag = 2).
  std::vector<std::pair<std::string, int>> hparam_infos;
  std::vector<std::string> metric_tags;
  // session_start_info = 3: SessionStartInfo.hparams = 1 (map entries key = 1, value = 2), start_time_secs = 5.
  std::map<std::string, HparamValue> values;
  double start_time_secs = 0;
  // session_end_info = 4: SessionEndInfo.status = 1, end_time_secs = 2.
  int status = 0;
  double end_time_secs = 0;
};

inline Hparams decode_hparams(std::string_view content) {
  const Message m(content);
  Hparams h;
  h.version = m.int64(1);
  if (m.has(2)) {
    h.kind = Hparams::Kind::experiment;
    const Message exp = m.message(2);
    for (const Field* f : exp.all(4)) {
      const Message info(f->bytes);
      h.hparam_infos.emplace_back(info.string(1), static_cast<int>(info.int64(4)));
    }
    for (const Field* f : exp.all(5)) h.metric_tags.push_back(Message(f->bytes).message(1).string(2));
  }
  if (m.has(3)) {
    h.kind = Hparams::Kind::session_start;
    const Message start = m.message(3);
    for (const Field* f : start.all(1)) {
      const Message entry(f->bytes);
      const Message value = entry.message(2);
      HparamValue v;
      if (value.has(2)) {
        v.kind = HparamValue::Kind::number;
        v.number = value.float64(2);
      } else if (value.has(3)) {
        v.kind = HparamValue::Kind::string;
        v.string = value.string(3);
      } else if (value.has(4)) {
        v.kind = HparamValue::Kind::boolean;
        v.boolean = value.int64(4) != 0;
      }
      h.values[entry.string(1)] = v;
    }
    h.start_time_secs = start.float64(5);
  }
  if (m.has(4)) {
    h.kind = Hparams::Kind::session_end;
    const Message end = m.message(4);
    h.status = static_cast<int>(end.int64(1));
    h.end_time_secs = end.float64(2);
  }
  return h;
}

}  // namespace fabric_test::tfrecord
