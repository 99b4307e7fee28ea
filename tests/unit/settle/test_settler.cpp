// The settler against a fake outbox: which broker operations each verdict
// and each answer to a copy lead to.
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "settle/settler.hpp"

using namespace er;
using namespace er::settle;

namespace {
struct FakeOutbox : Outbox {
  std::vector<std::string> ops;
  bool is_live = true;
  void ack(Settling&) override { ops.push_back("ack"); }
  void hand_back_later(Settling&, const char* why) override { ops.push_back(std::string("hand_back: ") + why); }
  void drop(Settling&) override { ops.push_back("drop"); }
  void publish(Settling& s) override { ops.push_back("publish " + s.copy_target); }
  bool live(const Settling&) const override { return is_live; }
  void publish_emit(Settling& s, size_t i) override {
    ops.push_back("emit " + s.emits->events[i].routing_key);
    if (emit_now) emit_now(s, i);
  }
  void succeeded(Settling&) override { ops.push_back("succeeded"); }
  std::function<void(Settling&, size_t)> emit_now;  // answers at once (a lost connection)
};

struct Fixture {
  config::QueueConfig q;
  std::vector<RetryStep> steps;
  amqp_basic_properties_t props{};
  std::string body = R"({"event_type":"a.b"})";
  CopySigner signer{std::string(32, 'k')};
  metrics::Registry registry;
  FakeOutbox out;
  Settler settler{out, registry};
  Settling s;

  Fixture() {
    q.name = "work";
    q.dead_letter_queue = "work.dlq";
    q.retry.delay = std::chrono::seconds(1);
    q.retry.max_attempts = 3;
    steps = retry_steps(q);
    s.properties = &props;
    s.body = amqp_bytes_t{body.size(), body.data()};
    s.queue_cfg = &q;
    s.steps = &steps;
    s.exchange = "ex";
    s.routing_key = "a.b";
    s.signer = &signer;
    s.event_id = "evt-1";
    s.emit_exchange = "events";
  }
  dispatch::Outcome ack_with(std::vector<std::string> emits) {
    dispatch::Outcome o;
    o.emits = std::move(emits);
    return o;
  }
};

std::string header(const amqp_basic_properties_t* p, const char* key) {
  for (int i = 0; i < p->headers.num_entries; ++i) {
    const auto& e = p->headers.entries[i];
    if (std::string(static_cast<const char*>(e.key.bytes), e.key.len) == key) {
      if (e.value.kind == AMQP_FIELD_KIND_I64) return std::to_string(e.value.value.i64);
      return std::string(static_cast<const char*>(e.value.value.bytes.bytes), e.value.value.bytes.len);
    }
  }
  return "<none>";
}
}  // namespace

TEST_CASE("settler: ack acks; a copy is acked only after its confirm", "[settler]") {
  Fixture f;
  f.settler.settle(f.s, dispatch::Outcome::ack(), "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"ack"});
  CHECK(f.settler.stats().acked == 1);

  f.out.ops.clear();
  f.settler.settle(f.s, dispatch::Outcome::dead_letter("bad", "no"), "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"publish work.dlq"});
  CHECK(header(f.s.copy->get(), kReason) == "bad");
  f.settler.copy_result(f.s, CopyResult::Confirmed);
  CHECK(f.out.ops.back() == "ack");
  CHECK(f.settler.stats().dead_lettered == 1);
}

TEST_CASE("settler: retry goes to the step's delay queue until max_attempts", "[settler]") {
  Fixture f;
  f.settler.settle(f.s, dispatch::Outcome::retry("busy", ""), "h", f.q.retry);
  REQUIRE(f.out.ops.size() == 1);
  CHECK(f.out.ops[0] == "publish " + f.steps[0].queue);
  CHECK(header(f.s.copy->get(), kAttempt) == "2");
  // The copy's history is ours and reads back with the key.
  DeliveryHistory h = read_history(*f.s.copy->get(), f.body, f.signer);
  CHECK(h.attempt == 2);
  CHECK(h.original_routing_key == "a.b");

  f.out.ops.clear();
  f.s.attempt = 3;
  f.settler.settle(f.s, dispatch::Outcome::retry("busy", "again"), "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"publish work.dlq"});
  CHECK(header(f.s.copy->get(), kReason) == "max_attempts");
  CHECK(header(f.s.copy->get(), kDetail) == "gave up after 3 attempts; last error: busy: again");
}

TEST_CASE("settler: a refused copy is sent once more, plain; then the original goes back", "[settler]") {
  Fixture f;
  std::string uid = "mallory", hdr = "v";
  amqp_table_entry_t e{};
  e.key = amqp_cstring_bytes("app");
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_bytes_t{hdr.size(), hdr.data()};
  f.props._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
  f.props.headers = amqp_table_t{1, &e};
  f.props.message_id = amqp_bytes_t{uid.size(), uid.data()};
  f.settler.dead_letter(f.s, "unhandled", "no handler", "h");
  CHECK(header(f.s.copy->get(), "app") == "v");
  f.settler.copy_result(f.s, CopyResult::Refused);
  REQUIRE(f.out.ops == std::vector<std::string>{"publish work.dlq", "publish work.dlq"});
  const amqp_basic_properties_t* p = f.s.copy->get();
  CHECK(header(p, "app") == "<none>");
  CHECK((p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) == 0);
  CHECK(header(p, kHeadersDropped).find("refused") != std::string::npos);
  CHECK(header(p, kReason) == "unhandled");
  CHECK(header(p, kDetail) == "no handler");
  CHECK(header(p, kHandler) == "h");
  f.settler.copy_result(f.s, CopyResult::Refused);
  CHECK(f.out.ops.back().rfind("hand_back: the broker refused the copy", 0) == 0);
  CHECK(f.out.ops.size() == 3);
}

TEST_CASE("settler: a returned copy hands the original back; a lost one is dropped", "[settler]") {
  Fixture f;
  f.settler.dead_letter(f.s, "r", "d", "");
  f.settler.copy_result(f.s, CopyResult::Returned);
  CHECK(f.out.ops.back().rfind("hand_back: the copy could not be routed", 0) == 0);
  f.settler.dead_letter(f.s, "r", "d", "");
  f.settler.copy_result(f.s, CopyResult::Lost);
  CHECK(f.out.ops.back() == "drop");
  // Confirmed, but the original's channel died meanwhile: the broker redelivers it.
  f.settler.dead_letter(f.s, "r", "d", "");
  f.out.is_live = false;
  f.settler.copy_result(f.s, CopyResult::Confirmed);
  CHECK(f.out.ops.back() == "drop");
}

TEST_CASE("settler: nothing is published for an original whose channel is gone", "[settler]") {
  Fixture f;
  f.out.is_live = false;
  f.settler.settle(f.s, dispatch::Outcome::retry("x", ""), "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"drop"});
}

TEST_CASE("choose_step: the shortest step that is long enough, else the longest", "[settler]") {
  using std::chrono::milliseconds;
  std::vector<RetryStep> steps{{milliseconds(100), "q.100"}, {milliseconds(1000), "q.1000"}};
  CHECK(choose_step(steps, milliseconds(0))->queue == "q.100");
  CHECK(choose_step(steps, milliseconds(100))->queue == "q.100");
  CHECK(choose_step(steps, milliseconds(101))->queue == "q.1000");
  CHECK(choose_step(steps, milliseconds(99999))->queue == "q.1000");
  CHECK(choose_step({}, milliseconds(1)) == nullptr);
}

TEST_CASE("settler: an ordered retry waits in place on the retry ladder, no copy", "[settler][ordering]") {
  Fixture f;
  const auto hold_max = std::chrono::minutes(5);
  auto wait = f.settler.hold_or_settle(f.s, dispatch::Outcome::retry("busy", ""), "h", f.q.retry,
                                       std::chrono::seconds(0), hold_max);
  REQUIRE(wait);
  CHECK(*wait == f.q.retry.delay_before(2));
  CHECK(f.out.ops.empty());  // nothing published, nothing acked: the caller holds the delivery
  f.s.attempt = 2;
  wait = f.settler.hold_or_settle(f.s, dispatch::Outcome::retry("busy", ""), "h", f.q.retry,
                                  std::chrono::seconds(0), hold_max);
  REQUIRE(wait);
  CHECK(*wait == f.q.retry.delay_before(3));
  CHECK(*wait > f.q.retry.delay_before(2));
  // A handler that asks for a longer wait gets it.
  wait = f.settler.hold_or_settle(f.s, dispatch::Outcome::retry("busy", "", std::chrono::seconds(42)), "h",
                                  f.q.retry, std::chrono::seconds(0), hold_max);
  REQUIRE(wait);
  CHECK(*wait == std::chrono::seconds(42));
  CHECK(f.out.ops.empty());
}

TEST_CASE("settler: an ordered retry after the last attempt is dead-lettered as max_attempts", "[settler][ordering]") {
  Fixture f;
  f.s.attempt = f.q.retry.max_attempts;
  auto wait = f.settler.hold_or_settle(f.s, dispatch::Outcome::retry("busy", "down"), "h", f.q.retry,
                                       std::chrono::seconds(0), std::chrono::minutes(5));
  CHECK(!wait);
  CHECK(f.out.ops == std::vector<std::string>{"publish work.dlq"});
  CHECK(header(f.s.copy->get(), kReason) == "max_attempts");
  CHECK(header(f.s.copy->get(), kAttempts) == std::to_string(f.q.retry.max_attempts));
}

TEST_CASE("settler: a hold past ordering_hold_max is dead-lettered as ordering_hold_exceeded", "[settler][ordering]") {
  Fixture f;
  const auto hold_max = std::chrono::seconds(10);
  // Held 9.5 s: another second would pass 10 s.
  auto wait = f.settler.hold_or_settle(f.s, dispatch::Outcome::retry("busy", "down"), "h", f.q.retry,
                                       std::chrono::milliseconds(9500), hold_max);
  CHECK(!wait);
  REQUIRE(f.out.ops == std::vector<std::string>{"publish work.dlq"});
  CHECK(header(f.s.copy->get(), kReason) == "ordering_hold_exceeded");
  CHECK(header(f.s.copy->get(), kDetail).find("last error: busy: down") != std::string::npos);
  // Exactly at the bound is still allowed.
  Fixture g;
  wait = g.settler.hold_or_settle(g.s, dispatch::Outcome::retry("busy", ""), "h", g.q.retry,
                                  std::chrono::seconds(9), hold_max);
  CHECK(wait);
  CHECK(g.out.ops.empty());
}

TEST_CASE("settler: emits are published first; the ack waits for every confirm", "[settler][emit]") {
  Fixture f;
  f.settler.settle(f.s, f.ack_with({R"({"event_type":"a.one"})", R"({"event_type":"a.two","routing_key":"k2"})"}),
                   "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"emit a.one", "emit k2"});
  REQUIRE(f.s.emits);
  CHECK(f.s.emits->events[0].event_id == emit_event_id("evt-1", "h", 0));
  f.settler.emit_result(f.s, 1, CopyResult::Confirmed);
  CHECK(f.out.ops.size() == 2);  // still waiting for the first
  f.settler.emit_result(f.s, 0, CopyResult::Confirmed);
  CHECK(f.out.ops == std::vector<std::string>{"emit a.one", "emit k2", "succeeded", "ack"});
  CHECK(f.settler.stats().acked == 1);
}

TEST_CASE("settler: an unroutable emit dead-letters the original, naming it", "[settler][emit]") {
  Fixture f;
  f.settler.settle(f.s, f.ack_with({R"({"event_type":"a.one"})", R"({"event_type":"a.two"})"}), "h", f.q.retry);
  f.settler.emit_result(f.s, 0, CopyResult::Confirmed);
  f.settler.emit_result(f.s, 1, CopyResult::Returned);
  CHECK(f.out.ops.back() == "publish work.dlq");
  CHECK(header(f.s.copy->get(), kReason) == "emit_unroutable");
  std::string detail = header(f.s.copy->get(), kDetail);
  CHECK(detail.find("emit[1] (a.two, id " + emit_event_id("evt-1", "h", 1) + ")") == 0);
  CHECK(detail.find("routing key 'a.two' on exchange 'events'") != std::string::npos);
  f.settler.copy_result(f.s, CopyResult::Confirmed);
  CHECK(f.out.ops.back() == "ack");
  CHECK(std::count(f.out.ops.begin(), f.out.ops.end(), "succeeded") == 0);
}

TEST_CASE("settler: a refused emit hands the original back; a lost one drops it", "[settler][emit]") {
  Fixture f;
  f.settler.settle(f.s, f.ack_with({R"({"event_type":"a.one"})"}), "h", f.q.retry);
  f.settler.emit_result(f.s, 0, CopyResult::Refused);
  CHECK(f.out.ops.back().rfind("hand_back: the broker refused an emitted event", 0) == 0);

  Fixture g;
  g.settler.settle(g.s, g.ack_with({R"({"event_type":"a.one"})", R"({"event_type":"a.two"})"}), "h", g.q.retry);
  g.settler.emit_result(g.s, 0, CopyResult::Lost);
  g.settler.emit_result(g.s, 1, CopyResult::Confirmed);
  CHECK(g.out.ops.back() == "drop");

  // The connection is already gone: the first answer comes at once, and the
  // rest are not published.
  Fixture h;
  h.out.emit_now = [&](Settling& s, size_t i) { h.settler.emit_result(s, i, CopyResult::Lost); };
  h.settler.settle(h.s, h.ack_with({R"({"event_type":"a.one"})", R"({"event_type":"a.two"})"}), "h", h.q.retry);
  CHECK(h.out.ops == std::vector<std::string>{"emit a.one", "drop"});
}

TEST_CASE("settler: an invalid emit publishes nothing and dead-letters emit_invalid", "[settler][emit]") {
  Fixture f;
  f.settler.settle(f.s, f.ack_with({R"({"event_type":"a.one"})", "garbage"}), "h", f.q.retry);
  CHECK(f.out.ops == std::vector<std::string>{"publish work.dlq"});
  CHECK(header(f.s.copy->get(), kReason) == "emit_invalid");
  CHECK(header(f.s.copy->get(), kDetail).rfind("emit[1]: invalid JSON", 0) == 0);
}

TEST_CASE("settler: emits with retry or dead_letter are ignored; camel style is passed on", "[settler][emit]") {
  Fixture f;
  auto o = dispatch::Outcome::retry("busy", "");
  o.emits = {R"({"event_type":"a.one"})"};
  f.settler.settle(f.s, o, "h", f.q.retry);
  REQUIRE(f.out.ops.size() == 1);
  CHECK(f.out.ops[0].rfind("publish work.retry.", 0) == 0);
  CHECK_FALSE(f.s.emits);

  Fixture g;
  g.settler.settle(g.s, g.ack_with({R"({"event_type":"a.one"})"}), "h", g.q.retry, config::EmitStyle::Camel);
  REQUIRE(g.s.emits);
  CHECK(g.s.emits->events[0].body.find("\"eventId\":") != std::string::npos);
}
