#pragma once
// fabric::Error, the one exception type the library throws for misuse and bad input. Torch-free.

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace fabric {

/// Reports a misuse or bad input: what was expected, what was found, and how to fix it.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error("fabric: " + message) {}
};

namespace detail {

/// Throws fabric::Error with an fmt-formatted message.
template <class... Args>
[[noreturn]] void raise(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

/// Returns the first line of an exception message (LibTorch appends backtraces).
inline std::string first_line(std::string text) {
  if (auto nl = text.find('\n'); nl != std::string::npos) text.resize(nl);
  return text;
}

}  // namespace detail
}  // namespace fabric
