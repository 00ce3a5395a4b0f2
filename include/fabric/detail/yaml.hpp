#pragma once
// Writing YAML for the loggers' hparams.yaml. A key or value is written plain where YAML reads it back as
// written (a number, or a word that is not one of YAML's booleans and nulls), as Lightning's files look;
// anything else is a double-quoted scalar, so that no text (a colon, a '#', a leading '-', a newline,
// "yes") can change what the file means. Torch-free.

#include <fmt/format.h>

#include <cstddef>
#include <map>
#include <ostream>
#include <string>
#include <string_view>

namespace fabric::detail {

/// Returns text as a YAML double-quoted scalar: `"`, `\` and the control characters escaped (\n, \t, \r,
/// \xNN), everything else (UTF-8 included) as it is.
inline std::string yaml_quote(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out += '"';
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (u < 0x20 || u == 0x7f) {
          out += fmt::format("\\x{:02x}", u);
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

/// True when YAML (1.1, as PyYAML reads it, and 1.2) reads text written plain as exactly this text or, with
/// numbers, as the number it spells: a decimal number without a leading zero (YAML 1.1 reads 010 as 8), or
/// a word of letters, digits and `_ . / -` that starts with a letter or `_` and is not a boolean or null
/// (true, no, on, null, ...).
inline bool yaml_plain_safe(std::string_view text, bool numbers = true) {
  if (text.empty()) return false;
  const auto digit = [](char c) { return c >= '0' && c <= '9'; };
  // A number: [+-] digits [. digits] [e [+-] digits], with a digit somewhere before the exponent.
  std::size_t i = 0;
  if (text[i] == '+' || text[i] == '-') ++i;
  const bool leading_zero = i + 1 < text.size() && text[i] == '0' && digit(text[i + 1]);
  std::size_t digits = 0;
  while (i < text.size() && digit(text[i])) ++i, ++digits;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && digit(text[i])) ++i, ++digits;
  }
  if (digits > 0 && i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    std::size_t j = i + 1;
    if (j < text.size() && (text[j] == '+' || text[j] == '-')) ++j;
    const std::size_t start = j;
    while (j < text.size() && digit(text[j])) ++j;
    if (j > start) i = j;
  }
  if (digits > 0 && i == text.size()) return numbers && !leading_zero;
  // A word.
  const char first = text.front();
  if (!((first >= 'a' && first <= 'z') || (first >= 'A' && first <= 'Z') || first == '_')) return false;
  for (const char c : text) {
    const bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || digit(c) || c == '_' || c == '.' || c == '/' || c == '-';
    if (!ok) return false;
  }
  std::string lower(text);
  for (auto& c : lower) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  for (const char* special : {"true", "false", "yes", "no", "on", "off", "y", "n", "null"}) {
    if (lower == special) return false;
  }
  return true;
}

/// Returns text as YAML reads it back: plain where that is safe (yaml_plain_safe), else double-quoted. Keys
/// pass numbers = false: a name that looks like a number stays a string.
inline std::string yaml_scalar(std::string_view text, bool numbers = true) {
  return yaml_plain_safe(text, numbers) ? std::string(text) : yaml_quote(text);
}

/// Writes a map of names to text as a YAML mapping, one entry per line (an empty map as `{}`).
inline void write_yaml_mapping(std::ostream& out, const std::map<std::string, std::string>& entries) {
  if (entries.empty()) {
    out << "{}\n";
    return;
  }
  for (const auto& [key, value] : entries) out << yaml_scalar(key, false) << ": " << yaml_scalar(value) << '\n';
}

}  // namespace fabric::detail
