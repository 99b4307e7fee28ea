#pragma once
#include "amqp/connection.hpp"
#include "config/config.hpp"

namespace er::amqp {

// "<queue>.retry.<ms>": the delay queue of one retry step. It dead-letters
// expired messages back to <queue> through the default exchange.
std::string retry_queue_name(const std::string& queue, config::Duration step);

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
