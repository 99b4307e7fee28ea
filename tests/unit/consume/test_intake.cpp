// Intake: a delivery becomes a decision. No broker: the body, the queue's
// config and router, schemas and the dedupe lookup are all the input.
#include <catch2/catch.hpp>

#include <set>
#include <string>

#include "consume/intake.hpp"

using namespace er;
using consume::Decision;

namespace {
struct Ack : dispatch::Handler {
  using Handler::Handler;
  void start(dispatch::Job& job) override { job.finish(dispatch::Outcome::ack()); }
};

struct Fixture {
  config::QueueConfig q;
  dispatch::QueueRouter router{q};
  event::Envelope env;
  std::string detail;

  Fixture() {
    q.name = "speaker.events";
    q.max_message_bytes = 256;
    config::HandlerConfig h;
    h.name = "speaker";
    h.events.emplace_back("speaker.*");
    q.handlers.push_back(h);
    dispatch::HandlerSlot s;
    s.cfg = &q.handlers[0];
    s.handler = std::make_unique<Ack>("speaker");
    router.slots().push_back(std::move(s));
  }
  Decision run(const std::string& body, std::function<bool(std::string_view)> seen = {},
               uint64_t size = ~0ull, std::string_view rk = "speaker.onboarded") {
    consume::IntakeInput in{amqp_bytes_t{body.size(), const_cast<char*>(body.data())},
                            size == ~0ull ? body.size() : size, rk};
    return consume::decide(in, q, router, nullptr, seen, env, detail);
  }
};
}  // namespace

TEST_CASE("intake: a good event is routed to its handler", "[intake]") {
  Fixture f;
  Decision d = f.run(R"({"event_id":"e1","event_type":"speaker.onboarded","payload":{}})");
  REQUIRE(d.kind == Decision::Kind::Handle);
  CHECK(d.slot->handler->name() == "speaker");
  CHECK(f.env.event_id == "e1");
}

TEST_CASE("intake: bad input gets its reason, never a handler", "[intake]") {
  Fixture f;
  auto dl = [&](const std::string& body, std::string_view reason) {
    Decision d = f.run(body);
    CHECK(d.kind == Decision::Kind::DeadLetter);
    CHECK(d.reason == reason);
    CHECK(d.slot == nullptr);
  };
  dl("{not json", "invalid_json");
  dl("[]", "not_object");
  f.q.max_message_bytes = 4096;
  dl(R"({"event_type":")" + std::string(300, 'a') + R"("})", "field_too_long");
  dl(R"({"event_type":"nobody.home"})", "unhandled");
  CHECK(f.detail.find("nobody.home") != std::string::npos);
}

TEST_CASE("intake: the announced size decides too_large, not the kept bytes", "[intake]") {
  Fixture f;
  // The link keeps at most max_message_bytes: a cut body must not pass.
  std::string kept(256, ' ');
  Decision d = f.run(kept, {}, 40u << 20);
  CHECK(d.kind == Decision::Kind::DeadLetter);
  CHECK(d.reason == "too_large");
  CHECK(f.detail == "body of 41943040 bytes exceeds max_message_bytes 256; this copy keeps its first 256 bytes");
  // Exactly the limit is fine.
  std::string body = R"({"event_type":"speaker.x","p":")";
  body += std::string(256 - body.size() - 2, 'y') + "\"}";
  REQUIRE(body.size() == 256);
  CHECK(f.run(body).kind == Decision::Kind::Handle);
}

TEST_CASE("intake: dedupe asks only for queues that dedupe, and only with an id", "[intake]") {
  Fixture f;
  std::set<std::string> asked;
  auto seen = [&](std::string_view id) {
    asked.insert(std::string(id));
    return id == "done";
  };
  CHECK(f.run(R"({"event_id":"done","event_type":"speaker.a"})", seen).kind == Decision::Kind::Handle);
  CHECK(asked.empty());  // dedupe is off for this queue
  f.q.dedupe_ttl = std::chrono::hours(1);
  CHECK(f.run(R"({"event_id":"done","event_type":"speaker.a"})", seen).kind == Decision::Kind::Duplicate);
  CHECK(f.run(R"({"event_id":"new","event_type":"speaker.a"})", seen).kind == Decision::Kind::Handle);
  CHECK(f.run(R"({"event_type":"speaker.a"})", seen).kind == Decision::Kind::Handle);
  CHECK(asked == std::set<std::string>{"done", "new"});
  // Bad input is refused before the store is asked.
  CHECK(f.run(R"({"event_id":"x2","event_type":"speaker.a",)", seen).kind == Decision::Kind::DeadLetter);
  CHECK(asked.count("x2") == 0);
}

TEST_CASE("intake: unhandled: ack acks what no handler takes", "[intake]") {
  Fixture f;
  f.q.unhandled = config::Unhandled::Ack;
  CHECK(f.run(R"({"event_type":"draft.created"})").kind == Decision::Kind::UnhandledAck);
}

TEST_CASE("intake: the event type falls back to the routing key", "[intake]") {
  Fixture f;
  Decision d = f.run(R"({"event_id":"e","payload":{}})", {}, ~0ull, "speaker.updated");
  REQUIRE(d.kind == Decision::Kind::Handle);
  CHECK(f.env.event_type == "speaker.updated");
}
