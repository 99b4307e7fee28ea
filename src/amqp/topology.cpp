#include "amqp/topology.hpp"

namespace er::amqp {

void declare_topology(Connection& conn, amqp_channel_t ch, const config::Config& cfg) {
  amqp_connection_state_t c = conn.get();
  const auto& ex = cfg.exchange;
  amqp_exchange_declare(c, ch, bytes(ex.name), bytes(ex.type), /*passive*/ 0, /*durable*/ 1,
                        /*auto_delete*/ 0, /*internal*/ 0, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(c), "declaring exchange '" + ex.name + "' (type " + ex.type + ")");

  for (const auto& q : cfg.queues) {
    amqp_queue_declare(c, ch, bytes(q.name), 0, /*durable*/ 1, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c), "declaring queue '" + q.name + "'");
    amqp_queue_declare(c, ch, bytes(q.dead_letter_queue), 0, 1, 0, 0, amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c), "declaring dead-letter queue '" + q.dead_letter_queue + "'");
    for (const auto& key : q.bindings) {
      amqp_queue_bind(c, ch, bytes(q.name), bytes(ex.name), bytes(key), amqp_empty_table);
      check_reply(amqp_get_rpc_reply(c),
                  "binding queue '" + q.name + "' to exchange '" + ex.name + "' with key '" + key + "'");
    }
  }
}

}  // namespace er::amqp
