#pragma once
// Decodes the JSON event envelope written by the Python (snake_case) and
// TypeScript (camelCase) services.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace er::event {

enum class DecodeStatus {
  Ok,
  InvalidJson,      // not JSON, or not valid UTF-8
  NotObject,        // JSON, but the top level is not an object
  NoEventType,      // neither the envelope nor the routing key names a type
  FieldTooLong,     // an envelope field is longer than its cap (below)
};

// Caps on the envelope fields the daemon reads: they become headers, log
// fields, environment variables and routing keys. event_type: 255, the AMQP
// shortstr limit of a routing key; the others 256. `version` is read only as
// an integer; a string there is ignored, whatever its length.
inline constexpr size_t kMaxEventTypeBytes = 255;
inline constexpr size_t kMaxFieldBytes = 256;

// Stable reason code for the dead-letter header (x-death-reason).
const char* reason_code(DecodeStatus s);

struct Envelope {
  std::string event_id;
  std::string event_type;
  std::string aggregate_id;
  std::string aggregate_type;
  std::string correlation_id;
  std::string timestamp;
  int64_t version = 0;
  bool type_from_routing_key = false;

  void clear();
};

// Parses `body` (top-level fields only are kept; the payload is validated as
// JSON but not copied). When the envelope has no event type, it is taken from
// `routing_key` (if non-empty). On failure `detail` says why (e.g. the JSON
// error and its byte offset). A field over its cap is FieldTooLong, with a
// detail naming the field (as spelled) and its length and quoting at most a
// short escaped prefix; any occurrence counts, even a duplicate key. `out` is reused across calls to avoid allocations.
DecodeStatus decode(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                    std::string& detail);

}  // namespace er::event
