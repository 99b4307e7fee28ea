#pragma once
// Settling an event: the dead-letter and retry copies the daemon publishes on
// an event's behalf, and publisher-confirm bookkeeping. The original is acked
// only after the broker confirmed the copy.
//
// The original comes from an untrusted publisher, so a copy carries only
// what the daemon decides (see CopyProperties) and the daemon's bookkeeping
// headers are signed (settle/signer.hpp) and believed only when they verify.
#include <amqp.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "settle/signer.hpp"

namespace er::settle {

struct DeadLetterInfo {
  std::string_view reason;        // stable code: handler_failed, invalid_json, unhandled...
  std::string_view detail;        // human text
  std::string_view handler;       // may be empty (decode errors, unhandled)
  std::string_view queue;         // the queue it was consumed from
  std::string_view exchange;      // as delivered
  std::string_view routing_key;   // as delivered
  uint32_t attempts = 1;          // 1..1000000: read_history() refuses a count outside that range
  // Leave out the original's headers and content properties from the start
  // (the broker refused the copy that had them); x-headers-dropped says so.
  bool plain = false;
};

// Caps (bytes) on the texts the daemon adds; a longer text is cut at a UTF-8
// boundary and ends with "…" (3 bytes), so the cut shows.
inline constexpr size_t kMaxDetailBytes = 2048;         // x-death-detail; the detail part of x-last-error
inline constexpr size_t kMaxFallbackDetailBytes = 256;  // the same, in the last fallback (below)
inline constexpr size_t kMaxNameBytes = 255;            // reason, handler, queue, exchange, routing key (AMQP shortstr)
std::string cap_text(std::string_view text, size_t max_bytes);

// rabbitmq-c encodes a content header into a frame_max buffer after 7 bytes of
// frame header, 12 of class/weight/body size, and keeps 1 for the frame end.
inline constexpr size_t kHeaderFrameOverhead = 20;
inline constexpr size_t kMinFrameMax = 4096;  // AMQP_FRAME_MIN_SIZE: the smallest frame_max a broker may set

// Properties for a copy the daemon publishes on the event's behalf: the
// dead-letter copy, or the retry copy that waits in a delay queue. The body
// is published unchanged. Carried from the original (each only when set and
// at most 255 bytes, i.e. encodable as a shortstr): content_type,
// content_encoding, priority, correlation_id, reply_to (not the exact
// "amq.rabbitmq.reply-to", which makes the broker close our channel),
// message_id, timestamp, type, app_id. Never carried: user_id (the broker
// refuses another user's with 406), expiration (a retry copy gets its own),
// cluster_id. delivery_mode is always 2 (the copy survives a broker restart).
//
// The original's application headers are carried except what the broker acts
// on or what we own: CC and BCC (any letter case), every header starting with
// "x-"/"X-" (x-death, x-delay, our own bookkeeping, which is re-added), and
// any header rabbitmq-c could not encode faithfully or RabbitMQ cannot parse
// (a key over 255 bytes at any depth, nesting deeper than 64, a U64 value).
//
// Frame size: rabbitmq-c 0.11 writes basic.publish before it encodes the
// header, so a header that does not encode leaves half a publish on the wire.
// The signed constructors therefore try, in order, until one fits frame_max:
//   1. the original headers + ours, detail capped at kMaxDetailBytes;
//   2. without the original headers, plus x-headers-dropped
//      ("original headers did not fit in a frame (N bytes)", N = their encoded size);
//   3. as 2, with detail capped at kMaxFallbackDetailBytes.
// Step 3 always fits kMinFrameMax (tested with every input at its maximum);
// fitted() says whether the result fits, and when it is false (frame_max under
// 4096) the copy must not be published.
//
// The copy points into `original` (and `info` only while constructing): keep
// the original message alive until the copy is published.
class CopyProperties {
 public:
  // The signed dead-letter copy: x-death-reason, x-death-detail,
  // x-death-handler (when set), x-attempts, x-first/last-failed-at,
  // x-original-exchange/routing-key/queue, x-er-sig.
  CopyProperties(const amqp_basic_properties_t& original, std::string_view body, const DeadLetterInfo& info,
                 const CopySigner& signer, size_t frame_max);
  // The signed retry copy: x-attempt (the next attempt), x-last-error, x-death-handler,
  // x-first/last-failed-at, x-original-*, x-er-sig, and expiration = `expiration_ms`.
  CopyProperties(const amqp_basic_properties_t& original, std::string_view body, const DeadLetterInfo& info,
                 uint32_t next_attempt, uint64_t expiration_ms, const CopySigner& signer, size_t frame_max);

  CopyProperties(const CopyProperties&) = delete;
  CopyProperties& operator=(const CopyProperties&) = delete;

  const amqp_basic_properties_t* get() const { return &props_; }

  // Whether the properties encode into one content header frame of a
  // connection with this frame_max (amqp_get_frame_max()). Encodes them with
  // amqp_encode_properties into a scratch buffer of frame_max - 20 bytes.
  bool fits(size_t frame_max) const;
  // fits(frame_max) for the frame_max given to the constructor.
  bool fitted() const { return fitted_; }
  // The original headers were left out (step 2 or 3).
  bool headers_dropped() const { return headers_dropped_; }

 private:
  struct Input;
  void build(const Input& in, bool keep_headers, size_t detail_max);
  void make(const Input& in, size_t frame_max);
  void add_string(const char* key, std::string value);
  void add_int(const char* key, int64_t value);
  void set_bytes(amqp_bytes_t& field, std::string value);

  amqp_basic_properties_t props_{};
  std::vector<amqp_table_entry_t> entries_;
  std::deque<std::string> strings_;  // owns the bytes the entries point to; deque: push_back keeps them in place
  bool fitted_ = false;
  bool headers_dropped_ = false;
};

// What a delivery says about its own history. Believed only from a copy the
// daemon signed; anything else is a first delivery with its real routing
// (attempt 1, has_original false).
struct DeliveryHistory {
  uint32_t attempt = 1;
  bool has_original = false;               // the x-original-* fields below are ours (the key may be empty)
  std::string_view original_exchange;
  std::string_view original_routing_key;
  std::string_view original_queue;
  std::string_view first_failed_at;
  uint32_t attempts_made = 0;              // dead-letter copies: x-attempts (attempt stays 1: a replay starts over)
};
// Verifies x-er-sig over the bookkeeping headers and the body. Rejects (returns
// the fresh history) a missing or wrong signature, a duplicated bookkeeping
// header, both or neither of x-attempt / x-attempts, or a missing x-original-*.
DeliveryHistory read_history(const amqp_basic_properties_t& props, std::string_view body, const CopySigner& signer);

// Header names, shared with the tests and the dlq tooling.
inline constexpr const char* kReason = "x-death-reason";
inline constexpr const char* kDetail = "x-death-detail";
inline constexpr const char* kHandler = "x-death-handler";
inline constexpr const char* kAttempts = "x-attempts";
inline constexpr const char* kFirstFailedAt = "x-first-failed-at";
inline constexpr const char* kLastFailedAt = "x-last-failed-at";
inline constexpr const char* kOriginalExchange = "x-original-exchange";
inline constexpr const char* kOriginalRoutingKey = "x-original-routing-key";
inline constexpr const char* kOriginalQueue = "x-original-queue";
inline constexpr const char* kAttempt = "x-attempt";        // retry copies: the attempt they will be
inline constexpr const char* kLastError = "x-last-error";   // retry copies: why the last attempt failed
inline constexpr const char* kSignature = "x-er-sig";       // signed copies: see settle/signer.hpp
inline constexpr const char* kHeadersDropped = "x-headers-dropped";  // the original headers did not fit

}  // namespace er::settle
