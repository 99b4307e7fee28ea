#include <catch2/catch.hpp>

#include "dispatch/router.hpp"

using namespace er;

namespace {
struct NamedHandler : dispatch::Handler {
  using Handler::Handler;
  void start(dispatch::Job& job) override { job.finish(dispatch::Outcome::ack()); }
};

config::HandlerConfig handler(const std::string& name, std::vector<std::string> events) {
  config::HandlerConfig h;
  h.name = name;
  for (auto& e : events) h.events.emplace_back(e);
  return h;
}
}  // namespace

TEST_CASE("router: the first handler whose pattern matches wins; unmatched types are unhandled", "[router]") {
  config::QueueConfig q;
  q.name = "speaker.events";
  q.handlers.push_back(handler("onboarded", {"speaker.onboarded"}));
  q.handlers.push_back(handler("speaker-any", {"speaker.*", "legacy.#"}));
  dispatch::QueueRouter r(q);
  for (const auto& h : q.handlers) {
    dispatch::HandlerSlot s;
    s.cfg = &h;
    s.handler = std::make_unique<NamedHandler>(h.name);
    r.slots().push_back(std::move(s));
  }
  for (int round = 0; round < 2; ++round) {  // second round is served by the cache
    REQUIRE(r.route("speaker.onboarded")->handler->name() == "onboarded");
    REQUIRE(r.route("speaker.updated")->handler->name() == "speaker-any");
    REQUIRE(r.route("legacy")->handler->name() == "speaker-any");
    REQUIRE(r.route("legacy.a.b")->handler->name() == "speaker-any");
    REQUIRE(r.route("draft.ingested") == nullptr);
    REQUIRE(r.route("speaker.a.b") == nullptr);
    REQUIRE(r.route("") == nullptr);
  }
}

TEST_CASE("plan_warnings: TLS without certificate or hostname checks is flagged", "[router]") {
  config::Config c;
  c.broker.urls = {"amqps://h/"};
  c.broker.url = c.broker.urls[0];
  CHECK(dispatch::plan_warnings(c).empty());
  c.broker.tls.verify_hostname = false;
  auto w = dispatch::plan_warnings(c);
  REQUIRE(w.size() == 1);
  CHECK(w[0].find("broker.tls.verify_hostname is false") == 0);
  c.broker.tls.verify_peer = false;
  w = dispatch::plan_warnings(c);
  REQUIRE(w.size() == 1);
  CHECK(w[0].find("broker.tls.verify_peer is false") == 0);
}

TEST_CASE("plan_warnings: an ordered hold that could reach the broker's consumer timeout is flagged", "[router]") {
  config::Config c;
  config::QueueConfig q;
  q.name = "q";
  config::HandlerConfig h;
  h.name = "h";
  h.kind = config::HandlerKind::Exec;
  h.ordering = config::Ordering::Aggregate;
  q.handlers.push_back(h);
  c.queues.push_back(q);
  CHECK(dispatch::plan_warnings(c).empty());  // 5 min + 30 s
  c.queues[0].ordering_hold_max = std::chrono::minutes(29);
  c.queues[0].handlers[0].timeout = std::chrono::minutes(1);
  auto w = dispatch::plan_warnings(c);
  REQUIRE(w.size() == 1);
  CHECK(w[0].find("handler 'h': ordering_hold_max + timeout (1800s)") == 0);
  c.queues[0].handlers[0].ordering = config::Ordering::None;
  CHECK(dispatch::plan_warnings(c).empty());
}

TEST_CASE("plan_warnings: a timeout at the broker's ack timeout is flagged, plugins too", "[router]") {
  config::Config c;
  config::QueueConfig q;
  auto h = handler("async", {"#"});
  h.kind = config::HandlerKind::Plugin;
  h.timeout = std::chrono::minutes(30) - std::chrono::seconds(2);  // kill_grace does not apply to plugins
  q.handlers.push_back(h);
  c.queues.push_back(q);
  CHECK(dispatch::plan_warnings(c).empty());
  c.queues[0].handlers[0].timeout = std::chrono::minutes(30);
  auto w = dispatch::plan_warnings(c);
  REQUIRE(w.size() == 1);
  CHECK(w[0].find("handler 'async': timeout (1800s) is not below the broker's consumer acknowledgement timeout") == 0);
  // The same timeout less 2 s on an exec handler: its 5 s kill_grace counts.
  c.queues[0].handlers[0].kind = config::HandlerKind::Exec;
  c.queues[0].handlers[0].timeout = std::chrono::minutes(30) - std::chrono::seconds(2);
  w = dispatch::plan_warnings(c);
  REQUIRE(w.size() == 1);
  CHECK(w[0].find("handler 'async': timeout + kill_grace (1803s)") == 0);
}
