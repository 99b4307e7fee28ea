#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>

#include "config/config.hpp"

namespace er::config {

namespace {

bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Index of the '}' closing a "${" whose body starts at `from`; nested "${...}"
// in a default are skipped so `${A:-${B}}` works.
size_t find_close(const std::string& s, size_t from) {
  int depth = 0;
  for (size_t i = from; i < s.size(); ++i) {
    if (s[i] == '$' && i + 1 < s.size() && (s[i + 1] == '$')) {
      ++i;
    } else if (s[i] == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      ++depth;
      ++i;
    } else if (s[i] == '}') {
      if (depth == 0) return i;
      --depth;
    }
  }
  return std::string::npos;
}

// `base`: where `text` starts in the whole value, so nested defaults report
// positions in the value the user wrote.
std::string substitute(const std::string& text, size_t base) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c != '$' || i + 1 >= text.size()) {
      out += c;
      continue;
    }
    if (text[i + 1] == '$') {
      out += '$';
      ++i;
      continue;
    }
    if (text[i + 1] != '{') {
      out += c;  // a lone '$' is literal, so "pa$word" needs no escaping
      continue;
    }
    size_t body = i + 2;
    size_t close = find_close(text, body);
    // Errors give the position, never the text: the value may hold a secret.
    if (close == std::string::npos)
      throw std::invalid_argument("unterminated '${' at character " + std::to_string(base + i + 1) +
                                  " of the value (missing '}')");
    size_t p = body;
    while (p < close && is_name_char(text[p])) ++p;
    std::string name = text.substr(body, p - body);
    if (name.empty() || !is_name_start(name[0]))
      throw std::invalid_argument("invalid environment variable reference at character " +
                                  std::to_string(base + i + 1) + " of the value (use ${VAR} or ${VAR:-default})");
    const char* value = std::getenv(name.c_str());
    if (p == close) {
      if (!value)
        throw std::invalid_argument("environment variable " + name +
                                    " is not set and has no default");
      out += value;
    } else if (text.compare(p, 2, ":-") == 0) {
      if (value && *value)
        out += value;
      else
        out += substitute(text.substr(p + 2, close - p - 2), base + p + 2);
    } else {
      throw std::invalid_argument("invalid environment variable reference at character " +
                                  std::to_string(base + i + 1) + " of the value (use ${VAR} or ${VAR:-default})");
    }
    i = close;
  }
  return out;
}

}  // namespace

std::string substitute_env(const std::string& text) { return substitute(text, 0); }

Duration parse_duration(const std::string& text) {
  // Cap well below the int64 nanosecond range so callers can add durations to
  // clock readings without overflow.
  constexpr int64_t kMaxMs = int64_t{1000000} * 3600 * 1000;  // 1000000h
  const std::string quoted = "'" + text + "'";
  if (text.empty()) throw std::invalid_argument("empty duration");
  if (text[0] == '-') throw std::invalid_argument("negative duration " + quoted);

  size_t p = 0;
  int64_t whole = 0;
  bool overflow = false;
  while (p < text.size() && std::isdigit(static_cast<unsigned char>(text[p]))) {
    if (whole > (std::numeric_limits<int64_t>::max() - 9) / 10) overflow = true;
    if (!overflow) whole = whole * 10 + (text[p] - '0');
    ++p;
  }
  if (p == 0)
    throw std::invalid_argument("invalid duration " + quoted +
                                " (expected e.g. 500ms, 30s, 5m, 1h or seconds)");
  // Fraction kept as digits so "1.5" is exact; at most 9 digits matter.
  int64_t frac = 0, frac_scale = 1;
  if (p < text.size() && text[p] == '.') {
    ++p;
    size_t start = p;
    while (p < text.size() && std::isdigit(static_cast<unsigned char>(text[p]))) {
      if (frac_scale < 1000000000) {
        frac = frac * 10 + (text[p] - '0');
        frac_scale *= 10;
      } else if (text[p] != '0') {
        throw std::invalid_argument("duration " + quoted + " is finer than a millisecond");
      }
      ++p;
    }
    if (p == start)
      throw std::invalid_argument("invalid duration " + quoted + ": digits expected after '.'");
  }
  std::string unit = text.substr(p);
  int64_t ms_per_unit;
  if (unit.empty() || unit == "s")
    ms_per_unit = 1000;
  else if (unit == "ms")
    ms_per_unit = 1;
  else if (unit == "m")
    ms_per_unit = 60 * 1000;
  else if (unit == "h")
    ms_per_unit = 3600 * 1000;
  else
    throw std::invalid_argument("invalid duration " + quoted + ": unknown unit '" + unit +
                                "' (use ms, s, m or h)");

  if (overflow || whole > kMaxMs / ms_per_unit)
    throw std::invalid_argument("duration " + quoted + " is too large (max 1000000h)");
  int64_t frac_ms_num = frac * ms_per_unit;  // < 1e9 * 3.6e6, fits int64
  if (frac_ms_num % frac_scale != 0)
    throw std::invalid_argument("duration " + quoted + " is finer than a millisecond");
  int64_t ms = whole * ms_per_unit + frac_ms_num / frac_scale;
  if (ms > kMaxMs)
    throw std::invalid_argument("duration " + quoted + " is too large (max 1000000h)");
  return Duration(ms);
}

}  // namespace er::config
