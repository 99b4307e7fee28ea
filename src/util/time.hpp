#pragma once
// ISO 8601 UTC timestamps with milliseconds (2026-11-28T03:40:00.123Z): the
// one format used by logs, failure headers and published events.
#include <chrono>
#include <cstddef>
#include <string>

namespace er::util {

// Writes the timestamp into `buf` (no allocation, for the logger); returns its length.
size_t format_iso8601(std::chrono::system_clock::time_point t, char (&buf)[40]);

std::string iso8601_utc_ms(std::chrono::system_clock::time_point t);
inline std::string now_iso8601() { return iso8601_utc_ms(std::chrono::system_clock::now()); }

}  // namespace er::util
