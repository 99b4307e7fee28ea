#pragma once
#include <string>
#include <vector>

#include "amqp/connection.hpp"
#include "config/config.hpp"

namespace er::amqp {

// "<queue>.retry.<ms>": the delay queue of one retry step. It dead-letters
// expired messages back to <queue> through the default exchange.
std::string retry_queue_name(const std::string& queue, config::Duration step);

// What the daemon wants on the broker, computed from the config in one place
// (desired_topology): declaring and `event-router plan` both read it, so an
// argument added here is declared and compared alike.
enum class QueueRole { Work, DeadLetter, RetryDelay };

struct QueueSpec {
  std::string name;
  QueueRole role = QueueRole::Work;
  std::string owner;  // the work queue it belongs to (its own name for a work queue)
  std::vector<config::QueueArgument> arguments;  // in declare order
  // Always durable, never exclusive or auto-delete.
};

struct BindingSpec {
  std::string queue;
  std::string routing_key;  // no binding arguments
};

struct ExchangeSpec {
  std::string name;
  std::string type;
  // Always durable, not auto-delete, not internal, no arguments.
};

// One work queue with everything it brings: its queues (work queue first,
// then its dead-letter queue, then its delay queues) and its bindings on
// the exchange.
struct QueueTopology {
  std::vector<QueueSpec> queues;
  std::vector<BindingSpec> bindings;
};

struct Topology {
  ExchangeSpec exchange;
  std::vector<QueueTopology> queues;  // in config order
};

// With `type: quorum` all of a queue's queues are quorum queues; the work
// queue gets x-delivery-limit and a broker-side dead-letter route into its
// DLQ, the work and delay queues at-least-once dead-lettering (with the
// reject-publish overflow it needs). The config's `arguments` /
// `dead_letter_arguments` override a derived key (docs/scaling.md).
QueueTopology desired_queue(const config::Config& cfg, const config::QueueConfig& q);
Topology desired_topology(const config::Config& cfg);

// "queue", "dead-letter queue", "retry delay queue".
const char* role_name(QueueRole role);

// Declares the exchange (durable), every queue (durable), its bindings and
// its dead-letter queue and its retry delay queues, on channel `ch`. Idempotent. Throws AmqpError naming
// the object and, for PRECONDITION_FAILED, the argument that differs; the
// channel is then closed by the broker.
void declare_topology(Connection& conn, amqp_channel_t ch, const config::Config& cfg);

// The exchange alone.
void declare_exchange(Connection& conn, amqp_channel_t ch, const config::Config& cfg);

// One queue of the config: the queue, its dead-letter and delay queues, its bindings.
void declare_queue(Connection& conn, amqp_channel_t ch, const config::Config& cfg, const config::QueueConfig& q);

}  // namespace er::amqp
