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

const char* role_name(QueueRole role) {
  switch (role) {
    case QueueRole::Work: return "queue";
    case QueueRole::DeadLetter: return "dead-letter queue";
    case QueueRole::RetryDelay: return "retry delay queue";
  }
  return "queue";
}

namespace {
config::QueueArgument string_argument(std::string key, std::string value) {
  config::QueueArgument a;
  a.kind = config::QueueArgument::Kind::String;
  a.key = std::move(key);
  a.s = std::move(value);
  return a;
}
}  // namespace

QueueTopology desired_queue(const config::Config&, const config::QueueConfig& q) {
  QueueTopology t;
  t.queues.push_back({q.name, QueueRole::Work, q.name, q.arguments});
  t.queues.push_back({q.dead_letter_queue, QueueRole::DeadLetter, q.name, q.dead_letter_arguments});
  // One queue per delay step keeps FIFO expiry honest: per-message TTLs only
  // expire at the head of a queue, so a short delay must never sit behind a
  // long one. Within one step the delays differ only by the jitter.
  for (auto step : q.retry_steps()) {
    t.queues.push_back({retry_queue_name(q.name, step), QueueRole::RetryDelay, q.name,
                        {string_argument("x-dead-letter-exchange", ""),
                         string_argument("x-dead-letter-routing-key", q.name)}});
  }
  for (const auto& key : q.bindings) t.bindings.push_back({q.name, key});
  return t;
}

Topology desired_topology(const config::Config& cfg) {
  Topology t;
  t.exchange = {cfg.exchange.name, cfg.exchange.type};
  for (const auto& q : cfg.queues) t.queues.push_back(desired_queue(cfg, q));
  return t;
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
  const QueueTopology t = desired_queue(cfg, q);
  for (const auto& spec : t.queues) {
    amqp_queue_declare(c, ch, bytes(spec.name), 0, /*durable*/ 1, 0, 0, to_table(spec.arguments, storage));
    check_reply(amqp_get_rpc_reply(c), std::string("declaring ") + role_name(spec.role) + " '" + spec.name + "'");
  }
  for (const auto& b : t.bindings) {
    amqp_queue_bind(c, ch, bytes(b.queue), bytes(ex.name), bytes(b.routing_key), amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c),
                "binding queue '" + b.queue + "' to exchange '" + ex.name + "' with key '" + b.routing_key + "'");
  }
}

}  // namespace er::amqp
