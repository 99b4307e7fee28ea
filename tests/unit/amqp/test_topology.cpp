// What `type: quorum` declares (the arguments the broker gets for the work
// queue, its DLQ and its delay queues) and how the config keys are checked.
#include <catch2/catch.hpp>

#include <amqp.h>
#include <amqp_framing.h>

#include <map>
#include <string>

#include "amqp/connection.hpp"
#include "amqp/topology.hpp"
#include "config/config.hpp"

using namespace er;

namespace {
const char* kBase = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n";

config::Config load(const std::string& queue_keys) {
  return config::load_config_string(std::string(kBase) + queue_keys, "t.yaml", "/tmp");
}

std::string error_of(const std::string& queue_keys) {
  try {
    load(queue_keys);
  } catch (const config::ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

// key -> value as text ("i:7", "s:quorum", "b:1"), keeping only what is sent.
std::map<std::string, std::string> args(const amqp::QueueSpec& d) {
  std::map<std::string, std::string> out;
  for (const auto& a : d.arguments) {
    switch (a.kind) {
      case config::QueueArgument::Kind::Int: out[a.key] = "i:" + std::to_string(a.i); break;
      case config::QueueArgument::Kind::Bool: out[a.key] = std::string("b:") + (a.b ? "1" : "0"); break;
      case config::QueueArgument::Kind::String: out[a.key] = "s:" + a.s; break;
    }
  }
  return out;
}
}  // namespace

TEST_CASE("topology: classic queues are declared as before", "[amqp][topology]") {
  auto c = load("    arguments: {x-max-length: 5}\n    retry: {max_attempts: 3, delay: 1s, multiplier: 2}\n");
  auto ds = amqp::desired_queue(c, c.queues[0]).queues;
  REQUIRE(ds.size() == 4);  // q, q.dlq, two delay steps
  CHECK(ds[0].name == "q");
  CHECK(args(ds[0]) == std::map<std::string, std::string>{{"x-max-length", "i:5"}});
  CHECK(ds[1].name == "q.dlq");
  CHECK(args(ds[1]).empty());
  CHECK(ds[2].name == "q.retry.1000");
  CHECK(ds[3].name == "q.retry.2000");
  CHECK(args(ds[2]) == std::map<std::string, std::string>{{"x-dead-letter-exchange", "s:"},
                                                          {"x-dead-letter-routing-key", "s:q"}});
}

TEST_CASE("topology: type quorum makes the queue, its DLQ and its delay queues quorum", "[amqp][topology]") {
  auto c = load("    type: quorum\n    delivery_limit: 9\n    dead_letter_queue: dead\n"
                "    dead_letter_arguments: {x-max-length: 100}\n    retry: {max_attempts: 2, delay: 500ms}\n");
  const auto& q = c.queues[0];
  CHECK(q.type == config::QueueType::Quorum);
  CHECK(q.delivery_limit == 9);
  auto ds = amqp::desired_queue(c, q).queues;
  REQUIRE(ds.size() == 3);
  CHECK(args(ds[0]) == std::map<std::string, std::string>{{"x-queue-type", "s:quorum"},
                                                          {"x-delivery-limit", "i:9"},
                                                          {"x-dead-letter-exchange", "s:"},
                                                          {"x-dead-letter-routing-key", "s:dead"},
                                                          {"x-dead-letter-strategy", "s:at-least-once"},
                                                          {"x-overflow", "s:reject-publish"}});
  CHECK(ds[1].name == "dead");
  CHECK(args(ds[1]) == std::map<std::string, std::string>{{"x-queue-type", "s:quorum"}, {"x-max-length", "i:100"}});
  CHECK(ds[2].name == "q.retry.500");
  CHECK(args(ds[2]) == std::map<std::string, std::string>{{"x-queue-type", "s:quorum"},
                                                          {"x-dead-letter-exchange", "s:"},
                                                          {"x-dead-letter-routing-key", "s:q"},
                                                          {"x-dead-letter-strategy", "s:at-least-once"},
                                                          {"x-overflow", "s:reject-publish"}});
}

TEST_CASE("topology: the config's arguments override a derived one; the default limit", "[amqp][topology]") {
  auto c = load("    type: quorum\n    arguments: {x-delivery-limit: 50, x-max-length: 10}\n");
  auto a = args(amqp::desired_queue(c, c.queues[0]).queues[0]);
  CHECK(a["x-delivery-limit"] == "i:50");
  CHECK(a["x-max-length"] == "i:10");
  CHECK(a.size() == 7);
  CHECK(load("    type: quorum\n").queues[0].delivery_limit == 20);
  CHECK(load("").queues[0].type == config::QueueType::Classic);
}

TEST_CASE("config: type and delivery_limit are checked", "[config][topology]") {
  CHECK(error_of("    type: stream\n").find("t.yaml:5:11: ") == 0);
  CHECK(error_of("    delivery_limit: 5\n") ==
        "t.yaml:5:21: queues[0].delivery_limit: delivery_limit needs 'type: quorum' (classic queues have no delivery "
        "limit)");
  CHECK(error_of("    type: quorum\n    delivery_limit: 0\n").find("t.yaml:6:21: ") == 0);
  CHECK(error_of("    type: classic\n    arguments: {x-queue-type: quorum}\n").find("contradicts") !=
        std::string::npos);
  auto legacy = load("    arguments: {x-queue-type: quorum}\n");
  CHECK(legacy.queues[0].type == config::QueueType::Classic);  // as before: only the queue itself
  REQUIRE(legacy.warnings.size() == 1);
  CHECK(legacy.warnings[0].find("'type: quorum' makes its dead-letter and delay queues quorum too") !=
        std::string::npos);
  CHECK(load("    type: quorum\n    arguments: {x-queue-type: quorum}\n").warnings.empty());
}

TEST_CASE("check_reply: a queue type mismatch points to the migration procedure", "[amqp][topology]") {
  amqp_channel_close_t m{};
  m.reply_code = AMQP_PRECONDITION_FAILED;
  m.reply_text = amqp_cstring_bytes(
      "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value "
      "'quorum' of type 'longstr' but current is none");
  amqp_rpc_reply_t r{};
  r.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
  r.reply.id = AMQP_CHANNEL_CLOSE_METHOD;
  r.reply.decoded = &m;
  std::string text = amqp::describe_reply(r, "declaring queue 'q'");
  CHECK(text ==
        "declaring queue 'q': queue 'q' already exists on the broker (vhost '/') as another queue type: the config "
        "declares the value 'quorum' of type 'longstr' but the broker has none. RabbitMQ cannot change a queue's "
        "type in place: follow \"Migrating a queue to quorum\" in docs/scaling.md, or set the queue's 'type' back "
        "to what the broker has");
}
