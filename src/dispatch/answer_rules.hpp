#pragma once
// The rules of a handler's answer shared by the worker protocol
// (worker_handler.cpp) and the http plugin's JSON answers (plugins/http),
// which sits behind the plugin ABI: header-only, rapidjson alone.
#include <rapidjson/document.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace er::answer {

inline constexpr size_t kMaxReasonBytes = 64;
inline constexpr size_t kMaxDetailBytes = 1024;
inline constexpr uint64_t kMaxDelayMs = 24ULL * 3600 * 1000;  // a longer delay_ms is cut to this

// A reason code: 1 to 64 of [A-Za-z0-9_.-].
inline bool valid_reason(std::string_view r) {
  if (r.empty() || r.size() > kMaxReasonBytes) return false;
  return std::all_of(r.begin(), r.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
           c == '-';
  });
}

inline const char* json_type_name(const rapidjson::Value& v) {
  switch (v.GetType()) {
    case rapidjson::kNullType: return "null";
    case rapidjson::kFalseType:
    case rapidjson::kTrueType: return "a boolean";
    case rapidjson::kObjectType: return "an object";
    case rapidjson::kArrayType: return "an array";
    case rapidjson::kStringType: return "a string";
    case rapidjson::kNumberType: return "a number";
  }
  return "?";
}

// `s` cut to at most `max` bytes, not inside a UTF-8 sequence.
inline std::string_view cut_utf8(std::string_view s, size_t max) {
  if (s.size() <= max) return s;
  size_t n = max;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;
  return s.substr(0, n);
}

}  // namespace er::answer
