#pragma once
// fabric::Logger, the interface Fabric logs through (Lightning's Logger), the Logger concept a logger of
// your own may satisfy instead of deriving, and fabric::as_logger, which adapts one. Torch-free.

#include "fabric/core/concepts.hpp"

#include <algorithm>
#include <charconv>
#include <concepts>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace fabric {

/// Metrics as logged: name to value.
using Metrics = std::map<std::string, double>;
/// Hyper-parameters as logged: name to value as text.
using Hyperparameters = std::map<std::string, std::string>;

/// Receives metrics from `Fabric::log` and `Fabric::log_dict` on global rank zero. As in Lightning,
/// name, version, log_metrics and log_hyperparams are required; the directories, save and finalize
/// have defaults.
class Logger {
 public:
  virtual ~Logger() = default;
  /// Returns the experiment name.
  virtual std::string name() const = 0;
  /// Returns the experiment version (e.g. "0" for version_0).
  virtual std::string version() const = 0;
  /// Returns the directory that holds all experiments (none by default).
  virtual std::filesystem::path root_dir() const { return {}; }
  /// Returns the directory this run writes into (none by default).
  virtual std::filesystem::path log_dir() const { return {}; }
  /// Records metrics at a step; without a step the logger counts its own.
  virtual void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) = 0;
  /// Records hyper-parameters.
  virtual void log_hyperparams(const Hyperparameters& params) = 0;
  /// Writes what is buffered (nothing by default).
  virtual void save() {}
  /// Writes what is buffered and closes the run ("success", "failed", ...); saves by default.
  virtual void finalize(std::string_view /*status*/) { save(); }
};

namespace detail {

// ---- Lightning's version_N layout, shared by the file loggers ---------------------------------------

/// A logger's version: N for `version_N`, or a directory name given as it is.
using LoggerVersion = std::variant<int, std::string>;

/// Returns a version_N directory's N as Lightning's loggers read it (`_get_next_version`: the text
/// between "version_" and the next '_', all digits, so "version_5_old" is 5), or nothing for other names.
inline std::optional<int> version_number(std::string_view leaf) {
  if (!leaf.starts_with("version_")) return std::nullopt;
  std::string_view digits = leaf.substr(8);
  digits = digits.substr(0, digits.find('_'));
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  int v = 0;
  const char* last = digits.data() + digits.size();
  if (auto [p, err] = std::from_chars(digits.data(), last, v); err != std::errc{} || p != last) return std::nullopt;
  return v;
}

/// Returns the next free version under dir: one past the highest version_N directory, 0 when none.
inline int next_version(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return 0;
  int next = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    if (const auto v = version_number(entry.path().filename().string())) next = std::max(next, *v + 1);
  }
  return next;
}

/// Returns the version as `Logger::version` reports it: "3" for version_3, else the name.
inline std::string version_text(const LoggerVersion& v) {
  return std::holds_alternative<int>(v) ? std::to_string(std::get<int>(v)) : std::get<std::string>(v);
}

/// Returns the version's directory name: "version_3", or the name given.
inline std::string version_leaf(const LoggerVersion& v) {
  return std::holds_alternative<int>(v) ? "version_" + std::to_string(std::get<int>(v)) : std::get<std::string>(v);
}

/// The logger names its experiment.
template <class L>
concept logger_names = requires(const L& l) {
  { l.name() } -> std::convertible_to<std::string>;
  { l.version() } -> std::convertible_to<std::string>;
};
/// The logger records metrics.
template <class L>
concept logger_logs_metrics = requires(L& l, const Metrics& m, std::optional<std::int64_t> step) {
  l.log_metrics(m, step);
};
/// The logger records hyper-parameters.
template <class L>
concept logger_logs_hyperparams = requires(L& l, const Hyperparameters& h) {
  l.log_hyperparams(h);
};
/// Optional: the logger names its directories.
template <class L>
concept logger_has_dirs = requires(const L& l) {
  { l.root_dir() } -> std::convertible_to<std::filesystem::path>;
  { l.log_dir() } -> std::convertible_to<std::filesystem::path>;
};
/// Optional: the logger writes what it buffers.
template <class L>
concept logger_saves = requires(L& l) {
  l.save();
};
/// Optional: the logger closes its run with a status.
template <class L>
concept logger_finalizes = requires(L& l, std::string_view status) {
  l.finalize(status);
};

}  // namespace detail

/// A logger: a fabric::Logger, or any class with `name()`, `version()`, `log_metrics(metrics, step)` and
/// `log_hyperparams(params)` (and optionally `root_dir()`, `log_dir()`, `save()`, `finalize(status)`),
/// which fabric::as_logger adapts without inheritance.
template <class L>
concept LoggerLike = std::derived_from<L, Logger> ||
    (detail::logger_names<L>&& detail::logger_logs_metrics<L>&& detail::logger_logs_hyperparams<L>);

namespace detail {

/// Fails with one message naming the first member a logger lacks; true when it has all.
template <class L>
consteval bool check_logger() {
  if constexpr (std::derived_from<L, Logger>) {
    return true;
  } else if constexpr (!logger_names<L>) {
    static_assert(dependent_false_v<L>,
                  "fabric: a Logger needs `std::string name() const` and `std::string version() const`; add them, "
                  "or derive from fabric::Logger");
  } else if constexpr (!logger_logs_metrics<L>) {
    static_assert(dependent_false_v<L>,
                  "fabric: a Logger needs `void log_metrics(const fabric::Metrics&, std::optional<std::int64_t> "
                  "step)`; add it, or derive from fabric::Logger");
  } else if constexpr (!logger_logs_hyperparams<L>) {
    static_assert(dependent_false_v<L>,
                  "fabric: a Logger needs `void log_hyperparams(const fabric::Hyperparameters&)`; add it, or derive "
                  "from fabric::Logger");
  }
  return LoggerLike<L>;
}

/// Presents a LoggerLike object that does not derive from fabric::Logger as one.
template <class L>
class LoggerAdapter final : public Logger {
 public:
  explicit LoggerAdapter(std::shared_ptr<L> logger) : logger_(std::move(logger)) {}
  std::string name() const override { return logger_->name(); }
  std::string version() const override { return logger_->version(); }
  std::filesystem::path root_dir() const override {
    if constexpr (logger_has_dirs<L>) return logger_->root_dir();
    return {};
  }
  std::filesystem::path log_dir() const override {
    if constexpr (logger_has_dirs<L>) return logger_->log_dir();
    return {};
  }
  void log_metrics(const Metrics& metrics, std::optional<std::int64_t> step) override {
    logger_->log_metrics(metrics, step);
  }
  void log_hyperparams(const Hyperparameters& params) override { logger_->log_hyperparams(params); }
  void save() override {
    if constexpr (logger_saves<L>) logger_->save();
  }
  void finalize(std::string_view status) override {
    if constexpr (logger_finalizes<L>) {
      logger_->finalize(status);
    } else {
      save();
    }
  }

 private:
  std::shared_ptr<L> logger_;
};

}  // namespace detail

/// Returns a logger for `Options::loggers`: a fabric::Logger as it is, any other LoggerLike class behind
/// an adapter (a class that lacks a member fails with a message naming it).
///
///     struct Printer { std::string name() const; std::string version() const;
///                      void log_metrics(const fabric::Metrics&, std::optional<std::int64_t>);
///                      void log_hyperparams(const fabric::Hyperparameters&); };
///     fabric::Fabric<> fabric{{.loggers = {fabric::as_logger(std::make_shared<Printer>())}}};
template <class L>
std::shared_ptr<Logger> as_logger(std::shared_ptr<L> logger) {
  if constexpr (!detail::check_logger<L>()) {
    return nullptr;
  } else if constexpr (std::derived_from<L, Logger>) {
    return logger;
  } else {
    return std::make_shared<detail::LoggerAdapter<L>>(std::move(logger));
  }
}

}  // namespace fabric
