#pragma once
// Follow-up events a handler emits with its ack (docs/handlers.md#emit): the
// daemon turns each emit object into a full envelope with a deterministic id,
// checks it like intake checks an event, and the settler publishes them all
// before it acks the triggering event. What a handler emits is untrusted.
#include <amqp.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"

namespace er::event {
class SchemaSet;
}

namespace er::settle {

// Caps on one verdict's emits (the exec fd and the worker protocol share them).
inline constexpr size_t kMaxEmits = 1000;
inline constexpr size_t kMaxEmitTotalBytes = 16 * 1024 * 1024;  // every emit object's text together
inline constexpr size_t kMaxEmitDepth = 64;                     // nesting, as the envelope decoder allows

// Whether JSON text nests objects/arrays deeper than `max_depth` (a string-
// aware scan, no parse): checked before anything recursive touches it.
bool json_too_deep(std::string_view text, size_t max_depth);

// The event that triggered the emits.
struct EmitTrigger {
  std::string_view event_id;        // may be empty (an event without an id)
  std::string_view correlation_id;  // may be empty
  std::string_view body;            // the id seed when there is no event id
  std::string_view handler;
};

struct EmitOptions {
  config::EmitStyle style = config::EmitStyle::Snake;
  const event::SchemaSet* schemas = nullptr;  // null: no validation
  size_t max_event_bytes = 1024 * 1024;       // each envelope (the triggering queue's max_message_bytes)
  std::string timestamp;                      // empty: now
};

struct EmittedEvent {
  std::string body;  // the envelope, compact JSON
  std::string event_id;
  std::string event_type;
  std::string routing_key;
  std::string correlation_id;  // empty: none
  // content_type application/json, persistent, message_id, type, correlation_id
  // (when it is a shortstr), timestamp `unix_seconds`. Points into this event.
  amqp_basic_properties_t properties(uint64_t unix_seconds) const;
};

// UUID version 5 (RFC 9562, SHA-1) in the namespace kEmitNamespace over the
// name netstring(trigger) + netstring(handler) + decimal index, where
// netstring(s) = "<byte length>:" + s + ",". `trigger` is the triggering event
// id, or "sha256:<hex of its body>" when it has none.
inline constexpr const char* kEmitNamespace = "d86dca4f-d02b-4b6f-8971-eea59d3c94c9";
std::string emit_event_id(std::string_view trigger, std::string_view handler, size_t index);

// All or nothing: true with one event per emit object, in order; or false
// with `error` naming the first bad one (index, type when known, and why) and
// `out` empty.
bool build_emits(const std::vector<std::string>& emits, const EmitTrigger& trigger, const EmitOptions& opts,
                 std::vector<EmittedEvent>& out, std::string& error);

}  // namespace er::settle
