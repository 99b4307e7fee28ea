#pragma once
// Intake: turns one delivery into a decision (handle it with this handler,
// dead-letter it with this reason, ack it as a duplicate or as unhandled).
// Pure apart from the dedupe lookup it is handed; one SAX pass over the body
// decodes the envelope and, with schemas, validates it.
#include <amqp.h>

#include <functional>
#include <string>
#include <string_view>

#include "config/config.hpp"
#include "dispatch/router.hpp"
#include "event/envelope.hpp"
#include "event/schema.hpp"

namespace er::consume {

struct Decision {
  enum class Kind { Handle, DeadLetter, Duplicate, UnhandledAck };
  Kind kind = Kind::Handle;
  std::string_view reason;               // DeadLetter: stable reason code
  dispatch::HandlerSlot* slot = nullptr; // Handle
};

struct IntakeInput {
  amqp_bytes_t body = amqp_empty_bytes;  // possibly cut at max_message_bytes
  uint64_t body_size = 0;                // as announced by the broker
  std::string_view routing_key;          // as first published
};

// `seen(event_id)` says whether the event already succeeded (dedupe). Fills
// `envelope`; a DeadLetter decision's detail goes to `detail`.
Decision decide(const IntakeInput& in, const config::QueueConfig& q, dispatch::QueueRouter& router,
                const event::SchemaSet* schemas, const std::function<bool(std::string_view)>& seen,
                event::Envelope& envelope, std::string& detail);

}  // namespace er::consume
