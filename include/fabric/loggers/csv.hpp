#pragma once
// fabric::CSVLogger: Lightning's CSV layout, root_dir/name/version_N/metrics.csv. Torch-free.

#include "fabric/core/error.hpp"
#include "fabric/core/rank_zero.hpp"
#include "fabric/detail/yaml.hpp"
#include "fabric/loggers/logger.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

namespace fabric {

/// Writes metrics to `root_dir/name/version_N/metrics.csv`, one row per log call, like Lightning's
/// CSVLogger: columns sorted by name, "step" among them; a metric first seen mid-run adds a column
/// and the file is rewritten with the wider header.
///
/// Like Lightning, the version (next free version_N unless given) is settled on first use, the log
/// directory is created by the first log call, and a metrics.csv already in that directory is
/// replaced by this run's. Only global rank zero writes (`fabric::is_rank_zero()`, Lightning's
/// `@rank_zero_only`): on the other ranks log_metrics, log_hyperparams, save and finalize do nothing.
///
///     auto csv = std::make_shared<fabric::CSVLogger>(fabric::CSVLogger::Options{.root_dir = "logs"});
///     fabric::Fabric<> fabric{{.loggers = {csv}}};
class CSVLogger final : public Logger {
 public:
  /// Settings of a CSVLogger; version unset means the next free version_N.
  struct Options {
    std::filesystem::path root_dir = ".";
    std::string name = "lightning_logs";
    std::optional<std::variant<int, std::string>> version{};
    std::string prefix{};
    int flush_logs_every_n_steps = 100;
  };

  /// Creates a logger; nothing is written before the first log call.
  explicit CSVLogger(Options options) : options_(std::move(options)) {
    if (options_.flush_logs_every_n_steps < 1) {
      detail::raise("CSVLogger: expected flush_logs_every_n_steps >= 1, found {}; pass a positive number",
                    options_.flush_logs_every_n_steps);
    }
  }
  ~CSVLogger() override {
    try {
      save();
    } catch (...) {  // NOTE: a destructor must not throw; finalize() reports write errors.
    }
  }
  CSVLogger(const CSVLogger&) = delete;
  CSVLogger& operator=(const CSVLogger&) = delete;

  std::string name() const override { return options_.name; }
  std::string version() const override { return detail::version_text(resolved_version()); }
  std::filesystem::path root_dir() const override { return options_.root_dir; }
  std::filesystem::path log_dir() const override {
    return options_.root_dir / options_.name / detail::version_leaf(resolved_version());
  }
  /// Returns the path of metrics.csv.
  std::filesystem::path metrics_file() const { return log_dir() / "metrics.csv"; }

  void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) override {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    const std::int64_t s = step.value_or(static_cast<std::int64_t>(logged_));
    Row row{s, {}};
    for (const auto& [key, value] : metrics) {
      const std::string name = options_.prefix.empty() ? key : options_.prefix + "-" + key;
      if (name == "step") {
        detail::raise("CSVLogger: a metric may not be named \"step\" (that column holds the step); rename it");
      }
      row.values.emplace_back(name, value);
    }
    start_experiment();
    rows_.push_back(std::move(row));
    ++logged_;
    if ((s + 1) % options_.flush_logs_every_n_steps == 0) save();
  }

  /// Writes the hyper-parameters to log_dir()/hparams.yaml, every key and value a quoted YAML string (any
  /// text is safe: colons, '#', newlines, unicode), replacing what an earlier call wrote.
  void log_hyperparams(const Hyperparameters& params) override {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    start_experiment();
    const auto path = log_dir() / "hparams.yaml";
    std::ofstream out(path, std::ios::trunc);
    detail::write_yaml_mapping(out, params);
    out.flush();
    if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", path.string());
  }

  void save() override {
    if (!is_rank_zero()) return;  // as Lightning's @rank_zero_only
    if (rows_.empty()) return;
    start_experiment();
    const auto path = metrics_file();
    // The columns are committed only once the rows are on disk, so a failed write can be retried.
    std::set<std::string> keys = keys_;
    bool new_keys = false;
    for (const auto& row : rows_) {
      for (const auto& kv : row.values) new_keys |= keys.insert(kv.first).second;
    }
    const auto cols = columns(keys);
    std::error_code ec;
    // A file from an earlier run in the same directory is replaced, as Lightning does.
    const bool append = written_ && std::filesystem::exists(path, ec);
    if (append && new_keys) rewrite_with_header(path, cols);
    std::ofstream out(path, append ? std::ios::app : std::ios::trunc);
    if (!append) out << header(cols) << '\n';
    for (const auto& row : rows_) out << format_row(row, cols) << '\n';
    out.flush();
    if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", path.string());
    keys_ = std::move(keys);
    written_ = true;
    rows_.clear();
  }

  void finalize(std::string_view /*status*/) override { save(); }

 private:
  struct Row {
    std::int64_t step;
    std::vector<std::pair<std::string, double>> values;
  };

  static std::vector<std::string> columns(const std::set<std::string>& keys) {
    std::vector<std::string> cols(keys.begin(), keys.end());
    cols.push_back("step");
    std::sort(cols.begin(), cols.end());
    return cols;
  }

  // The version, settled on first use (the next free version_N unless one was given).
  const std::variant<int, std::string>& resolved_version() const {
    if (!options_.version) options_.version = detail::next_version(options_.root_dir / options_.name);
    return *options_.version;
  }

  // Settles the version and creates the log directory (Lightning's experiment), once.
  void start_experiment() {
    if (started_) return;
    const auto dir = log_dir();
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      detail::raise("CSVLogger: could not create the log directory {}: {}; check that root_dir is a writable directory",
                    dir.string(), ec.message());
    }
    started_ = true;
  }

  static std::string quote(const std::string& s) {
    if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
    std::string out = "\"";
    for (char c : s) {
      if (c == '"') out += '"';
      out += c;
    }
    return out + "\"";
  }

  static std::string format_value(double v) {
    std::string s = fmt::format("{}", v);
    // NOTE: Python's csv module writes floats with repr(), which always shows a decimal point.
    if (s.find_first_of(".eni") == std::string::npos) s += ".0";
    return s;
  }

  static std::string header(const std::vector<std::string>& cols) {
    std::string line;
    for (const auto& c : cols) {
      if (!line.empty()) line += ',';
      line += quote(c);
    }
    return line;
  }

  static std::string format_row(const Row& row, const std::vector<std::string>& cols) {
    std::string line;
    bool first = true;
    for (const auto& c : cols) {
      if (!first) line += ',';
      first = false;
      if (c == "step") {
        line += fmt::format("{}", row.step);
        continue;
      }
      for (const auto& [k, v] : row.values) {
        if (k == c) {
          line += format_value(v);
          break;
        }
      }
    }
    return line;
  }

  // Re-reads the rows already on disk and writes them back under the wider header.
  static void rewrite_with_header(const std::filesystem::path& path, const std::vector<std::string>& cols) {
    std::string content;
    {
      std::ifstream in(path, std::ios::binary);
      content.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (in.bad()) detail::raise("CSVLogger: could not read {} to add a column", path.string());
    }
    const auto records = parse(content);
    if (records.empty()) return;
    const std::vector<std::string>& old_cols = records.front();
    std::string text = header(cols) + "\n";
    for (std::size_t r = 1; r < records.size(); ++r) {
      std::string out;
      for (std::size_t i = 0; i < cols.size(); ++i) {
        if (i) out += ',';
        const auto it = std::find(old_cols.begin(), old_cols.end(), quote(cols[i]));
        if (it != old_cols.end()) {
          const auto j = static_cast<std::size_t>(it - old_cols.begin());
          if (j < records[r].size()) out += records[r][j];
        }
      }
      text += out + "\n";
    }
    const auto tmp = std::filesystem::path(path.string() + ".tmp");
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out << text;
      out.flush();
      if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", tmp.string());
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) detail::raise("CSVLogger: could not replace {}: {}", path.string(), ec.message());
  }

  // Splits CSV text written by this logger into records of fields; quoted fields stay quoted (to
  // compare with quote()) and may hold commas and line breaks.
  static std::vector<std::vector<std::string>> parse(const std::string& text) {
    std::vector<std::vector<std::string>> records;
    std::vector<std::string> fields(1);
    bool in_quotes = false;
    bool any = false;
    for (char c : text) {
      if (c == '"') in_quotes = !in_quotes;
      if (!in_quotes && (c == '\n' || c == '\r')) {
        if (any) records.push_back(std::move(fields));
        fields.assign(1, std::string());
        any = false;
        continue;
      }
      any = true;
      if (c == ',' && !in_quotes) {
        fields.emplace_back();
      } else {
        fields.back() += c;
      }
    }
    if (any) records.push_back(std::move(fields));
    return records;
  }

  mutable Options options_;  // the version is filled in on first use
  std::set<std::string> keys_{};
  std::vector<Row> rows_{};
  std::size_t logged_ = 0;
  bool started_ = false;  // the log directory exists
  bool written_ = false;  // this run wrote metrics.csv
};

}  // namespace fabric
