#include "amqp/topology.hpp"

namespace er::amqp {

namespace {
// Points into `args`; valid while it lives.
amqp_table_t to_table(const std::vector<config::QueueArgument>& args, std::vector<amqp_table_entry_t>& storage) {
  storage.clear();
  for (const auto& a : args) {
    amqp_table_entry_t e;
    e.key = bytes(a.key);
    switch (a.kind) {
      case config::QueueArgument::Kind::Int:
        e.value.kind = AMQP_FIELD_KIND_I64;
        e.value.value.i64 = a.i;
        break;
      case config::QueueArgument::Kind::Bool:
        e.value.kind = AMQP_FIELD_KIND_BOOLEAN;
        e.value.value.boolean = a.b;
        break;
      case config::QueueArgument::Kind::String:
        e.value.kind = AMQP_FIELD_KIND_UTF8;
        e.value.value.bytes = bytes(a.s);
        break;
    }
    storage.push_back(e);
  }
  return amqp_table_t{static_cast<int>(storage.size()), storage.empty() ? nullptr : storage.data()};
}
}  // namespace

std::string retry_queue_name(const std::string& queue, config::Duration step) {
  return queue + ".retry." + std::to_string(step.count());
}

void declare_exchange(Connection& conn, amqp_channel_t ch, const config::Config& cfg) {
  amqp_connection_state_t c = conn.get();
  const auto& ex = cfg.exchange;
  amqp_exchange_declare(c, ch, bytes(ex.name), bytes(ex.type), /*passive*/ 0, /*durable*/ 1,
                        /*auto_delete*/ 0, /*internal*/ 0, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(c), "declaring exchange '" + ex.name + "' (type " + ex.type + ")");
}

void declare_topology(Connection& conn, amqp_channel_t ch, const config::Config& cfg) {
  declare_exchange(conn, ch, cfg);
  for (const auto& q : cfg.queues) declare_queue(conn, ch, cfg, q);
}

void declare_queue(Connection& conn, amqp_channel_t ch, const config::Config& cfg, const config::QueueConfig& q) {
  amqp_connection_state_t c = conn.get();
  const auto& ex = cfg.exchange;
  std::vector<amqp_table_entry_t> storage;
  amqp_queue_declare(c, ch, bytes(q.name), 0, /*durable*/ 1, 0, 0, to_table(q.arguments, storage));
  check_reply(amqp_get_rpc_reply(c), "declaring queue '" + q.name + "'");
  amqp_queue_declare(c, ch, bytes(q.dead_letter_queue), 0, 1, 0, 0, to_table(q.dead_letter_arguments, storage));
  check_reply(amqp_get_rpc_reply(c), "declaring dead-letter queue '" + q.dead_letter_queue + "'");
  // One queue per delay step keeps FIFO expiry honest: per-message TTLs only
  // expire at the head of a queue, so a short delay must never sit behind a
  // long one. Within one step the delays differ only by the jitter.
  for (auto step : q.retry_steps()) {
    std::string name = retry_queue_name(q.name, step);
    amqp_table_entry_t args[2];
    args[0].key = amqp_cstring_bytes("x-dead-letter-exchange");
    args[0].value.kind = AMQP_FIELD_KIND_UTF8;
    args[0].value.value.bytes = amqp_empty_bytes;
    args[1].key = amqp_cstring_bytes("x-dead-letter-routing-key");
    args[1].value.kind = AMQP_FIELD_KIND_UTF8;
    args[1].value.value.bytes = bytes(q.name);
    amqp_table_t table{2, args};
    amqp_queue_declare(c, ch, bytes(name), 0, 1, 0, 0, table);
    check_reply(amqp_get_rpc_reply(c), "declaring retry delay queue '" + name + "'");
  }
  for (const auto& key : q.bindings) {
    amqp_queue_bind(c, ch, bytes(q.name), bytes(ex.name), bytes(key), amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c),
                "binding queue '" + q.name + "' to exchange '" + ex.name + "' with key '" + key + "'");
  }
}

}  // namespace er::amqp
