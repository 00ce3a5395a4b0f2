#pragma once
// fabric::ProgressBar, a callback that shows how far training is: on a terminal a live bar per epoch
// (done/total, percent, elapsed and remaining time, rate, the last logged metrics), elsewhere (CI logs,
// files, `| tee`) plain lines at an interval; on global rank zero only. Torch-free (fmt, std, POSIX).

#include "fabric/core/error.hpp"
#include "fabric/core/rank_zero.hpp"
#include "fabric/loggers/logger.hpp"

#include <fmt/format.h>

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace fabric {

namespace detail {

/// The object passed to `on_after_setup` tells whether this process is global rank zero (a Fabric).
template <class F>
concept KnowsGlobalZero = requires(const F& fabric) {
  { fabric.is_global_zero() } -> std::convertible_to<bool>;
};

/// Returns the columns a code point takes on a terminal, as wcwidth: 2 for East Asian wide and
/// full-width characters and emoji, 0 for combining marks and zero-width spaces, else 1.
constexpr int code_point_width(char32_t c) noexcept {
  if ((c >= 0x0300 && c <= 0x036F) || (c >= 0x200B && c <= 0x200F) || (c >= 0xFE00 && c <= 0xFE0F)) return 0;
  const bool wide = (c >= 0x1100 && c <= 0x115F) || (c >= 0x2E80 && c <= 0x303E) || (c >= 0x3041 && c <= 0x33FF) ||
                    (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0xA000 && c <= 0xA4CF) ||
                    (c >= 0xAC00 && c <= 0xD7A3) || (c >= 0xF900 && c <= 0xFAFF) || (c >= 0xFE30 && c <= 0xFE4F) ||
                    (c >= 0xFF00 && c <= 0xFF60) || (c >= 0xFFE0 && c <= 0xFFE6) || (c >= 0x1F300 && c <= 0x1F64F) ||
                    (c >= 0x1F900 && c <= 0x1F9FF) || (c >= 0x20000 && c <= 0x3FFFD);
  return wide ? 2 : 1;
}

/// Reads the code point at `at` of UTF-8 text and moves past it (a bad byte reads as itself).
constexpr char32_t next_code_point(std::string_view text, std::size_t& at) noexcept {
  const auto lead = static_cast<unsigned char>(text[at]);
  const std::size_t n = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
  char32_t c = n == 1 ? lead : lead & (0x7F >> n);
  std::size_t i = 1;
  for (; i < n && at + i < text.size() && (static_cast<unsigned char>(text[at + i]) & 0xC0) == 0x80; ++i) {
    c = (c << 6) | (static_cast<unsigned char>(text[at + i]) & 0x3F);
  }
  at += i;
  return c;
}

/// Returns the terminal columns UTF-8 text takes.
constexpr std::size_t display_width(std::string_view text) noexcept {
  std::size_t columns = 0;
  for (std::size_t at = 0; at < text.size();)
    columns += static_cast<std::size_t>(code_point_width(next_code_point(text, at)));
  return columns;
}

/// Cuts UTF-8 text to at most `columns` terminal columns, never inside a character.
constexpr std::string_view truncate_display(std::string_view text, std::size_t columns) noexcept {
  std::size_t used = 0;
  for (std::size_t at = 0; at < text.size();) {
    const auto start = at;
    used += static_cast<std::size_t>(code_point_width(next_code_point(text, at)));
    if (used > columns) return text.substr(0, start);
  }
  return text;
}

/// Formats seconds as tqdm does: mm:ss, or h:mm:ss from an hour on.
inline std::string format_interval(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto total = static_cast<std::int64_t>(seconds);
  const auto h = total / 3600, m = total / 60 % 60, s = total % 60;
  return h > 0 ? fmt::format("{}:{:02}:{:02}", h, m, s) : fmt::format("{:02}:{:02}", m, s);
}

/// Formats a rate as tqdm does: "35.21it/s", or "2.50s/it" below one per second.
inline std::string format_rate(double per_second) {
  if (!std::isfinite(per_second) || per_second <= 0) return "?it/s";
  return per_second >= 1 ? fmt::format("{:.2f}it/s", per_second) : fmt::format("{:.2f}s/it", 1 / per_second);
}

/// Returns whether the locale asks for UTF-8 (LC_ALL, then LC_CTYPE, then LANG, as setlocale reads them).
inline bool locale_is_utf8() noexcept {
  for (const char* name : {"LC_ALL", "LC_CTYPE", "LANG"}) {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') continue;
    const std::string_view v(value);
    return v.find("UTF-8") != std::string_view::npos || v.find("utf8") != std::string_view::npos ||
           v.find("utf-8") != std::string_view::npos || v.find("UTF8") != std::string_view::npos;
  }
  return false;
}

}  // namespace detail

/// Shows training progress on global rank zero: a live bar on a terminal, plain lines elsewhere.
///
/// List it among Fabric's callbacks and call its hooks from the loop; `log`/`log_dict` feed it the
/// metrics it shows (through the `on_log_metrics` hook), so nothing else changes:
///
///     fabric::Fabric<fabric::CPU, fabric::SingleDevice, fabric::FP32, fabric::ProgressBar> fabric(
///         {}, fabric::ProgressBar({.max_epochs = epochs}));
///     for (int epoch = 0; epoch < epochs; ++epoch) {
///       fabric.call(fabric::hooks::on_train_epoch_start, epoch, train.size());
///       for (std::int64_t i = 0; auto& batch : train) {
///         ...
///         fabric.log("loss", loss);
///         fabric.call(fabric::hooks::on_train_batch_end, i++);
///       }
///       fabric.call(fabric::hooks::on_train_epoch_end);
///     }
///
/// The bar redraws at most every `refresh_interval` and a line is written at most every
/// `line_interval` (and at the end of every epoch), so a step costs one clock read. Output errors are
/// ignored: a progress bar never stops training.
class ProgressBar {
 public:
  /// Where the progress goes and how.
  enum class Mode {
    automatic,  ///< a bar when the stream is a terminal (and TERM is not "dumb"), else lines
    bar,        ///< a bar redrawn in place with a carriage return
    lines,      ///< one plain line per interval
  };

  /// The bar's settings.
  struct Options {
    /// The stream written to (stderr, as tqdm).
    std::FILE* stream = stderr;
    /// A bar, lines, or whichever fits the stream.
    Mode mode = Mode::automatic;
    /// The bar redraws at most this often.
    std::chrono::milliseconds refresh_interval{100};
    /// In lines mode a line is written at most this often, and at the end of every epoch.
    std::chrono::milliseconds line_interval{10'000};
    /// The number of epochs: epoch 3 of 10 shows as "Epoch 3/9" (epochs count from 0, as in
    /// Lightning's RichProgressBar); without it: "Epoch 3".
    std::optional<std::int64_t> max_epochs{};
    /// The bar's width in columns; by default the terminal's, else $COLUMNS, else 80.
    std::optional<int> width{};
    /// Draws the bar with ASCII '#' instead of Unicode blocks; by default when the locale is not UTF-8.
    std::optional<bool> ascii{};
    /// Shows nothing when false.
    bool enabled = true;
  };

  /// Creates a progress bar with default options.
  ProgressBar() : ProgressBar(Options{}) {}
  /// Creates a progress bar.
  explicit ProgressBar(Options options) : options_(options) {
    if (options_.stream == nullptr) {
      detail::raise("ProgressBar: expected a stream to write to, found a null FILE*; pass stderr or stdout");
    }
    if (options_.refresh_interval.count() < 0 || options_.line_interval.count() < 0) {
      detail::raise("ProgressBar: expected intervals >= 0 ms, found refresh_interval {} ms and line_interval {} ms",
                    options_.refresh_interval.count(), options_.line_interval.count());
    }
    if (options_.width && *options_.width < 1) {
      detail::raise(
          "ProgressBar: expected a width of at least 1 column, found {}; leave it unset to use the "
          "terminal's",
          *options_.width);
    }
    bar_ = options_.mode == Mode::bar ||
           (options_.mode == Mode::automatic && ::isatty(::fileno(options_.stream)) == 1 && !dumb_terminal());
    ascii_ = options_.ascii.value_or(!detail::locale_is_utf8());
  }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  /// Takes over another bar (its open line is finished by this one).
  ProgressBar(ProgressBar&& other) noexcept
      : options_(other.options_),
        bar_(other.bar_),
        ascii_(other.ascii_),
        rank_zero_(other.rank_zero_),
        run_(std::move(other.run_)),
        metrics_(std::move(other.metrics_)) {
    other.run_.open = false;
  }
  ProgressBar& operator=(ProgressBar&&) = delete;
  /// Ends an open bar's line.
  ~ProgressBar() {
    if (run_.open && bar_) write("\n");
  }

  // ---- hooks ---------------------------------------------------------------------------------------

  /// Shows the bar only on global rank zero (Fabric calls this hook from `setup`).
  template <detail::KnowsGlobalZero F, class... Modules>
  void on_after_setup(const F& fabric, const Modules&... /*modules*/) noexcept {
    rank_zero_ = fabric.is_global_zero();
  }
  /// Starts an epoch's bar without a known length.
  void on_train_epoch_start(std::int64_t epoch) { start(fmt::format("Epoch {}", epoch_label(epoch)), {}); }
  /// Starts an epoch's bar of `total_batches` steps.
  void on_train_epoch_start(std::int64_t epoch, std::int64_t total_batches) {
    start(fmt::format("Epoch {}", epoch_label(epoch)), total_batches);
  }
  /// Marks batch `batch_idx` (from 0) of the epoch as done.
  void on_train_batch_end(std::int64_t batch_idx) { advance(batch_idx + 1); }
  /// Marks batch `batch_idx` as done and shows these metrics with the logged ones.
  void on_train_batch_end(std::int64_t batch_idx, const Metrics& metrics) {
    merge(metrics);
    advance(batch_idx + 1);
  }
  /// Ends the epoch's bar (whatever else the hook is called with).
  template <class... Args>
  void on_train_epoch_end(const Args&... /*args*/) {
    finish();
  }
  /// Ends an open bar at the end of training.
  template <class... Args>
  void on_train_end(const Args&... /*args*/) {
    finish();
  }
  /// Starts a validation bar without a known length.
  void on_validation_epoch_start() { start_validation({}); }
  /// Starts a validation bar of `total_batches` steps.
  void on_validation_epoch_start(std::int64_t total_batches) { start_validation(total_batches); }
  /// Marks validation batch `batch_idx` (from 0) as done.
  void on_validation_batch_end(std::int64_t batch_idx) { advance(batch_idx + 1); }
  /// Ends the validation bar: on a terminal it is cleared (as Lightning's), in lines mode one line stays.
  template <class... Args>
  void on_validation_epoch_end(const Args&... /*args*/) {
    finish();
  }
  /// Remembers the metrics logged through `Fabric::log` and `Fabric::log_dict` to show them.
  void on_log_metrics(const Metrics& metrics, const std::optional<std::int64_t>& /*step*/) { merge(metrics); }

  // ---- state ---------------------------------------------------------------------------------------

  /// Returns whether the bar is drawn in place (else it writes lines).
  bool is_bar() const noexcept { return bar_; }
  /// Returns whether anything is shown (enabled, and global rank zero).
  bool is_enabled() const noexcept { return options_.enabled && rank_zero_; }
  /// Returns the metrics shown: the last value of each name logged or passed.
  const Metrics& metrics() const noexcept { return metrics_; }
  /// Returns the steps done in the current bar.
  std::int64_t done() const noexcept { return run_.done; }

 private:
  using Clock = std::chrono::steady_clock;

  struct Run {
    std::string label;
    std::optional<std::int64_t> total;
    std::int64_t done = 0;
    Clock::time_point started{};
    Clock::time_point shown{};
    bool open = false;
    bool validation = false;
  };

  static bool dumb_terminal() noexcept {
    const char* term = std::getenv("TERM");
    return term != nullptr && std::string_view(term) == "dumb";
  }

  std::string epoch_label(std::int64_t epoch) const {
    // NOTE: epochs count from 0 and the label shows the last one, as Lightning's RichProgressBar.
    return options_.max_epochs ? fmt::format("{}/{}", epoch, *options_.max_epochs - 1) : fmt::format("{}", epoch);
  }

  void start(std::string label, std::optional<std::int64_t> total) {
    if (total && *total < 0) {
      detail::raise("ProgressBar: expected the number of batches to be >= 0, found {}", *total);
    }
    finish();
    const auto now = Clock::now();
    run_ = Run{std::move(label), total, 0, now, now, true, false};
    if (bar_) draw(now);
  }

  void start_validation(std::optional<std::int64_t> total) {
    // NOTE: a validation bar inside a training epoch ends the training line first; training resumes on
    // a new line after it.
    if (run_.open && !run_.validation) finish();
    start("Validation", total);
    run_.validation = true;
  }

  void advance(std::int64_t done) {
    if (!run_.open) return;
    run_.done = std::max(run_.done, done);
    const auto now = Clock::now();
    const auto interval = bar_ ? options_.refresh_interval : options_.line_interval;
    if (now - run_.shown < interval) return;
    if (bar_) {
      draw(now);
    } else {
      line(now);
    }
  }

  // Ends the open bar: a training bar stays on its line, a validation bar is cleared (on a terminal).
  void finish() {
    if (!run_.open) return;
    const bool keep = !run_.validation;
    const auto now = Clock::now();
    if (bar_) {
      if (keep) {
        draw(now);
        write("\n");
      } else {
        write("\r\x1b[K");
      }
    } else {
      line(now);
    }
    run_.open = false;
  }

  void merge(const Metrics& metrics) {
    for (const auto& [name, value] : metrics) metrics_.insert_or_assign(name, value);
  }

  std::string postfix() const {
    std::string out;
    for (const auto& [name, value] : metrics_) {
      if (!out.empty()) out += ", ";
      fmt::format_to(std::back_inserter(out), "{}={:.4g}", name, value);
    }
    return out;
  }

  int columns() const noexcept {
    if (options_.width) return *options_.width;
    winsize size{};
    if (::ioctl(::fileno(options_.stream), TIOCGWINSZ, &size) == 0 && size.ws_col > 0) return size.ws_col;
    if (const char* env = std::getenv("COLUMNS")) {
      const int n = std::atoi(env);
      if (n > 0) return n;
    }
    return 80;
  }

  void draw(Clock::time_point now) {
    run_.shown = now;
    if (!is_enabled()) return;
    const double elapsed = std::chrono::duration<double>(now - run_.started).count();
    const double rate = elapsed > 0 ? static_cast<double>(run_.done) / elapsed : 0.0;
    std::string stats = fmt::format("[{}", detail::format_interval(elapsed));
    if (run_.total) {
      const double left = rate > 0 ? static_cast<double>(*run_.total - run_.done) / rate : -1;
      stats += "<" + detail::format_interval(left);
    }
    stats += ", " + detail::format_rate(rate);
    if (const auto extra = postfix(); !extra.empty()) stats += ", " + extra;
    stats += "]";

    const auto width = static_cast<std::size_t>(columns());
    std::string text;
    if (run_.total) {
      const auto total = *run_.total;
      const double fraction = total > 0 ? std::min(1.0, static_cast<double>(run_.done) / total) : 1.0;
      const auto left = fmt::format("{}: {:3.0f}%|", run_.label, std::floor(fraction * 100));
      const auto right = fmt::format("| {}/{} {}", run_.done, total, stats);
      const auto used = detail::display_width(left) + detail::display_width(right);
      text = left;
      // NOTE: the last column stays empty: writing into it wraps the line on some terminals. Long
      // metrics are cut before the bar gets narrower than a quarter of the line (at most 10 cells).
      const auto least = std::min<std::size_t>(10, (width - 1) / 4);
      const auto cells = used + 1 < width ? std::max(width - 1 - used, least) : least;
      if (cells > 0) text += bar(fraction, cells);
      text += right;
    } else {
      text = fmt::format("{}: {}it {}", run_.label, run_.done, stats);
    }
    write(fmt::format("\r{}\x1b[K", detail::truncate_display(text, width - 1)));
  }

  std::string bar(double fraction, std::size_t cells) const {
    // NOTE: eighths of a cell as tqdm draws them, or '#' for whole cells in ASCII.
    static constexpr std::string_view eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
    const auto filled = fraction * static_cast<double>(cells);
    auto whole = static_cast<std::size_t>(filled);
    std::string out;
    if (ascii_) {
      out.assign(whole, '#');
    } else {
      for (std::size_t i = 0; i < whole; ++i) out += "█";
      if (whole < cells) {
        const auto part = static_cast<std::size_t>((filled - static_cast<double>(whole)) * 8);
        if (part > 0) {
          out += eighths[part];
          ++whole;
        }
      }
    }
    out.append(cells - std::min(cells, whole), ' ');
    return out;
  }

  void line(Clock::time_point now) {
    run_.shown = now;
    if (!is_enabled()) return;
    const double elapsed = std::chrono::duration<double>(now - run_.started).count();
    const double rate = elapsed > 0 ? static_cast<double>(run_.done) / elapsed : 0.0;
    std::string text;
    if (run_.total) {
      const auto total = *run_.total;
      const double percent = total > 0 ? std::floor(100.0 * static_cast<double>(run_.done) / total) : 100.0;
      const double left = rate > 0 ? static_cast<double>(total - run_.done) / rate : -1;
      text = fmt::format("{}: {}/{} ({:.0f}%) [{}<{}, {}]", run_.label, run_.done, total, percent,
                         detail::format_interval(elapsed), detail::format_interval(left), detail::format_rate(rate));
    } else {
      text = fmt::format("{}: {} [{}, {}]", run_.label, run_.done, detail::format_interval(elapsed),
                         detail::format_rate(rate));
    }
    if (const auto extra = postfix(); !extra.empty()) text += " " + extra;
    write(text + "\n");
  }

  void write(std::string_view text) const noexcept {
    if (!is_enabled()) return;
    std::fwrite(text.data(), 1, text.size(), options_.stream);
    std::fflush(options_.stream);
  }

  Options options_;
  bool bar_ = false;
  bool ascii_ = false;
  bool rank_zero_ = is_rank_zero();  // until on_after_setup says
  Run run_{};
  Metrics metrics_{};
};

}  // namespace fabric
