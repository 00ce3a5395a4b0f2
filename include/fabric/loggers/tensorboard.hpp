#pragma once
// fabric::TensorBoardLogger: Lightning's TensorBoardLogger, writing TensorBoard event files into
// root_dir/name/version_N[/sub_dir] without TensorFlow or a protobuf library: the TFRecord framing, the
// CRC-32C and the few protobuf messages are encoded here. Torch-free (std, fmt, and POSIX getpid and
// gethostname for the event file's name).

#include "fabric/core/error.hpp"
#include "fabric/core/rank_zero.hpp"
#include "fabric/loggers/logger.hpp"

#include <fmt/format.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <variant>
#include <vector>

namespace fabric {

namespace detail::tensorboard {

// ---- CRC-32C and TFRecord framing ----------------------------------------------------------------

/// The CRC-32C (Castagnoli) table of the reflected polynomial 0x82F63B78, computed at compile time.
inline constexpr std::array<std::uint32_t, 256> crc32c_table = [] {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1u) != 0 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  return table;
}();

/// Returns the CRC-32C of data.
constexpr std::uint32_t crc32c(std::string_view data) noexcept {
  std::uint32_t crc = 0xFFFFFFFFu;
  for (const char ch : data) crc = crc32c_table[(crc ^ static_cast<unsigned char>(ch)) & 0xFFu] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}
static_assert(crc32c("123456789") == 0xE3069283u, "CRC-32C's check value");

/// Returns TFRecord's masked CRC-32C of data: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
constexpr std::uint32_t masked_crc32c(std::string_view data) noexcept {
  const std::uint32_t crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

/// Appends the n low bytes of v to out, least significant first.
inline void put_little_endian(std::string& out, std::uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFFu);
}

/// Appends one TFRecord holding data: its length (uint64, little-endian), the masked CRC-32C of those
/// eight bytes, the data, and the masked CRC-32C of the data (both uint32, little-endian).
inline void append_record(std::string& out, std::string_view data) {
  std::string length;
  put_little_endian(length, data.size(), 8);
  out += length;
  put_little_endian(out, masked_crc32c(length), 4);
  out += data;
  put_little_endian(out, masked_crc32c(data), 4);
}

// ---- protobuf wire format --------------------------------------------------------------------------

/// Encodes one protobuf message field by field (wire types 0 varint, 1 fixed64, 2 length-delimited,
/// 5 fixed32). Fields are written as they are called, including zero values: a reader takes an
/// explicit zero as the default, and a member of a oneof must be written even when zero.
class ProtoWriter {
 public:
  /// Writes a varint field (int32, int64, enum, bool); negative numbers take ten bytes, as protobuf's.
  ProtoWriter& varint(int field, std::uint64_t v) {
    key(field, 0);
    put_varint(v);
    return *this;
  }
  /// Writes a signed integer field (int64 or int32, two's complement).
  ProtoWriter& int64(int field, std::int64_t v) { return varint(field, static_cast<std::uint64_t>(v)); }
  /// Writes a double field (fixed64, little-endian IEEE 754).
  ProtoWriter& float64(int field, double v) {
    key(field, 1);
    put_little_endian(data_, std::bit_cast<std::uint64_t>(v), 8);
    return *this;
  }
  /// Writes a float field (fixed32, little-endian IEEE 754).
  ProtoWriter& float32(int field, float v) {
    key(field, 5);
    put_little_endian(data_, std::bit_cast<std::uint32_t>(v), 4);
    return *this;
  }
  /// Writes a string, bytes or embedded-message field (length-delimited).
  ProtoWriter& bytes(int field, std::string_view v) {
    key(field, 2);
    put_varint(v.size());
    data_ += v;
    return *this;
  }
  /// Writes an embedded message field.
  ProtoWriter& message(int field, const ProtoWriter& m) { return bytes(field, m.data_); }
  /// Returns the encoded message.
  const std::string& data() const noexcept { return data_; }

 private:
  void key(int field, int wire_type) {
    put_varint((static_cast<std::uint64_t>(field) << 3) | static_cast<std::uint64_t>(wire_type));
  }
  void put_varint(std::uint64_t v) {
    while (v >= 0x80u) {
      data_ += static_cast<char>((v & 0x7Fu) | 0x80u);
      v >>= 7;
    }
    data_ += static_cast<char>(v);
  }
  std::string data_;
};

// Field numbers, from TensorBoard's protos (tensorboard/compat/proto/event.proto, summary.proto,
// tensor.proto, tensor_shape.proto, types.proto; tensorboard/plugins/hparams/api.proto, plugin_data.proto;
// google/protobuf/struct.proto for hyper-parameter values).
namespace field {
// tensorboard.Event: double wall_time = 1; int64 step = 2; oneof what { string file_version = 3;
// Summary summary = 5; } SourceMetadata source_metadata = 10.
inline constexpr int event_wall_time = 1, event_step = 2, event_file_version = 3, event_summary = 5,
                     event_source_metadata = 10;
// tensorboard.SourceMetadata: string writer = 1.
inline constexpr int source_writer = 1;
// tensorboard.Summary: repeated Value value = 1.
inline constexpr int summary_value = 1;
// tensorboard.Summary.Value: string tag = 1; SummaryMetadata metadata = 9; oneof value { float
// simple_value = 2; TensorProto tensor = 8; }.
inline constexpr int value_tag = 1, value_simple_value = 2, value_tensor = 8, value_metadata = 9;
// tensorboard.SummaryMetadata: PluginData plugin_data = 1. PluginData: string plugin_name = 1; bytes content = 2.
inline constexpr int metadata_plugin_data = 1, plugin_name = 1, plugin_content = 2;
// tensorboard.TensorProto: DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8.
inline constexpr int tensor_dtype = 1, tensor_shape = 2, tensor_string_val = 8;
// tensorboard.TensorShapeProto: repeated Dim dim = 2. Dim: int64 size = 1.
inline constexpr int shape_dim = 2, dim_size = 1;
// tensorboard.DataType (types.proto): DT_STRING = 7.
inline constexpr int dt_string = 7;
// tensorboard.hparams.HParamsPluginData: int32 version = 1; oneof data { Experiment experiment = 2;
// SessionStartInfo session_start_info = 3; SessionEndInfo session_end_info = 4; }.
inline constexpr int hparams_experiment = 2, hparams_session_start_info = 3, hparams_session_end_info = 4;
// tensorboard.hparams.Experiment: repeated HParamInfo hparam_infos = 4; repeated MetricInfo metric_infos = 5.
inline constexpr int experiment_hparam_infos = 4, experiment_metric_infos = 5;
// tensorboard.hparams.HParamInfo: string name = 1; DataType type = 4.
inline constexpr int hparam_info_name = 1, hparam_info_type = 4;
// tensorboard.hparams.DataType: DATA_TYPE_STRING = 1, DATA_TYPE_BOOL = 2, DATA_TYPE_FLOAT64 = 3.
inline constexpr int data_type_string = 1, data_type_bool = 2, data_type_float64 = 3;
// tensorboard.hparams.MetricInfo: MetricName name = 1. MetricName: string tag = 2.
inline constexpr int metric_info_name = 1, metric_name_tag = 2;
// tensorboard.hparams.SessionStartInfo: map<string, google.protobuf.Value> hparams = 1 (each entry a
// message: key = 1, value = 2); double start_time_secs = 5.
inline constexpr int start_info_hparams = 1, map_key = 1, map_value = 2, start_info_start_time_secs = 5;
// google.protobuf.Value: oneof kind { double number_value = 2; string string_value = 3; bool bool_value = 4; }.
inline constexpr int struct_number_value = 2, struct_string_value = 3, struct_bool_value = 4;
// tensorboard.hparams.SessionEndInfo: Status status = 1; double end_time_secs = 2. Status: STATUS_SUCCESS = 1.
inline constexpr int end_info_status = 1, end_info_end_time_secs = 2, status_success = 1;
}  // namespace field

// ---- TensorBoard's messages --------------------------------------------------------------------------

/// The tags and plugin name of the hparams plugin (tensorboard/plugins/hparams/metadata.py).
inline constexpr std::string_view hparams_plugin = "hparams";
/// The summary tag of the experiment (the hyper-parameters' and metrics' names and types).
inline constexpr std::string_view experiment_tag = "_hparams_/experiment";
/// The summary tag of the session's start (the hyper-parameters' values).
inline constexpr std::string_view session_start_tag = "_hparams_/session_start_info";
/// The summary tag of the session's end (its status).
inline constexpr std::string_view session_end_tag = "_hparams_/session_end_info";
/// The plugin name of text summaries.
inline constexpr std::string_view text_plugin = "text";
/// The file version TensorBoard expects as the first event of an event file.
inline constexpr std::string_view file_version = "brain.Event:2";

/// Returns the first event of an event file: its wall time and "brain.Event:2".
inline std::string file_version_event(double wall_time) {
  ProtoWriter source;
  source.bytes(field::source_writer, "fabric");
  ProtoWriter event;
  event.float64(field::event_wall_time, wall_time)
      .bytes(field::event_file_version, file_version)
      .message(field::event_source_metadata, source);
  return event.data();
}

/// Returns an event holding a summary of one value.
inline std::string summary_event(double wall_time, std::int64_t step, const ProtoWriter& value) {
  ProtoWriter summary;
  summary.message(field::summary_value, value);
  ProtoWriter event;
  event.float64(field::event_wall_time, wall_time)
      .int64(field::event_step, step)
      .message(field::event_summary, summary);
  return event.data();
}

/// Returns a summary value with a scalar (simple_value, a float, as torch's SummaryWriter.add_scalar).
inline ProtoWriter scalar_value(std::string_view tag, double value) {
  ProtoWriter v;
  // NOTE: a finite double beyond float's range would be undefined behaviour to convert; it is an infinity.
  const float f = std::isfinite(value) && std::abs(value) > std::numeric_limits<float>::max()
                      ? std::copysign(std::numeric_limits<float>::infinity(), static_cast<float>(value > 0 ? 1 : -1))
                      : static_cast<float>(value);
  v.bytes(field::value_tag, tag).float32(field::value_simple_value, f);
  return v;
}

/// Returns summary metadata naming a plugin and its content.
inline ProtoWriter plugin_metadata(std::string_view plugin, std::string_view content) {
  ProtoWriter data;
  data.bytes(field::plugin_name, plugin).bytes(field::plugin_content, content);
  ProtoWriter metadata;
  metadata.message(field::metadata_plugin_data, data);
  return metadata;
}

/// Returns a summary value for the text plugin: a DT_STRING tensor of shape [1] (as torch's add_text;
/// the plugin's content, TextPluginData with version 0, encodes to nothing).
inline ProtoWriter text_value(std::string_view tag, std::string_view text) {
  ProtoWriter dim;
  dim.int64(field::dim_size, 1);
  ProtoWriter shape;
  shape.message(field::shape_dim, dim);
  ProtoWriter tensor;
  tensor.varint(field::tensor_dtype, field::dt_string)
      .message(field::tensor_shape, shape)
      .bytes(field::tensor_string_val, text);
  ProtoWriter v;
  v.bytes(field::value_tag, tag)
      .message(field::value_metadata, plugin_metadata(text_plugin, ""))
      .message(field::value_tensor, tensor);
  return v;
}

/// Returns a summary value of the hparams plugin: a tag, the plugin's content, and no value (as
/// torch.utils.tensorboard.summary.hparams writes them).
inline ProtoWriter hparams_value(std::string_view tag, const ProtoWriter& plugin_data) {
  ProtoWriter v;
  v.bytes(field::value_tag, tag).message(field::value_metadata, plugin_metadata(hparams_plugin, plugin_data.data()));
  return v;
}

/// How a hyper-parameter's text reaches TensorBoard: as a number, a bool, or a string.
struct HparamValue {
  /// The kind of value sent.
  enum class Kind { number, boolean, string };
  /// Which of the three it is.
  Kind kind = Kind::string;
  /// The number, for Kind::number.
  double number = 0;
  /// The bool, for Kind::boolean.
  bool boolean = false;
};

/// Classifies a hyper-parameter's text: a finite number read in full ("32", "-1.5e-3") is a number,
/// "true"/"True"/"false"/"False" a bool, anything else (" 1", "0x10", "nan", "1,5", "") a string.
inline HparamValue classify_hparam(std::string_view text) {
  if (text == "true" || text == "True") return {HparamValue::Kind::boolean, 0, true};
  if (text == "false" || text == "False") return {HparamValue::Kind::boolean, 0, false};
  double v = 0;
  const char* last = text.data() + text.size();
  if (auto [p, ec] = std::from_chars(text.data(), last, v); !text.empty() && ec == std::errc{} && p == last) {
    // NOTE: NaN and infinities stay strings: the hparams plugin hands values to the browser as JSON.
    if (std::isfinite(v)) return {HparamValue::Kind::number, v, false};
  }
  return {};
}

/// Returns the hparams plugin's three contents (HParamsPluginData, version 0): the experiment
/// (hyper-parameter names and types, metric tags), the session start (the values) and the session end
/// (status success).
struct HparamsSummaries {
  /// `_hparams_/experiment`'s content.
  ProtoWriter experiment;
  /// `_hparams_/session_start_info`'s content.
  ProtoWriter session_start;
  /// `_hparams_/session_end_info`'s content.
  ProtoWriter session_end;
};

/// Encodes the hyper-parameters and the metric tags as the hparams plugin reads them.
inline HparamsSummaries hparams_summaries(const Hyperparameters& params, const std::vector<std::string>& metric_tags,
                                          double wall_time) {
  ProtoWriter experiment;
  ProtoWriter start;
  for (const auto& [name, text] : params) {
    const HparamValue value = classify_hparam(text);
    ProtoWriter info;
    ProtoWriter v;
    switch (value.kind) {
      case HparamValue::Kind::number:
        info.bytes(field::hparam_info_name, name).varint(field::hparam_info_type, field::data_type_float64);
        v.float64(field::struct_number_value, value.number);
        break;
      case HparamValue::Kind::boolean:
        info.bytes(field::hparam_info_name, name).varint(field::hparam_info_type, field::data_type_bool);
        v.varint(field::struct_bool_value, value.boolean ? 1 : 0);
        break;
      case HparamValue::Kind::string:
        info.bytes(field::hparam_info_name, name).varint(field::hparam_info_type, field::data_type_string);
        v.bytes(field::struct_string_value, text);
        break;
    }
    experiment.message(field::experiment_hparam_infos, info);
    ProtoWriter entry;
    entry.bytes(field::map_key, name).message(field::map_value, v);
    start.message(field::start_info_hparams, entry);
  }
  for (const auto& tag : metric_tags) {
    ProtoWriter metric_name;
    metric_name.bytes(field::metric_name_tag, tag);
    ProtoWriter info;
    info.message(field::metric_info_name, metric_name);
    experiment.message(field::experiment_metric_infos, info);
  }
  start.float64(field::start_info_start_time_secs, wall_time);
  ProtoWriter end;
  end.varint(field::end_info_status, field::status_success).float64(field::end_info_end_time_secs, wall_time);

  HparamsSummaries out;
  out.experiment.message(field::hparams_experiment, experiment);
  out.session_start.message(field::hparams_session_start_info, start);
  out.session_end.message(field::hparams_session_end_info, end);
  return out;
}

// ---- files -----------------------------------------------------------------------------------------

/// Expands a path as Lightning's log_dir does (os.path.expandvars, then os.path.expanduser): `$NAME` and
/// `${NAME}` by the environment (left as they are when unset), then a leading `~` or `~/` by $HOME.
inline std::string expand_path(std::string_view path) {
  std::string out;
  for (std::size_t i = 0; i < path.size();) {
    if (path[i] == '$' && i + 1 < path.size()) {
      std::size_t end = i + 1;
      std::string name;
      if (path[end] == '{') {
        const auto close = path.find('}', end + 1);
        if (close != std::string_view::npos) {
          name = std::string(path.substr(end + 1, close - end - 1));
          end = close + 1;
        }
      } else {
        while (end < path.size() && (std::isalnum(static_cast<unsigned char>(path[end])) != 0 || path[end] == '_'))
          ++end;
        name = std::string(path.substr(i + 1, end - i - 1));
      }
      if (const char* value = name.empty() ? nullptr : std::getenv(name.c_str()); value != nullptr) {
        out += value;
        i = end;
        continue;
      }
    }
    out += path[i++];
  }
  if (!out.empty() && out[0] == '~' && (out.size() == 1 || out[1] == '/')) {
    if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') out = home + out.substr(1);
  }
  return out;
}

/// Returns this machine's host name (as Python's socket.gethostname()), "localhost" if it cannot be read.
inline std::string host_name() {
  std::array<char, 256> buffer{};
  if (::gethostname(buffer.data(), buffer.size() - 1) != 0 || buffer[0] == '\0') return "localhost";
  return buffer.data();
}

/// Counts the event files this process opened: the last part of their names, as TensorBoard's
/// EventFileWriter does, so two loggers writing into one directory in the same second differ.
inline std::atomic<std::uint64_t>& event_file_counter() {
  static std::atomic<std::uint64_t> counter{0};
  return counter;
}

/// Returns the current time as seconds since the Unix epoch.
inline double wall_time_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// Flushes the live loggers when the program exits through `exit` or a return from main (a logger
/// owned by main's stack or a static is destroyed and flushes itself; one owned by the heap is not).
class ExitFlush {
 public:
  /// Returns the one registry; it is never destroyed, so the flush at exit may still find it.
  static ExitFlush& instance() {
    static ExitFlush* registry = [] {
      auto* r = new ExitFlush;  // NOTE: leaked on purpose, it must outlive every static destructor.
      std::atexit(&ExitFlush::run);
      return r;
    }();
    return *registry;
  }
  /// Registers what flushes the logger at `owner` (it must not throw).
  void add(const void* owner, std::function<void()> flush) {
    const std::lock_guard lock(mutex_);
    flushes_[owner] = {static_cast<long>(::getpid()), std::move(flush)};
  }
  /// Forgets the logger at `owner`.
  void remove(const void* owner) {
    const std::lock_guard lock(mutex_);
    flushes_.erase(owner);
  }

 private:
  static void run() {
    ExitFlush& self = instance();
    const std::lock_guard lock(self.mutex_);
    // NOTE: a child forked without exec inherits the registry; it leaves its parent's loggers alone.
    for (auto& [owner, entry] : self.flushes_) {
      if (entry.first == static_cast<long>(::getpid())) entry.second();
    }
  }
  std::mutex mutex_;
  std::map<const void*, std::pair<long, std::function<void()>>> flushes_;  // owner: pid that registered, flush
};

}  // namespace detail::tensorboard

/// Writes TensorBoard event files into `root_dir/name/version_N` (or `.../version_N/sub_dir`), like
/// Lightning's TensorBoardLogger: `log_metrics` writes one scalar per metric (a float, as TensorBoard's
/// simple_value; NaN and infinities as they are), `log_hyperparams` what the HPARAMS tab shows, and
/// `log_text` a text summary. The file, `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>`, starts
/// with the `brain.Event:2` record and holds TFRecords of Event messages with their CRC-32C checksums.
///
/// Like Lightning, the version (next free version_N unless given) is settled on first use, and the first
/// log call creates the log directory and the event file. Records are buffered, as SummaryWriter does:
/// they reach the file when `max_queue` are pending, every `flush_secs` (a background thread started by
/// the first log call), and on `save()`, `finalize()`, destruction and program exit. Only global rank zero
/// writes (`fabric::is_rank_zero()`, Lightning's `@rank_zero_only`): on the other ranks log_metrics,
/// log_hyperparams, log_text, save and finalize do nothing.
///
///     auto tb = std::make_shared<fabric::TensorBoardLogger>(fabric::TensorBoardLogger::Options{.root_dir = "logs"});
///     fabric::Fabric<> fabric{{.loggers = {tb}}};
///     tb->log_hyperparams({{"lr", "0.001"}, {"optimizer", "adam"}});
///     fabric.log("loss", 0.25, step);
class TensorBoardLogger final : public Logger {
 public:
  /// Settings of a TensorBoardLogger (Lightning's arguments and SummaryWriter's max_queue and flush_secs).
  struct Options {
    /// The directory that holds every experiment.
    std::filesystem::path root_dir = ".";
    /// The experiment's name, a directory under root_dir (none when empty).
    std::string name = "lightning_logs";
    /// The version: a number for version_N, a string for a directory of that name; unset: the next free N.
    std::optional<std::variant<int, std::string>> version{};
    /// Log `hp_metric` = -1 when log_hyperparams gets no metric (without it, such calls write nothing).
    bool default_hp_metric = true;
    /// Put before every metric's name, joined with '-'.
    std::string prefix{};
    /// A directory under the version's for this logger's files.
    std::optional<std::filesystem::path> sub_dir{};
    /// Seconds between the background flushes (0: flush on every log call, no thread).
    double flush_secs = 120;
    /// How many records may wait before they are written.
    int max_queue = 10;
  };

  /// Creates a logger; nothing is written before the first log call.
  explicit TensorBoardLogger(Options options) : options_(std::move(options)) {
    if (options_.max_queue < 1) {
      detail::raise("TensorBoardLogger: expected max_queue >= 1, found {}; pass a positive number", options_.max_queue);
    }
    if (!(options_.flush_secs >= 0) || !std::isfinite(options_.flush_secs)) {
      detail::raise(
          "TensorBoardLogger: expected flush_secs >= 0 (seconds), found {}; pass a finite number, 0 to "
          "flush on every log call",
          options_.flush_secs);
    }
    if (options_.version) {
      if (const int* n = std::get_if<int>(&*options_.version); n != nullptr && *n < 0) {
        detail::raise(
            "TensorBoardLogger: expected version >= 0 (for version_N), found {}; pass a non-negative number, a "
            "string for a directory name, or no version for the next free one",
            *n);
      }
      if (const auto* s = std::get_if<std::string>(&*options_.version); s != nullptr && s->empty()) {
        detail::raise(
            "TensorBoardLogger: expected a directory name as the string version, found \"\" (the run would write "
            "into the experiment's directory); pass a name such as \"run-a\", or no version for the next free "
            "version_N");
      }
    }
    // NOTE: registered here, outside the logger's lock: the flush at exit takes the registry's lock, then this one.
    detail::tensorboard::ExitFlush::instance().add(this, [this] {
      const std::lock_guard lock(mutex_);
      try {
        flush_locked();
      } catch (...) {  // NOTE: nothing can report an error while the program exits.
      }
    });
  }
  ~TensorBoardLogger() override {
    detail::tensorboard::ExitFlush::instance().remove(this);
    stop_timer();
    const std::lock_guard lock(mutex_);
    try {
      flush_locked();
    } catch (...) {  // NOTE: a destructor must not throw; save() and finalize() report write errors.
    }
  }
  TensorBoardLogger(const TensorBoardLogger&) = delete;
  TensorBoardLogger& operator=(const TensorBoardLogger&) = delete;

  /// Returns the experiment name.
  std::string name() const override { return options_.name; }
  /// Returns the version ("3" for version_3, or the string given), settling it on first use.
  std::string version() const override { return detail::version_text(resolved_version()); }
  /// Returns root_dir as given.
  std::filesystem::path root_dir() const override { return options_.root_dir; }
  /// Returns root_dir/name/version[/sub_dir], with `$VAR`, `${VAR}` and a leading `~` expanded as Lightning does.
  std::filesystem::path log_dir() const override {
    std::filesystem::path dir = options_.root_dir / options_.name / detail::version_leaf(resolved_version());
    if (options_.sub_dir) dir /= *options_.sub_dir;
    return detail::tensorboard::expand_path(dir.string());
  }
  /// Returns the event file this logger writes into (empty until the first log call creates it).
  std::filesystem::path event_file() const {
    const std::lock_guard lock(mutex_);
    return file_;
  }

  /// Writes one scalar per metric at the step (without one, the logger's count of log_metrics calls).
  void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) override {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    const std::lock_guard lock(mutex_);
    const std::int64_t s = step.value_or(logged_);
    ++logged_;
    if (metrics.empty()) return;
    start_file();
    const double now = detail::tensorboard::wall_time_now();
    for (const auto& [key, value] : metrics) {
      add(detail::tensorboard::summary_event(now, s, detail::tensorboard::scalar_value(tag(key), value)));
    }
    after_log();
  }

  /// Writes the hyper-parameters for the HPARAMS tab, with `hp_metric` = -1 as the metric when
  /// default_hp_metric is on (otherwise writes nothing, as Lightning).
  void log_hyperparams(const Hyperparameters& params) override { log_hyperparams(params, Metrics{}); }

  /// Writes the hyper-parameters and metrics for the HPARAMS tab, as Lightning does through
  /// torch.utils.tensorboard.summary.hparams: the metrics as scalars, then the `_hparams_/experiment`,
  /// `_hparams_/session_start_info` and `_hparams_/session_end_info` (status success) summaries of the
  /// "hparams" plugin, all at the step (without one, the next automatic step, which this does not
  /// advance). A value that reads in full as a finite number is sent as a number, true/false (or
  /// True/False) as a bool, anything else as a string. Without metrics, `hp_metric` = -1 stands in when
  /// default_hp_metric is on; otherwise nothing is written (TensorBoard's HPARAMS tab needs a metric).
  /// TensorBoard reads the hyper-parameters of the first call only.
  void log_hyperparams(const Hyperparameters& params, const Metrics& metrics,
                       std::optional<std::int64_t> step = std::nullopt) {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    Metrics all = metrics;
    if (all.empty() && options_.default_hp_metric) all.emplace("hp_metric", -1.0);
    if (all.empty()) return;
    const std::lock_guard lock(mutex_);
    start_file();
    const std::int64_t s = step.value_or(logged_);
    const double now = detail::tensorboard::wall_time_now();
    std::vector<std::string> tags;
    for (const auto& [key, value] : all) {
      tags.push_back(tag(key));
      add(detail::tensorboard::summary_event(now, s, detail::tensorboard::scalar_value(tags.back(), value)));
    }
    // NOTE: the metric infos name the prefixed tags, which the scalars carry (Lightning names the bare ones,
    // so its HPARAMS tab finds no value for them when a prefix is set).
    const auto hp = detail::tensorboard::hparams_summaries(params, tags, now);
    using detail::tensorboard::hparams_value;
    add(detail::tensorboard::summary_event(now, s, hparams_value(detail::tensorboard::experiment_tag, hp.experiment)));
    add(detail::tensorboard::summary_event(now, s,
                                           hparams_value(detail::tensorboard::session_start_tag, hp.session_start)));
    add(detail::tensorboard::summary_event(now, s,
                                           hparams_value(detail::tensorboard::session_end_tag, hp.session_end)));
    after_log();
  }

  /// Writes a text summary (the TEXT tab; Markdown) under the tag as given, at the step (without one,
  /// the next automatic step, which this does not advance); e.g. the command line of a run.
  void log_text(std::string_view tag, std::string_view text, std::optional<std::int64_t> step = std::nullopt) {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    const std::lock_guard lock(mutex_);
    start_file();
    const std::int64_t s = step.value_or(logged_);
    add(detail::tensorboard::summary_event(detail::tensorboard::wall_time_now(), s,
                                           detail::tensorboard::text_value(tag, text)));
    after_log();
  }

  /// Writes the pending records to the event file; on a write error throws fabric::Error and keeps them.
  void save() override {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    const std::lock_guard lock(mutex_);
    flush_locked();
  }

  /// Writes the pending records; logging may go on after it, into the same file.
  void finalize(std::string_view /*status*/) override { save(); }

 private:
  using Clock = std::chrono::steady_clock;

  std::string tag(const std::string& key) const { return options_.prefix.empty() ? key : options_.prefix + "-" + key; }

  // The version, settled on first use (the next free version_N unless one was given).
  const std::variant<int, std::string>& resolved_version() const {
    // NOTE: the versions are numbered in the expanded directory, where log_dir() puts them.
    if (!options_.version) {
      options_.version =
          detail::next_version(detail::tensorboard::expand_path((options_.root_dir / options_.name).string()));
    }
    return *options_.version;
  }

  // Creates the log directory and the event file with its first record (written at once, as TensorBoard
  // does), once; then starts the flush timer.
  void start_file() {
    if (!file_.empty()) return;
    const auto dir = log_dir();
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      detail::raise(
          "TensorBoardLogger: expected a log directory it can create, found {} fails: {}; check that root_dir "
          "is a writable directory (and no file stands in the path)",
          dir.string(), ec.message());
    }
    const double now = detail::tensorboard::wall_time_now();
    const auto path = dir / fmt::format("events.out.tfevents.{:010}.{}.{}.{}", static_cast<std::int64_t>(now),
                                        detail::tensorboard::host_name(), static_cast<long>(::getpid()),
                                        detail::tensorboard::event_file_counter().fetch_add(1));
    header_.clear();
    detail::tensorboard::append_record(header_, detail::tensorboard::file_version_event(now));
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(header_.data(), static_cast<std::streamsize>(header_.size()));
    out.flush();
    if (!out) {
      detail::raise("TensorBoardLogger: expected to write {}, found: {}; check that the directory is writable",
                    path.string(), std::generic_category().message(errno));
    }
    file_ = path;
    written_ = header_.size();
    last_flush_ = Clock::now();
    if (options_.flush_secs > 0) timer_ = std::thread([this] { run_timer(); });
  }

  void add(const std::string& event) {
    detail::tensorboard::append_record(pending_, event);
    ++pending_count_;
  }

  void after_log() {
    if (pending_count_ >= static_cast<std::size_t>(options_.max_queue) || options_.flush_secs <= 0) flush_locked();
  }

  // Flushes every flush_secs until the logger is destroyed; a failed flush keeps the records for the next.
  void run_timer() {
    // NOTE: capped so that the time point cannot overflow; 1e7 s is about 115 days.
    const auto period =
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(std::min(options_.flush_secs, 1e7)));
    std::unique_lock lock(mutex_);
    while (!stop_) {
      if (wake_.wait_until(lock, last_flush_ + period, [this] { return stop_; })) break;
      try {
        flush_locked();
      } catch (...) {  // NOTE: the thread cannot report it; the records stay pending and save() reports the error.
      }
      last_flush_ = Clock::now();
    }
  }

  void stop_timer() {
    {
      const std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    if (timer_.joinable()) timer_.join();
  }

  // Appends the pending records to the event file (recreating the file, with its first record, if it has
  // gone). On a write error the file is cut back to its last complete record and the records stay pending
  // for the next flush.
  void flush_locked() {
    if (pending_.empty()) return;
    std::error_code ec;
    std::string data;
    if (!std::filesystem::exists(file_, ec)) {
      std::filesystem::create_directories(file_.parent_path(), ec);
      written_ = 0;
      data = header_;
    }
    data += pending_;
    std::ofstream out(file_, std::ios::binary | std::ios::app);
    out.write(data.data(), static_cast<std::streamsize>(data.size()));
    out.flush();
    if (!out) {
      const int error = errno;
      out.close();
      if (std::filesystem::file_size(file_, ec) > written_ && !ec) std::filesystem::resize_file(file_, written_, ec);
      detail::raise(
          "TensorBoardLogger: expected to append {} bytes to {}, found: {}; make the directory writable (or free "
          "space) and call save() again: the {} records are kept",
          data.size(), file_.string(), std::generic_category().message(error), pending_count_);
    }
    written_ += data.size();
    pending_.clear();
    pending_count_ = 0;
    last_flush_ = Clock::now();
  }

  mutable Options options_;   // the version is filled in on first use
  mutable std::mutex mutex_;  // guards what follows, shared with the flush timer
  std::filesystem::path file_{};
  std::string header_{};        // the file's first record, written again if the file is recreated
  std::uintmax_t written_ = 0;  // bytes of complete records in file_
  std::string pending_{};       // framed records not yet in the file
  std::size_t pending_count_ = 0;
  std::int64_t logged_ = 0;  // log_metrics calls: the automatic step
  Clock::time_point last_flush_{};
  std::condition_variable wake_;
  bool stop_ = false;
  std::thread timer_;
};

}  // namespace fabric
