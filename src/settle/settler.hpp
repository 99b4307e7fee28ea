#pragma once
// The settler turns a handler's verdict into broker operations: an ack, or a
// copy (a retry copy into a delay queue, a dead-letter copy into <queue>.dlq)
// that is confirmed before the original is acked. It decides; an Outbox
// carries the decisions out (the consumer on the broker link; a fake in tests).
#include <amqp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"
#include "dispatch/handler.hpp"
#include "metrics/metrics.hpp"
#include "settle/emit.hpp"
#include "settle/settle.hpp"

namespace er::settle {

// The broker's answer to a copy.
enum class CopyResult {
  Confirmed,  // the broker has it
  Returned,   // mandatory and unroutable (its queue is gone)
  Refused,    // nacked, or its channel was closed by the broker
  Lost,       // the connection went away before the confirm
};

// One step of a queue's retry ladder: a delay and the queue that holds it.
struct RetryStep {
  config::Duration delay;
  std::string queue;
};
std::vector<RetryStep> retry_steps(const config::QueueConfig& q);

// The step for a wait of `want`: the shortest declared step that is at least
// as long, else the longest. Null when there are none.
const RetryStep* choose_step(const std::vector<RetryStep>& steps, config::Duration want);

// The events one ack emits, in flight until the broker answered each.
struct EmitBatch {
  std::vector<EmittedEvent> events;
  std::vector<amqp_basic_properties_t> props;  // point into `events`
  std::string handler;
  size_t outstanding = 0;   // published, not yet answered
  bool all_sent = false;
  bool lost = false;
  bool refused = false;
  size_t returned = SIZE_MAX;  // the first returned one
};

// One event being settled: what its copy is made of and where the original
// came from. The consumer's delivery is one.
struct Settling {
  const amqp_basic_properties_t* properties = nullptr;
  amqp_bytes_t body = amqp_empty_bytes;
  const config::QueueConfig* queue_cfg = nullptr;
  const std::vector<RetryStep>* steps = nullptr;
  std::string_view exchange;     // as first published (from verified history)
  std::string_view routing_key;
  uint32_t attempt = 1;
  std::string_view event_id;
  std::string_view event_type;
  const CopySigner* signer = nullptr;    // signs the copy's bookkeeping
  size_t frame_max = 131072;             // of the connection the copy goes out on
  std::unique_ptr<CopyProperties> copy;  // the copy in flight, kept until its result
  std::string copy_target;
  std::unique_ptr<DeadLetterInfo> info;  // what the copy was made from (for a plainer one)
  std::string info_text;                 // owns info's reason and detail
  uint32_t next_attempt = 0;             // retry copies: the attempt they will be; 0 = dead letter
  uint64_t expiration_ms = 0;
  // Emits (docs/handlers.md#emit): what they inherit and where they go.
  std::string_view correlation_id;
  std::string_view emit_exchange;          // the config's exchange
  const event::SchemaSet* schemas = nullptr;
  std::unique_ptr<EmitBatch> emits;        // null unless an ack emitted events
};

// The broker operations a settlement needs.
class Outbox {
 public:
  virtual ~Outbox() = default;
  // The original is done: ack it (if its channel still lives) and release it.
  virtual void ack(Settling& s) = 0;
  // Give the original back to its queue after a pause, then release it.
  virtual void hand_back_later(Settling& s, const char* why) = 0;
  // Its channel is gone; the broker redelivers it. Release it.
  virtual void drop(Settling& s) = 0;
  // Publish s.copy to `s.copy_target`; the answer comes to Settler::copy_result.
  virtual void publish(Settling& s) = 0;
  // Whether the original can still be settled.
  virtual bool live(const Settling& s) const = 0;
  // Publish s.emits->events[index] to s.emit_exchange; the answer comes to
  // Settler::emit_result.
  virtual void publish_emit(Settling& s, size_t index) = 0;
  // Every emitted event is confirmed: the handler's success counts (dedupe), just before the ack.
  virtual void succeeded(Settling&) {}
};

class Settler {
 public:
  struct Stats {
    uint64_t acked = 0;  // handled successfully, or unhandled with `unhandled: ack`
    uint64_t retried = 0;
    uint64_t dead_lettered = 0;
  };

  Settler(Outbox& out, metrics::Registry& registry);

  // A handler's verdict. `policy` is the handler's retry policy, `style`
  // how it wants its emitted events written.
  void settle(Settling& s, const dispatch::Outcome& outcome, std::string_view handler,
              const config::RetryConfig& policy, config::EmitStyle style = config::EmitStyle::Snake);
  void ack(Settling& s);
  void dead_letter(Settling& s, std::string_view reason, std::string_view detail, std::string_view handler);
  void retry(Settling& s, const dispatch::Outcome& outcome, std::string_view handler,
             const config::RetryConfig& policy);
  // The broker's answer to s.copy.
  void copy_result(Settling& s, CopyResult result);
  // An ack with emits: publish them all, ack once every one is confirmed.
  void emit(Settling& s, const dispatch::Outcome& outcome, std::string_view handler, config::EmitStyle style);
  // The broker's answer to s.emits->events[index].
  void emit_result(Settling& s, size_t index, CopyResult result);

  // A Retry verdict of an ordered event (docs/ordering.md): returns the wait
  // (the policy's delay_before, or the handler's own request if longer) when
  // the caller is to hold the delivery unacked and run it again with the next
  // attempt. Otherwise settles it: dead-lettered as max_attempts when no
  // attempt is left, or as ordering_hold_exceeded when `age` (how long the
  // delivery has been held) plus the wait would pass `hold_max`.
  std::optional<config::Duration> hold_or_settle(Settling& s, const dispatch::Outcome& outcome,
                                                 std::string_view handler, const config::RetryConfig& policy,
                                                 config::Duration age, config::Duration hold_max);

  const Stats& stats() const { return stats_; }

 private:
  void make_copy(Settling& s, const DeadLetterInfo& info);
  void send(Settling& s);
  void emits_done(Settling& s);
  Outbox& out_;
  metrics::CounterFamily* retries_;
  metrics::CounterFamily* dead_letters_;
  metrics::CounterFamily* retries_in_place_;
  metrics::CounterFamily* emitted_;
  Stats stats_;
  std::mt19937 rng_{std::random_device{}()};
};

}  // namespace er::settle
