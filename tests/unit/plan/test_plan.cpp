// `event-router plan`'s comparison, on fixed answers of the management API
// (the shapes RabbitMQ 3.10 answers; tests/integration/test_plan.py runs it
// against a live node).
#include <catch2/catch.hpp>

#include <string>

#include "amqp/topology.hpp"
#include "config/config.hpp"
#include "plan/management.hpp"
#include "plan/plan.hpp"

using namespace er;

namespace {

config::Config load(const std::string& queue_extra) {
  return config::load_config_string(
      "broker: {url: 'amqp://guest:guest@127.0.0.1:5672/'}\n"
      "exchange: {name: ex, type: topic}\n"
      "queues:\n"
      "  - name: q\n"
      "    bindings: ['a.*', 'b.#']\n"
      "    retry: {max_attempts: 2, delay: 1s}\n" +
          queue_extra +
          "    handlers:\n"
          "      - {name: h, events: ['#'], exec: [/bin/true]}\n",
      "t.yaml", "/tmp");
}

const char* kExchange = R"({"arguments":{},"auto_delete":false,"durable":true,"internal":false,"name":"ex","type":"topic","vhost":"/"})";

std::string queue_json(const std::string& name, const std::string& type, const std::string& arguments) {
  return R"({"arguments":)" + arguments + R"(,"auto_delete":false,"durable":true,"exclusive":false,"name":")" + name +
         R"(","type":")" + type + R"(","vhost":"/","messages":3})";
}

std::string binding(const std::string& queue, const std::string& key, const std::string& args = "{}") {
  return R"({"source":"ex","vhost":"/","destination":")" + queue + R"(","destination_type":"queue","routing_key":")" +
         key + R"(","arguments":)" + args + R"(,"properties_key":"x"})";
}

// What the broker holds after the daemon declared `cfg` with these answers.
plan::Observed in_sync_state(const std::string& work_args = "{}") {
  plan::Observed o;
  o.exchange = kExchange;
  o.queues["q"] = queue_json("q", "classic", work_args);
  o.queues["q.dlq"] = queue_json("q.dlq", "classic", "{}");
  o.queues["q.retry.1000"] =
      queue_json("q.retry.1000", "classic", R"({"x-dead-letter-exchange":"","x-dead-letter-routing-key":"q"})");
  // A queue of someone else on the same exchange: not the config's business.
  o.bindings = "[" + binding("q", "a.*") + "," + binding("q", "b.#") + "," + binding("audit", "#") + "]";
  return o;
}

}  // namespace

TEST_CASE("topology: one description for declaring and plan", "[plan]") {
  auto cfg = load("    arguments: {x-max-length: 10}\n");
  auto t = amqp::desired_topology(cfg);
  CHECK(t.exchange.name == "ex");
  CHECK(t.exchange.type == "topic");
  REQUIRE(t.queues.size() == 1);
  const auto& qs = t.queues[0].queues;
  REQUIRE(qs.size() == 3);
  CHECK(qs[0].name == "q");
  CHECK(qs[0].role == amqp::QueueRole::Work);
  REQUIRE(qs[0].arguments.size() == 1);
  CHECK(qs[0].arguments[0].key == "x-max-length");
  CHECK(qs[1].name == "q.dlq");
  CHECK(qs[1].role == amqp::QueueRole::DeadLetter);
  CHECK(qs[2].name == "q.retry.1000");
  CHECK(qs[2].role == amqp::QueueRole::RetryDelay);
  CHECK(qs[2].owner == "q");
  REQUIRE(qs[2].arguments.size() == 2);
  CHECK(qs[2].arguments[1].key == "x-dead-letter-routing-key");
  CHECK(qs[2].arguments[1].s == "q");
  REQUIRE(t.queues[0].bindings.size() == 2);
  CHECK(t.queues[0].bindings[1].routing_key == "b.#");
}

TEST_CASE("plan: the broker as the daemon declared it is in sync", "[plan]") {
  auto cfg = load("    arguments: {x-max-length: 10}\n");
  auto p = plan::compare(amqp::desired_topology(cfg), in_sync_state(R"({"x-max-length":10})"));
  CHECK(p.in_sync());
  CHECK(p.queues == 3);
  CHECK(p.bindings == 2);
  CHECK(plan::render(p) == "In sync: the exchange, 3 queues and 2 bindings match the config.\n");
}

TEST_CASE("plan: missing objects are +, each once", "[plan]") {
  auto cfg = load("");
  plan::Observed nothing;  // every lookup was a 404
  auto p = plan::compare(amqp::desired_topology(cfg), nothing);
  CHECK(p.count(plan::Sign::Add) == 6);  // exchange, 3 queues, 2 bindings
  CHECK(p.count(plan::Sign::Change) == 0);
  CHECK(p.count(plan::Sign::Stale) == 0);
  std::string out = plan::render(p);
  CHECK(out.find("+ exchange 'ex' (topic, durable)\n") != std::string::npos);
  CHECK(out.find("+ queue 'q' (classic)\n") != std::string::npos);
  CHECK(out.find("+ dead-letter queue 'q.dlq' (classic)\n") != std::string::npos);
  CHECK(out.find("+ retry delay queue 'q.retry.1000' (classic, x-dead-letter-exchange=\"\", "
                 "x-dead-letter-routing-key=\"q\")\n") != std::string::npos);
  CHECK(out.find("+ binding 'ex' → 'q' key 'a.*'\n") != std::string::npos);
  CHECK(out.find("Not in sync: 6 to add, 0 to change, 0 stale.") != std::string::npos);

  // Only the DLQ and one binding gone.
  auto o = in_sync_state();
  o.queues["q.dlq"] = std::nullopt;
  o.bindings = "[" + binding("q", "a.*") + "]";
  p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 2);
  CHECK(p.changes[0].subject == "dead-letter queue 'q.dlq' (classic)");
  CHECK(p.changes[1].subject == "binding 'ex' → 'q' key 'b.#'");
}

TEST_CASE("plan: a classic queue the config wants as quorum is ~ with old → new", "[plan]") {
  auto cfg = load("    arguments: {x-queue-type: quorum}\n");
  auto p = plan::compare(amqp::desired_topology(cfg), in_sync_state());
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].sign == plan::Sign::Change);
  CHECK(p.changes[0].subject == "queue 'q'");
  REQUIRE(p.changes[0].details.size() == 1);
  CHECK(p.changes[0].details[0] == "type: classic → quorum");
  std::string out = plan::render(p);
  CHECK(out.find("~ queue 'q'\n~     type: classic → quorum\n") != std::string::npos);
  CHECK(out.find("Migrating a queue to quorum") != std::string::npos);

  // The other way round: a quorum queue the config declares without a type
  // (RabbitMQ refuses that declare: "received none but current is 'quorum'").
  auto classic = load("");
  auto o = in_sync_state(R"({"x-queue-type":"quorum"})");
  o.queues["q"] = queue_json("q", "quorum", R"({"x-queue-type":"quorum"})");
  p = plan::compare(amqp::desired_topology(classic), o);
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].details == std::vector<std::string>{"type: quorum → classic"});
  // Quorum on both sides: in sync.
  CHECK(plan::compare(amqp::desired_topology(cfg), o).in_sync());
}

TEST_CASE("plan: differing, missing and extra arguments", "[plan]") {
  auto cfg = load("    arguments: {x-max-length: 20, x-overflow: reject-publish, x-message-ttl: 60000}\n");
  // x-max-length differs, x-overflow is a string where the broker has one too
  // but another, x-message-ttl is missing, x-expires is extra.
  auto o = in_sync_state(R"({"x-max-length":10,"x-overflow":"drop-head","x-expires":5000})");
  auto p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].details == std::vector<std::string>{"x-max-length: 10 → 20",
                                                         "x-overflow: \"drop-head\" → \"reject-publish\"",
                                                         "x-message-ttl: (none) → 60000", "x-expires: 5000 → (none)"});
  // A quoted number is a string: the broker's integer differs from it.
  auto quoted = load("    arguments: {x-max-length: \"10\"}\n");
  p = plan::compare(amqp::desired_topology(quoted), in_sync_state(R"({"x-max-length":10})"));
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].details == std::vector<std::string>{"x-max-length: 10 → \"10\""});
  // DLQ arguments are compared too.
  auto dl = load("    dead_letter_arguments: {x-max-length: 100}\n");
  p = plan::compare(amqp::desired_topology(dl), in_sync_state());
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].subject == "dead-letter queue 'q.dlq'");
  CHECK(p.changes[0].details == std::vector<std::string>{"x-max-length: (none) → 100"});
}

TEST_CASE("plan: flags and the exchange", "[plan]") {
  auto cfg = load("");
  auto o = in_sync_state();
  o.exchange = R"({"arguments":{"alternate-exchange":"ae"},"auto_delete":false,"durable":false,"internal":false,"type":"fanout"})";
  o.queues["q.dlq"] = R"({"arguments":{},"auto_delete":true,"durable":false,"exclusive":false,"type":"classic"})";
  auto p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 2);
  CHECK(p.changes[0].subject == "exchange 'ex'");
  CHECK(p.changes[0].details ==
        std::vector<std::string>{"type: fanout → topic", "durable: false → true", "alternate-exchange: \"ae\" → (none)"});
  CHECK(p.changes[1].details == std::vector<std::string>{"durable: false → true", "auto_delete: true → false"});
}

TEST_CASE("plan: stale bindings are those to the config's queues only", "[plan]") {
  auto cfg = load("");
  auto o = in_sync_state();
  o.bindings = "[" + binding("q", "a.*") + "," + binding("q", "b.#") + "," + binding("q", "old.*") + "," +
               binding("q.dlq", "x") + "," + binding("audit", "#") + "," + binding("other.q", "a.*") +
               R"(,{"source":"ex","destination":"ex2","destination_type":"exchange","routing_key":"z","arguments":{}}])";
  auto p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 2);
  CHECK(p.changes[0].sign == plan::Sign::Stale);
  CHECK(p.changes[0].subject == "binding 'ex' → 'q' key 'old.*'");
  CHECK(p.changes[1].subject == "binding 'ex' → 'q.dlq' key 'x'");
  std::string out = plan::render(p);
  CHECK(out.find("- binding 'ex' → 'q' key 'old.*'\n") != std::string::npos);
  CHECK(out.find("Not in sync: 0 to add, 0 to change, 2 stale.") != std::string::npos);

  // A binding with arguments is not the one the daemon makes: stale, and
  // the plain one is missing.
  o.bindings = "[" + binding("q", "a.*", R"({"x-match":"all"})") + "," + binding("q", "b.#") + "]";
  p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 2);
  CHECK(p.changes[0].sign == plan::Sign::Add);
  CHECK(p.changes[0].subject == "binding 'ex' → 'q' key 'a.*'");
  CHECK(p.changes[1].sign == plan::Sign::Stale);
  CHECK(p.changes[1].subject == "binding 'ex' → 'q' key 'a.*' arguments {\"x-match\":\"all\"}");
}

TEST_CASE("plan: broker text is shown escaped; garbage answers are errors", "[plan]") {
  auto cfg = load("");
  auto o = in_sync_state();
  o.bindings = "[" + binding("q", "a.*") + "," + binding("q", "b.#") + "," + binding("q", "evil\\u001b[2J") + "]";
  auto p = plan::compare(amqp::desired_topology(cfg), o);
  REQUIRE(p.changes.size() == 1);
  CHECK(p.changes[0].subject == "binding 'ex' → 'q' key 'evil\\x1b[2J'");

  o = in_sync_state();
  o.queues["q"] = "<html>proxy error</html>";
  CHECK_THROWS_AS(plan::compare(amqp::desired_topology(cfg), o), plan::ManagementError);
  o = in_sync_state();
  o.bindings = R"({"error":"x"})";
  CHECK_THROWS_AS(plan::compare(amqp::desired_topology(cfg), o), plan::ManagementError);
}

TEST_CASE("plan: management URLs", "[plan]") {
  auto e = plan::parse_endpoint("http://ops:p%40ss:w@rabbit-1:15673/rabbitmq/");
  CHECK(e.host == "rabbit-1");
  CHECK(e.port == "15673");
  CHECK(e.prefix == "/rabbitmq");
  CHECK(e.has_credentials);
  CHECK(e.user == "ops");
  CHECK(e.password == "p@ss:w");
  CHECK(e.display() == "http://rabbit-1:15673/rabbitmq/");  // never the password

  e = plan::parse_endpoint("http://[::1]");
  CHECK(e.host == "::1");
  CHECK(e.port == "15672");
  CHECK_FALSE(e.has_credentials);
  CHECK(e.display() == "http://[::1]:15672/");

  for (const char* bad : {"https://h:15671/", "h:15672", "http://:15672/", "http://h:0/", "http://h:99999/",
                          "http://h:12a/", "http://h/?x=1", "http://[::1/"}) {
    INFO(bad);
    CHECK_THROWS_AS(plan::parse_endpoint(bad), plan::ManagementError);
  }
  try {
    plan::parse_endpoint("ftp://u:secret@h/");
  } catch (const plan::ManagementError& x) {
    CHECK(std::string(x.what()).find("secret") == std::string::npos);
  }
  CHECK(plan::encode_segment("/") == "%2F");
  CHECK(plan::encode_segment("q.retry.1000") == "q.retry.1000");
  CHECK(plan::encode_segment("a b/#") == "a%20b%2F%23");
}
