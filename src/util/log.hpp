#pragma once
// One record per line on stderr: time, level, message, then key=value fields.
// Thread-safe: each record is a single write().
#include <string>
#include <string_view>
#include <initializer_list>
#include <utility>

#include "config/config.hpp"

namespace er::log {

using Level = config::LogLevel;
using Field = std::pair<std::string_view, std::string_view>;

void set_level(Level l);
// text: `time level msg key=value...`; json: one object per line with ts,
// level, msg and the fields (journald and container log collectors read it).
void set_format(config::LogFormat f);
bool enabled(Level l);

void write(Level l, std::string_view msg, std::initializer_list<Field> fields = {});

inline void debug(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Debug)) write(Level::Debug, m, f); }
inline void info(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Info)) write(Level::Info, m, f); }
inline void warn(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Warn)) write(Level::Warn, m, f); }
inline void error(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Error)) write(Level::Error, m, f); }

// Replaces the password in amqp://user:pass@host/... with "****".
std::string mask_url(std::string_view url);

}  // namespace er::log
