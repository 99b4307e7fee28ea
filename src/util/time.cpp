#include "util/time.hpp"

#include <cstdio>
#include <ctime>

namespace er::util {

size_t format_iso8601(std::chrono::system_clock::time_point t, char (&buf)[40]) {
  using namespace std::chrono;
  auto ms = duration_cast<milliseconds>(t.time_since_epoch()).count();
  auto secs = static_cast<time_t>(ms / 1000);
  int frac = static_cast<int>(ms % 1000);
  if (frac < 0) {  // before 1970
    frac += 1000;
    --secs;
  }
  std::tm tm{};
  gmtime_r(&secs, &tm);
  int n = std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                        tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, frac);
  return n < 0 ? 0 : static_cast<size_t>(n) < sizeof buf ? static_cast<size_t>(n) : sizeof buf - 1;
}

std::string iso8601_utc_ms(std::chrono::system_clock::time_point t) {
  char buf[40];
  return std::string(buf, format_iso8601(t, buf));
}

}  // namespace er::util
