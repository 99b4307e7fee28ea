#include "amqp/topology.hpp"

#include <algorithm>

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

config::QueueArgument int_argument(std::string key, int64_t value) {
  config::QueueArgument a;
  a.kind = config::QueueArgument::Kind::Int;
  a.key = std::move(key);
  a.i = value;
  return a;
}

// `derived`, with each key the config also gives replaced by the config's.
std::vector<config::QueueArgument> merged(std::vector<config::QueueArgument> derived,
                                          const std::vector<config::QueueArgument>& given) {
  for (const auto& g : given) {
    auto it = std::find_if(derived.begin(), derived.end(), [&](const auto& d) { return d.key == g.key; });
    if (it != derived.end())
      *it = g;
    else
      derived.push_back(g);
  }
  return derived;
}

// Quorum dead-lettering that cannot lose a message: the source keeps it until
// the target queue confirms it. RabbitMQ honours at-least-once only with
// reject-publish (a full queue refuses new messages instead of dropping its head).
void at_least_once(std::vector<config::QueueArgument>& args) {
  args.push_back(string_argument("x-dead-letter-strategy", "at-least-once"));
  args.push_back(string_argument("x-overflow", "reject-publish"));
}
}  // namespace

QueueTopology desired_queue(const config::Config&, const config::QueueConfig& q) {
  const bool quorum = q.type == config::QueueType::Quorum;
  QueueTopology t;
  std::vector<config::QueueArgument> work, dlq;
  if (quorum) {
    // Classic queues keep their arguments as they were: adding a dead-letter
    // route to an existing queue would make its redeclare fail.
    work.push_back(string_argument("x-queue-type", "quorum"));
    work.push_back(int_argument("x-delivery-limit", q.delivery_limit));
    work.push_back(string_argument("x-dead-letter-exchange", ""));
    work.push_back(string_argument("x-dead-letter-routing-key", q.dead_letter_queue));
    at_least_once(work);
    dlq.push_back(string_argument("x-queue-type", "quorum"));
  }
  t.queues.push_back({q.name, QueueRole::Work, q.name, merged(std::move(work), q.arguments)});
  t.queues.push_back(
      {q.dead_letter_queue, QueueRole::DeadLetter, q.name, merged(std::move(dlq), q.dead_letter_arguments)});
  // One queue per delay step keeps FIFO expiry honest: per-message TTLs only
  // expire at the head of a queue, so a short delay must never sit behind a
  // long one. Within one step the delays differ only by the jitter.
  for (auto step : q.retry_steps()) {
    std::vector<config::QueueArgument> delay;
    if (quorum) delay.push_back(string_argument("x-queue-type", "quorum"));
    delay.push_back(string_argument("x-dead-letter-exchange", ""));
    delay.push_back(string_argument("x-dead-letter-routing-key", q.name));
    if (quorum) at_least_once(delay);
    t.queues.push_back({retry_queue_name(q.name, step), QueueRole::RetryDelay, q.name, std::move(delay)});
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
    try {
      check_reply(amqp_get_rpc_reply(c), std::string("declaring ") + role_name(spec.role) + " '" + spec.name + "'");
    } catch (const AmqpError& e) {
      // The broker names the first argument that differs, often not
      // x-queue-type: say what a classic queue of that name means.
      std::string what = e.what();
      if (q.type != config::QueueType::Quorum || e.reply_code() != AMQP_PRECONDITION_FAILED ||
          what.find("Migrating a queue to quorum") != std::string::npos)
        throw;
      throw AmqpError(what + ". If it exists as a classic queue (rabbitmqctl list_queues name type), it cannot "
                             "become quorum in place: follow \"Migrating a queue to quorum\" in docs/scaling.md",
                      e.reply_code(), e.channel_closed());
    }
  }
  for (const auto& b : t.bindings) {
    amqp_queue_bind(c, ch, bytes(b.queue), bytes(ex.name), bytes(b.routing_key), amqp_empty_table);
    check_reply(amqp_get_rpc_reply(c),
                "binding queue '" + b.queue + "' to exchange '" + ex.name + "' with key '" + b.routing_key + "'");
  }
}

}  // namespace er::amqp
