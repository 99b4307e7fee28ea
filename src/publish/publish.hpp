#pragma once

// `event-router publish`: publishes events (one JSON object, or NDJSON) to the
// config's exchange with publisher confirms, filling in the envelope fields a
// hand-written event usually lacks. For operators and tests: the same routing
// and schemas as the daemon, so what it accepts is what the daemon handles.
#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "util/time.hpp"

namespace er::publish {

// A random UUID (version 4, RFC 4122 variant) from std::random_device
// (/dev/urandom with libstdc++): "xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx".
std::string uuid_v4();

// Formats 16 bytes as a version-4 UUID (sets the version and variant bits).
std::string uuid_v4_from_bytes(const uint8_t (&b)[16]);

// ISO 8601 in UTC with milliseconds: "2024-05-01T12:34:56.789Z".

// An event that cannot be published; what() says why (without the line number).
class InvalidEvent : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct FillOptions {
  std::function<std::string()> new_id = uuid_v4;              // for a missing event id
  std::function<std::string()> now = [] { return util::now_iso8601(); };
};

// One event, ready to publish.
struct Prepared {
  std::string body;             // the JSON to publish (the input as is when nothing was filled)
  std::string event_id;         // as the daemon will read it (message_id)
  std::string event_type;       // the envelope's, else the routing key
  std::string correlation_id;   // empty = none
  std::string routing_key;
  bool camel = false;           // camelCase envelope (eventType / eventId keys)
  std::vector<std::string> filled;  // keys added: "event_id"/"eventId", "timestamp", "version"
};

// Parses one JSON object (RapidJSON DOM), adds the missing envelope fields in
// its own style and re-serializes it (other fields kept, in their order; the
// added ones come first):
//   event_id / eventId  a new UUID v4 when absent or null. camelCase (eventId)
//                       when the object has an eventType or eventId key.
//   timestamp           now (ISO 8601 UTC, ms) when absent or null
//   version             1 when absent or null
// An id that is present but not a non-empty string is an error (it would not
// be usable as the message_id). The routing key is `routing_key` when given,
// else the envelope's event type; neither is an error. Throws InvalidEvent.
Prepared prepare(std::string_view json, std::string_view routing_key, const FillOptions& opts = {});

// Splits the input into events: the whole input when it is one JSON value
// (a pretty-printed object may span lines), else one per line (NDJSON; blank
// lines skipped). Each with its 1-based line number.
struct InputLine {
  size_t line = 0;
  std::string text;
};
std::vector<InputLine> split_input(std::string_view input);

// The subcommand. Exit status: 0 every event confirmed, 1 failure, 2 usage.
int main(int argc, char** argv);

}  // namespace er::publish
