#pragma once
// fabric::CSVLogger: Lightning's CSV layout, root_dir/name/version_N/metrics.csv. Torch-free.

#include "fabric/error.hpp"
#include "fabric/logger.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <variant>
#include <vector>

namespace fabric {

/// Writes metrics to `root_dir/name/version_N/metrics.csv`, one row per log call, like Lightning's
/// CSVLogger: columns sorted by name, "step" among them; a metric first seen mid-run adds a column
/// and the file is rewritten with the wider header.
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

  /// Creates a logger; nothing is written until the first flush.
  explicit CSVLogger(Options options) : options_(std::move(options)) {
    if (options_.flush_logs_every_n_steps < 1) {
      detail::raise("CSVLogger: expected flush_logs_every_n_steps >= 1, found {}; pass a positive number",
                    options_.flush_logs_every_n_steps);
    }
    if (!options_.version) options_.version = next_version();
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
  std::string version() const override {
    return std::visit([](const auto& v) { return fmt::format("{}", v); }, *options_.version);
  }
  std::filesystem::path root_dir() const override { return options_.root_dir; }
  std::filesystem::path log_dir() const override {
    const auto& v = *options_.version;
    const std::string leaf = std::holds_alternative<int>(v) ? fmt::format("version_{}", std::get<int>(v))
                                                            : std::get<std::string>(v);
    return options_.root_dir / options_.name / leaf;
  }
  /// Returns the path of metrics.csv.
  std::filesystem::path metrics_file() const { return log_dir() / "metrics.csv"; }

  void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) override {
    const std::int64_t s = step.value_or(static_cast<std::int64_t>(logged_));
    Row row{s, {}};
    for (const auto& [key, value] : metrics) {
      const std::string name = options_.prefix.empty() ? key : options_.prefix + "-" + key;
      if (name == "step") {
        detail::raise("CSVLogger: a metric may not be named \"step\" (that column holds the step); rename it");
      }
      row.values.emplace_back(name, value);
    }
    rows_.push_back(std::move(row));
    ++logged_;
    if ((s + 1) % options_.flush_logs_every_n_steps == 0) save();
  }

  void log_hyperparams(const std::map<std::string, std::string>& params) override {
    std::filesystem::create_directories(log_dir());
    std::ofstream out(log_dir() / "hparams.yaml", std::ios::trunc);
    for (const auto& [key, value] : params) out << key << ": " << value << '\n';
    if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", (log_dir() / "hparams.yaml").string());
  }

  void save() override {
    if (rows_.empty()) return;
    std::filesystem::create_directories(log_dir());
    const auto path = metrics_file();
    bool new_keys = false;
    for (const auto& row : rows_) {
      for (const auto& kv : row.values) new_keys |= keys_.insert(kv.first).second;
    }
    const bool exists = std::filesystem::exists(path);
    if (exists && new_keys) rewrite_with_header(path);
    std::ofstream out(path, std::ios::app);
    if (!exists) out << header() << '\n';
    for (const auto& row : rows_) out << format_row(row) << '\n';
    out.flush();
    if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", path.string());
    rows_.clear();
  }

  void finalize(std::string_view /*status*/) override { save(); }

 private:
  struct Row {
    std::int64_t step;
    std::vector<std::pair<std::string, double>> values;
  };

  std::vector<std::string> columns() const {
    std::vector<std::string> cols(keys_.begin(), keys_.end());
    cols.push_back("step");
    std::sort(cols.begin(), cols.end());
    return cols;
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

  std::string header() const {
    std::string line;
    for (const auto& c : columns()) line += (line.empty() ? "" : ",") + quote(c);
    return line;
  }

  std::string format_row(const Row& row) const {
    std::string line;
    bool first = true;
    for (const auto& c : columns()) {
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
  void rewrite_with_header(const std::filesystem::path& path) const {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    std::vector<std::string> old_cols = split(line);
    std::vector<std::vector<std::string>> old_rows;
    while (std::getline(in, line)) old_rows.push_back(split(line));
    in.close();
    const auto cols = columns();
    std::string text = header() + "\n";
    for (const auto& r : old_rows) {
      std::string out;
      for (std::size_t i = 0; i < cols.size(); ++i) {
        if (i) out += ',';
        const auto it = std::find(old_cols.begin(), old_cols.end(), quote(cols[i]));
        if (it != old_cols.end()) {
          const auto j = static_cast<std::size_t>(it - old_cols.begin());
          if (j < r.size()) out += r[j];
        }
      }
      text += out + "\n";
    }
    const auto tmp = std::filesystem::path(path.string() + ".tmp");
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << text;
      out.flush();
      if (!out) detail::raise("CSVLogger: could not write {}; check that the directory is writable", tmp.string());
    }
    std::filesystem::rename(tmp, path);
  }

  // Splits a CSV line written by this logger (quoted fields kept quoted, to compare with quote()).
  static std::vector<std::string> split(const std::string& line) {
    std::vector<std::string> out(1);
    bool in_quotes = false;
    for (char c : line) {
      if (c == '"') in_quotes = !in_quotes;
      if (c == ',' && !in_quotes) {
        out.emplace_back();
      } else {
        out.back() += c;
      }
    }
    return out;
  }

  int next_version() const {
    const auto dir = options_.root_dir / options_.name;
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) return 0;
    int next = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      const std::string leaf = entry.path().filename().string();
      if (!entry.is_directory() || !leaf.starts_with("version_")) continue;
      int v = 0;
      const char* first = leaf.data() + 8;
      const char* last = leaf.data() + leaf.size();
      if (auto [p, err] = std::from_chars(first, last, v); err == std::errc{} && p == last) next = std::max(next, v + 1);
    }
    return next;
  }

  Options options_;
  std::set<std::string> keys_{};
  std::vector<Row> rows_{};
  std::size_t logged_ = 0;
};

}  // namespace fabric
