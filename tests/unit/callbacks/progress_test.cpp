// ProgressBar: plain lines when the stream is a file, a live bar on a real terminal (a pseudo-terminal
// whose other end the test reads), the throttle, the width of the terminal and of Unicode text,
// non-finite metrics, rank zero only, dispatch through Fabric's hooks, and its errors.

#include <fabric/callbacks/progress.hpp>
#include <fabric/core/hooks.hpp>

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <regex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Catch::Matchers::ContainsSubstring;
using Catch::Matchers::EndsWith;
using Catch::Matchers::Matches;
using Catch::Matchers::StartsWith;
using fabric::ProgressBar;
using namespace std::chrono_literals;

// A temporary file as the bar's stream (not a terminal), read back as text.
class FileStream {
 public:
  FileStream() : file_(std::tmpfile()) {
    if (file_ == nullptr) throw std::runtime_error("tmpfile failed");
  }
  ~FileStream() { std::fclose(file_); }
  FileStream(const FileStream&) = delete;
  FileStream& operator=(const FileStream&) = delete;
  std::FILE* get() const { return file_; }
  std::string text() const {
    std::fflush(file_);
    std::rewind(file_);
    std::string out;
    for (int c; (c = std::fgetc(file_)) != EOF;) out += static_cast<char>(c);
    return out;
  }
  std::vector<std::string> lines() const {
    std::vector<std::string> out;
    std::string current;
    for (char c : text()) {
      if (c == '\n') {
        out.push_back(current);
        current.clear();
      } else {
        current += c;
      }
    }
    if (!current.empty()) out.push_back(current);
    return out;
  }

 private:
  std::FILE* file_;
};

// A pseudo-terminal of a given width: the bar writes to its terminal end, the test reads the other end.
class Terminal {
 public:
  explicit Terminal(unsigned short columns) {
    master_ = ::posix_openpt(O_RDWR | O_NOCTTY);
    if (master_ < 0 || ::grantpt(master_) != 0 || ::unlockpt(master_) != 0) throw std::runtime_error("no pty");
    const int slave = ::open(::ptsname(master_), O_RDWR | O_NOCTTY);
    if (slave < 0) throw std::runtime_error("cannot open the pty's terminal end");
    termios raw{};
    ::tcgetattr(slave, &raw);
    ::cfmakeraw(&raw);  // NOTE: no "\n" -> "\r\n" translation, so the test reads what the bar wrote
    ::tcsetattr(slave, TCSANOW, &raw);
    winsize size{};
    size.ws_col = columns;
    size.ws_row = 24;
    ::ioctl(slave, TIOCSWINSZ, &size);
    stream_ = ::fdopen(slave, "w");
  }
  ~Terminal() {
    std::fclose(stream_);
    ::close(master_);
  }
  Terminal(const Terminal&) = delete;
  Terminal& operator=(const Terminal&) = delete;
  std::FILE* get() const { return stream_; }
  // Everything written so far.
  std::string read() {
    std::fflush(stream_);
    std::string out;
    pollfd fd{master_, POLLIN, 0};
    char buffer[4096];
    while (::poll(&fd, 1, 50) > 0 && (fd.revents & POLLIN) != 0) {
      const auto n = ::read(master_, buffer, sizeof buffer);
      if (n <= 0) break;
      out.append(buffer, static_cast<std::size_t>(n));
    }
    return out;
  }

 private:
  int master_ = -1;
  std::FILE* stream_ = nullptr;
};

// The frames drawn on a terminal: the text after each carriage return, without the erase sequence.
std::vector<std::string> frames(const std::string& output) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while ((at = output.find('\r', at)) != std::string::npos) {
    auto end = output.find_first_of("\r\n", at + 1);
    auto frame = output.substr(at + 1, end == std::string::npos ? std::string::npos : end - at - 1);
    if (const auto erase = frame.find("\x1b[K"); erase != std::string::npos) frame.erase(erase);
    out.push_back(frame);
    at += 1;
  }
  return out;
}

// Whether text is complete UTF-8 (no sequence cut short).
bool valid_utf8(const std::string& text) {
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > text.size()) return false;
    for (std::size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) & 0xC0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

struct NotRankZero {
  bool is_global_zero() const { return false; }
};
struct RankZero {
  bool is_global_zero() const { return true; }
};

// One epoch of `batches` steps logging a loss at each.
void epoch(ProgressBar& bar, std::int64_t index, std::int64_t batches) {
  bar.on_train_epoch_start(index, batches);
  for (std::int64_t i = 0; i < batches; ++i) {
    bar.on_log_metrics({{"loss", 1.0 / static_cast<double>(i + 1)}}, i);
    bar.on_train_batch_end(i);
  }
  bar.on_train_epoch_end();
}

TEST_CASE("ProgressBar writes plain lines when the stream is not a terminal", "[callbacks][progress]") {
  FileStream file;

  SECTION("a line per interval, one at the end of the epoch, with the last logged metrics") {
    ProgressBar bar({.stream = file.get(), .line_interval = 0ms, .max_epochs = 3});
    CHECK_FALSE(bar.is_bar());
    epoch(bar, 1, 4);
    const auto lines = file.lines();
    REQUIRE(lines.size() == 5);  // four steps, and the epoch's end
    CHECK_THAT(lines[0], Matches(R"(Epoch 1/2: 1/4 \(25%\) \[00:00<\S+, \S+\] loss=1)"));
    CHECK_THAT(lines[1], StartsWith("Epoch 1/2: 2/4 (50%) [00:00<"));
    CHECK_THAT(lines[1], EndsWith("] loss=0.5"));
    CHECK_THAT(lines[4], Matches(R"(Epoch 1/2: 4/4 \(100%\) \[00:00<00:00, [0-9.]+(it/s|s/it)\] loss=0\.25)"));
    CHECK(bar.done() == 4);
  }
  SECTION("the interval throttles: a long one leaves only each epoch's last line") {
    ProgressBar bar({.stream = file.get(), .line_interval = 1h});
    for (std::int64_t e = 0; e < 3; ++e) epoch(bar, e, 100);
    const auto lines = file.lines();
    REQUIRE(lines.size() == 3);
    CHECK_THAT(lines[0], StartsWith("Epoch 0: 100/100 (100%)"));
    CHECK_THAT(lines[2], StartsWith("Epoch 2: 100/100 (100%)"));
  }
  SECTION("without a length it counts steps") {
    ProgressBar bar({.stream = file.get(), .line_interval = 1h});
    bar.on_train_epoch_start(7);
    for (std::int64_t i = 0; i < 12; ++i) bar.on_train_batch_end(i);
    bar.on_train_end();
    REQUIRE(file.lines().size() == 1);
    CHECK_THAT(file.lines()[0], Matches(R"(Epoch 7: 12 \[00:00, \S+\])"));
  }
  SECTION("non-finite metrics and metrics passed with the batch are shown as they are") {
    ProgressBar bar({.stream = file.get(), .line_interval = 1h});
    bar.on_train_epoch_start(0, 1);
    bar.on_log_metrics(
        {{"loss", std::numeric_limits<double>::quiet_NaN()}, {"grad", std::numeric_limits<double>::infinity()}},
        std::nullopt);
    bar.on_train_batch_end(0, {{"neg", -std::numeric_limits<double>::infinity()}, {"acc", 0.123456}});
    bar.on_train_epoch_end(0, 0.5);  // whatever the loop passes along
    CHECK_THAT(file.text(), EndsWith("] acc=0.1235, grad=inf, loss=nan, neg=-inf\n"));
    CHECK(bar.metrics().size() == 4);
  }
  SECTION("validation leaves one line") {
    ProgressBar bar({.stream = file.get(), .line_interval = 1h});
    bar.on_validation_epoch_start(3);
    for (std::int64_t i = 0; i < 3; ++i) bar.on_validation_batch_end(i);
    bar.on_validation_epoch_end(0.9);
    REQUIRE(file.lines().size() == 1);
    CHECK_THAT(file.lines()[0], StartsWith("Validation: 3/3 (100%)"));
  }
  SECTION("a bar off, or on another rank than zero, writes nothing") {
    ProgressBar off({.stream = file.get(), .line_interval = 0ms, .enabled = false});
    epoch(off, 0, 5);
    ProgressBar other({.stream = file.get(), .line_interval = 0ms});
    other.on_after_setup(NotRankZero{});
    CHECK_FALSE(other.is_enabled());
    epoch(other, 0, 5);
    CHECK(file.text().empty());
    other.on_after_setup(RankZero{});
    epoch(other, 1, 1);
    CHECK(file.lines().size() == 2);
  }
}

TEST_CASE("ProgressBar draws a live bar on a terminal", "[callbacks][progress]") {
  Terminal terminal(100);

  SECTION("redrawn in place, as wide as the terminal, ended with a newline") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 0ms, .max_epochs = 2, .ascii = true});
    CHECK(bar.is_bar());  // found by isatty, without Mode::bar
    epoch(bar, 1, 10);
    const auto output = terminal.read();
    CHECK_THAT(output, EndsWith("\n"));
    CHECK(output.find('\n') == output.size() - 1);  // one line on the screen
    const auto shown = frames(output);
    REQUIRE(shown.size() >= 11);  // the start, every step, the end
    CHECK_THAT(shown.front(), StartsWith("Epoch 1/1:   0%|"));
    CHECK_THAT(shown.front(), ContainsSubstring("| 0/10 [00:00<?, ?it/s]"));
    CHECK_THAT(shown[5], StartsWith("Epoch 1/1:  50%|"));
    CHECK_THAT(shown.back(), StartsWith("Epoch 1/1: 100%|####"));
    CHECK_THAT(shown.back(), Matches(R"(Epoch 1/1: 100%\|#+\| 10/10 \[00:00<00:00, \S+, loss=0\.1\])"));
    for (const auto& frame : shown) CHECK(frame.size() <= 99);  // never wraps the last column
    CHECK(shown.back().size() == 99);                           // the bar fills the width
  }
  SECTION("Unicode blocks, metric names counted in columns, cut between code points") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 0ms, .ascii = false});
    bar.on_train_epoch_start(0, 8);
    bar.on_log_metrics({{"验证/损失", 0.25}, {"λ", 3.0}}, 0);
    for (std::int64_t i = 0; i < 3; ++i) bar.on_train_batch_end(i);
    auto shown = frames(terminal.read());
    REQUIRE_FALSE(shown.empty());
    CHECK_THAT(shown.back(), ContainsSubstring("|███"));
    CHECK_THAT(shown.back(), ContainsSubstring("| 3/8 ["));
    CHECK_THAT(shown.back(), EndsWith(", λ=3, 验证/损失=0.25]"));
    CHECK(fabric::detail::display_width(shown.back()) == 99);
    bar.on_train_epoch_end();
    CHECK_THAT(terminal.read(), EndsWith("\n"));

    ProgressBar narrow({.stream = terminal.get(), .refresh_interval = 0ms, .width = 48, .ascii = false});
    narrow.on_train_epoch_start(0, 8);
    for (int cut = 0; cut < 12; ++cut) {  // the name's characters land on the cut in turn
      narrow.on_log_metrics({{std::string(static_cast<std::size_t>(cut), 'x') + "验证/损失", 0.25}}, 0);
      narrow.on_train_batch_end(0);
    }
    shown = frames(terminal.read());
    REQUIRE(shown.size() == 13);
    for (const auto& frame : shown) {
      CHECK(fabric::detail::display_width(frame) <= 47);
      CHECK(valid_utf8(frame));
    }
    // Chinese characters take two columns each, as the terminal draws them.
    STATIC_REQUIRE(fabric::detail::display_width("验证/损失=0.25") == 14);
    STATIC_REQUIRE(fabric::detail::display_width("λ=3") == 3);
    STATIC_REQUIRE(fabric::detail::display_width("e\u0301") == 1);  // a combining accent takes none
    STATIC_REQUIRE(fabric::detail::truncate_display("a验证", 2) == "a");
    STATIC_REQUIRE(fabric::detail::truncate_display("a验证", 3) == "a验");
    STATIC_REQUIRE(fabric::detail::truncate_display("a验证", 9) == "a验证");
  }
  SECTION("a wider line when the metrics fit") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 0ms, .width = 120, .ascii = true});
    bar.on_train_epoch_start(0, 2);
    bar.on_log_metrics({{"验证/损失", 0.25}}, 0);
    bar.on_train_batch_end(0);
    const auto shown = frames(terminal.read());
    CHECK_THAT(shown.back(), EndsWith(", 验证/损失=0.25]"));
    CHECK(fabric::detail::display_width(shown.back()) == 119);
  }
  SECTION("metrics too long for the line are cut, not the bar") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 0ms, .ascii = true});
    bar.on_train_epoch_start(0, 2);
    bar.on_log_metrics({{std::string(200, 'm'), 1.0}}, 0);
    bar.on_train_batch_end(0);
    const auto shown = frames(terminal.read());
    CHECK_THAT(shown.back(), StartsWith("Epoch 0:  50%|#####     | 1/2 [00:00<00:00, "));  // 10 cells
    CHECK(shown.back().size() == 99);
    CHECK_THAT(shown.back(), EndsWith("mmmm"));
  }
  SECTION("the refresh interval throttles the redraws") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 1h, .ascii = true});
    epoch(bar, 0, 1000);
    const auto shown = frames(terminal.read());
    REQUIRE(shown.size() == 2);  // at the start and at the end
    CHECK_THAT(shown[1], ContainsSubstring("| 1000/1000 ["));
  }
  SECTION("a validation bar is cleared when it ends") {
    ProgressBar bar({.stream = terminal.get(), .refresh_interval = 0ms, .ascii = true});
    bar.on_validation_epoch_start(2);
    bar.on_validation_batch_end(0);
    bar.on_validation_batch_end(1);
    bar.on_validation_epoch_end();
    const auto output = terminal.read();
    CHECK_THAT(output, ContainsSubstring("Validation: 100%|"));
    CHECK_THAT(output, EndsWith("\r\x1b[K"));
    CHECK(output.find('\n') == std::string::npos);
  }
  SECTION("Mode::lines on a terminal writes lines; a dumb terminal gets lines too") {
    ProgressBar lines({.stream = terminal.get(), .mode = ProgressBar::Mode::lines, .line_interval = 1h});
    CHECK_FALSE(lines.is_bar());
    epoch(lines, 0, 3);
    CHECK_THAT(terminal.read(), Matches(R"(Epoch 0: 3/3 \(100%\) \[00:00<00:00, \S+\] loss=0\.3333\n)"));
    const char* term = std::getenv("TERM");
    const std::string saved = term != nullptr ? term : "";
    ::setenv("TERM", "dumb", 1);
    ProgressBar dumb({.stream = terminal.get()});
    if (term != nullptr) {
      ::setenv("TERM", saved.c_str(), 1);
    } else {
      ::unsetenv("TERM");
    }
    CHECK_FALSE(dumb.is_bar());
  }
  SECTION("a bar destroyed mid-epoch ends its line; one moved from does not") {
    {
      ProgressBar first({.stream = terminal.get(), .refresh_interval = 1h, .ascii = true});
      first.on_train_epoch_start(0, 5);
      ProgressBar second(std::move(first));
      second.on_train_batch_end(0);
    }
    const auto output = terminal.read();
    CHECK(std::count(output.begin(), output.end(), '\n') == 1);
    CHECK_THAT(output, EndsWith("\n"));
  }
}

TEST_CASE("ProgressBar reacts to Fabric's hooks", "[callbacks][progress]") {
  FileStream file;
  std::tuple<ProgressBar> callbacks(ProgressBar({.stream = file.get(), .line_interval = 1h}));
  namespace hooks = fabric::hooks;
  const std::optional<std::int64_t> step = 3;
  std::int64_t epoch = 2, batches = 2;
  double loss = 0.75;
  const RankZero rank_zero;
  fabric::detail::dispatch<hooks::on_after_setup_hook>(callbacks, rank_zero);
  fabric::detail::dispatch<hooks::on_train_epoch_start_hook>(callbacks, epoch, batches);
  fabric::Metrics metrics{{"loss", loss}};
  fabric::detail::dispatch<hooks::on_log_metrics_hook>(callbacks, metrics, step);
  for (std::int64_t i = 0; i < batches; ++i) fabric::detail::dispatch<hooks::on_train_batch_end_hook>(callbacks, i);
  fabric::detail::dispatch<hooks::on_train_epoch_end_hook>(callbacks, epoch, loss);
  REQUIRE(file.lines().size() == 1);
  CHECK_THAT(file.lines()[0], Matches(R"(Epoch 2: 2/2 \(100%\) \[00:00<00:00, \S+\] loss=0\.75)"));
  STATIC_REQUIRE(hooks::on_log_metrics_hook::declared_by<ProgressBar>());
  STATIC_REQUIRE_FALSE(hooks::on_before_backward_hook::declared_by<ProgressBar>());
}

TEST_CASE("ProgressBar rejects bad settings", "[callbacks][progress]") {
  CHECK_THROWS_WITH(ProgressBar({.stream = nullptr}), ContainsSubstring("expected a stream to write to"));
  CHECK_THROWS_WITH(ProgressBar({.refresh_interval = -1ms}), ContainsSubstring("expected intervals >= 0 ms"));
  CHECK_THROWS_WITH(ProgressBar({.width = 0}), ContainsSubstring("expected a width of at least 1 column, found 0"));
  FileStream file;
  ProgressBar bar({.stream = file.get()});
  CHECK_THROWS_WITH(bar.on_train_epoch_start(0, -1),
                    ContainsSubstring("expected the number of batches to be >= 0, found -1"));
  CHECK_THROWS_AS(bar.on_train_epoch_start(0, -1), fabric::Error);
}

TEST_CASE("ProgressBar's time and rate formats follow tqdm", "[callbacks][progress]") {
  using fabric::detail::format_interval;
  using fabric::detail::format_rate;
  CHECK(format_interval(0) == "00:00");
  CHECK(format_interval(75.9) == "01:15");
  CHECK(format_interval(3 * 3600 + 61) == "3:01:01");
  CHECK(format_interval(-1) == "?");
  CHECK(format_interval(std::numeric_limits<double>::infinity()) == "?");
  CHECK(format_rate(35.214) == "35.21it/s");
  CHECK(format_rate(0.4) == "2.50s/it");
  CHECK(format_rate(0) == "?it/s");
}

}  // namespace
