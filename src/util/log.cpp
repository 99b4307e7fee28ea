#include "util/log.hpp"

#include "util/time.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>

namespace er::log {

namespace {
std::atomic<int> g_level{static_cast<int>(Level::Info)};
std::atomic<bool> g_json{false};

// Length of the valid UTF-8 sequence starting at p, or 0 if it is not one.
size_t utf8_sequence(const unsigned char* p, size_t left) {
  unsigned char c = p[0];
  size_t n = c < 0xC2 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF5 ? 4 : 0;
  if (n == 0 || n > left) return 0;
  for (size_t i = 1; i < n; ++i)
    if ((p[i] & 0xC0) != 0x80) return 0;
  if (c == 0xE0 && p[1] < 0xA0) return 0;  // overlong
  if (c == 0xED && p[1] > 0x9F) return 0;  // surrogates
  if (c == 0xF0 && p[1] < 0x90) return 0;  // overlong
  if (c == 0xF4 && p[1] > 0x8F) return 0;  // above U+10FFFF
  return n;
}

// JSON must be valid UTF-8: handler output may not be, so bad bytes become U+FFFD.
void append_json_string(std::string& out, std::string_view v) {
  out.push_back('"');
  const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size(); ++i) {
    char ch = v[i];
    auto c = static_cast<unsigned char>(ch);
    if (c >= 0x80) {
      size_t n = utf8_sequence(bytes + i, v.size() - i);
      if (n == 0) {
        out += "\xEF\xBF\xBD";
      } else {
        out.append(v.data() + i, n);
        i += n - 1;
      }
      continue;
    }
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(ch);
        }
    }
  }
  out.push_back('"');
}

bool is_number_field(std::string_view key, std::string_view v) {
  if (v.empty() || v.size() > 18) return false;
  if (key != "duration_ms" && key != "attempt" && key != "in_flight" && key != "queues" && key != "retry_in_ms")
    return false;
  for (char c : v)
    if (c < '0' || c > '9') return false;
  return true;
}

const char* level_name(Level l) {
  switch (l) {
    case Level::Debug: return "debug";
    case Level::Info: return "info";
    case Level::Warn: return "warn";
    case Level::Error: return "error";
  }
  return "?";
}

// Quote values that would break key=value parsing.
void append_value(std::string& out, std::string_view v) {
  bool plain = !v.empty();
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20) { plain = false; break; }
  }
  if (plain) { out.append(v); return; }
  out.push_back('"');
  for (char c : v) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(c));
          out += buf;
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
}
}  // namespace

void set_format(config::LogFormat f) { g_json.store(f == config::LogFormat::Json, std::memory_order_relaxed); }

void set_level(Level l) { g_level.store(static_cast<int>(l), std::memory_order_relaxed); }
bool enabled(Level l) { return static_cast<int>(l) >= g_level.load(std::memory_order_relaxed); }

void write(Level l, std::string_view msg, std::initializer_list<Field> fields) {
  thread_local std::string line;
  line.clear();
  char ts_buf[40];
  std::string_view ts(ts_buf, util::format_iso8601(std::chrono::system_clock::now(), ts_buf));
  if (g_json.load(std::memory_order_relaxed)) {
    line += "{\"ts\":\"";
    line += ts;
    line += "\",\"level\":\"";
    line += level_name(l);
    line += "\",\"msg\":";
    append_json_string(line, msg);
    for (const auto& f : fields) {
      if (f.second.empty()) continue;
      line += ',';
      append_json_string(line, f.first);
      line += ':';
      if (is_number_field(f.first, f.second)) {
        line.append(f.second);
      } else {
        append_json_string(line, f.second);
      }
    }
    line += '}';
  } else {
    line += ts;
    line += ' ';
    line += level_name(l);
    line += ' ';
    append_value(line, msg);
    for (const auto& f : fields) {
      if (f.second.empty()) continue;
      line += ' ';
      line.append(f.first);
      line += '=';
      append_value(line, f.second);
    }
  }
  line += '\n';
  // One write per record keeps lines whole when threads log at once.
  const char* p = line.data();
  size_t left = line.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

std::string mask_url(std::string_view url) {
  std::string out(url);
  auto scheme = out.find("://");
  if (scheme == std::string::npos) return out;
  auto start = scheme + 3;
  // The last '@' ends the user info: an unencoded '@' in the password must
  // not end the masking early. (An '@' in the vhost over-masks: harmless.)
  auto at = out.rfind('@');
  if (at == std::string::npos || at < start) return out;
  auto colon = out.find(':', start);
  if (colon == std::string::npos || colon > at) return out;
  out.replace(colon + 1, at - colon - 1, "****");
  return out;
}

}  // namespace er::log
