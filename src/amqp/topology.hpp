#pragma once
#include "amqp/connection.hpp"
#include "config/config.hpp"

namespace er::amqp {

// Declares the exchange (durable), every queue (durable), its bindings and
// its dead-letter queue, on channel `ch`. Idempotent. Throws AmqpError naming
// the object and, for PRECONDITION_FAILED, the argument that differs; the
// channel is then closed by the broker.
void declare_topology(Connection& conn, amqp_channel_t ch, const config::Config& cfg);

}  // namespace er::amqp
