#include "consume/intake.hpp"

#include <algorithm>

namespace er::consume {

Decision decide(const IntakeInput& in, const config::QueueConfig& q, dispatch::QueueRouter& router,
                const event::SchemaSet* schemas, const std::function<bool(std::string_view)>& seen,
                event::Envelope& envelope, std::string& detail) {
  Decision d;
  d.kind = Decision::Kind::DeadLetter;
  // A body kept only in part (over the limit in force when it arrived, which
  // a reload may have raised since) is never taken for the whole.
  if (in.body_size > q.max_message_bytes || in.body.len < in.body_size) {
    envelope.clear();
    // Only the first max_message_bytes were kept: the copy carries those.
    detail = "body of " + std::to_string(in.body_size) + " bytes exceeds max_message_bytes " +
             std::to_string(std::min<uint64_t>(q.max_message_bytes, in.body.len)) + "; this copy keeps its first " +
             std::to_string(in.body.len) + " bytes";
    d.reason = "too_large";
    return d;
  }
  const char* body = static_cast<const char*>(in.body.bytes);
  // With schemas, one parse both decodes and validates.
  bool valid = true;
  auto status = schemas ? schemas->decode_validate(body, in.body.len, in.routing_key, envelope, detail, valid)
                        : event::decode(body, in.body.len, in.routing_key, envelope, detail);
  if (status != event::DecodeStatus::Ok) {
    d.reason = event::reason_code(status);
    return d;
  }
  if (!valid) {
    d.reason = "schema_violation";
    return d;
  }
  if (q.dedupe_ttl.count() > 0 && !envelope.event_id.empty() && seen && seen(envelope.event_id)) {
    d.kind = Decision::Kind::Duplicate;
    return d;
  }
  d.slot = router.route(envelope.event_type);
  if (d.slot) {
    d.kind = Decision::Kind::Handle;
    return d;
  }
  if (q.unhandled == config::Unhandled::Ack) {
    d.kind = Decision::Kind::UnhandledAck;
    return d;
  }
  detail = "no handler of queue '" + q.name + "' takes event type '" + envelope.event_type + "'";
  d.reason = "unhandled";
  return d;
}

}  // namespace er::consume
