// Building the envelopes of emitted events: deterministic ids, what they
// inherit, both styles, and a defined outcome for every kind of garbage.
#include <catch2/catch.hpp>

#include <rapidjson/document.h>

#include <set>
#include <string>
#include <vector>

#include "event/schema.hpp"
#include "settle/emit.hpp"

using namespace er;
using namespace er::settle;

namespace {

const std::string kSchemas = std::string(ER_SOURCE_DIR) + "/config/schemas/events";

struct Built {
  bool ok = false;
  std::vector<EmittedEvent> events;
  std::string error;
};

Built build(const std::vector<std::string>& emits, EmitTrigger t = {"evt-1", "corr-9", "{}", "rag-worker"},
            EmitOptions o = {}) {
  if (o.timestamp.empty()) o.timestamp = "2026-12-01T10:00:00.000Z";
  Built b;
  b.ok = build_emits(emits, t, o, b.events, b.error);
  return b;
}

rapidjson::Document parse(const std::string& body) {
  rapidjson::Document d;
  d.Parse(body.c_str());
  REQUIRE(d.IsObject());
  return d;
}

std::string str(const rapidjson::Document& d, const char* key) {
  auto it = d.FindMember(key);
  if (it == d.MemberEnd()) return "<absent>";
  return it->value.IsString() ? it->value.GetString() : "<not a string>";
}

}  // namespace

TEST_CASE("emit ids: UUID v5 over trigger, handler and position; stable across calls", "[emit]") {
  // Expected values from Python's uuid.uuid5 over the documented name
  // ("5:evt-1,10:rag-worker,0"): an implementation in another language agrees.
  CHECK(emit_event_id("evt-1", "rag-worker", 0) == "08b2a510-3384-5efc-a38f-afaa21d736e4");
  CHECK(emit_event_id("evt-1", "rag-worker", 1) == "c8e1c8c2-be57-5c84-82da-7510954ce9b1");
  std::set<std::string> ids;
  for (const char* trigger : {"evt-1", "evt-2"})
    for (const char* handler : {"a", "b"})
      for (size_t i = 0; i < 3; ++i) ids.insert(emit_event_id(trigger, handler, i));
  CHECK(ids.size() == 12);
  // The netstring name keeps ("ab", "c") and ("a", "bc") apart.
  CHECK(emit_event_id("ab", "c", 0) != emit_event_id("a", "bc", 0));
}

TEST_CASE("emit: snake_case envelope inheriting correlation and causation", "[emit]") {
  auto b = build({R"({"event_type":"rag.dfn_generated","aggregate_id":"d-1","aggregate_type":"Draft",)"
                  R"("payload":{"dfn":"x","n":[1,2]}})",
                  R"({"event_type":"draft.ingested","routing_key":"custom.key","version":3})"});
  REQUIRE(b.ok);
  REQUIRE(b.events.size() == 2);
  const auto& e0 = b.events[0];
  CHECK(e0.event_id == emit_event_id("evt-1", "rag-worker", 0));
  CHECK(e0.event_type == "rag.dfn_generated");
  CHECK(e0.routing_key == "rag.dfn_generated");
  CHECK(e0.correlation_id == "corr-9");
  auto d0 = parse(e0.body);
  CHECK(str(d0, "event_id") == e0.event_id);
  CHECK(str(d0, "event_type") == "rag.dfn_generated");
  CHECK(str(d0, "timestamp") == "2026-12-01T10:00:00.000Z");
  CHECK(d0["version"].GetInt() == 1);
  CHECK(str(d0, "aggregate_id") == "d-1");
  CHECK(str(d0, "aggregate_type") == "Draft");
  CHECK(str(d0, "correlation_id") == "corr-9");
  CHECK(str(d0, "causation_id") == "evt-1");
  CHECK(d0["payload"]["n"][1].GetInt() == 2);
  CHECK(str(d0, "eventId") == "<absent>");

  const auto& e1 = b.events[1];
  CHECK(e1.event_id == emit_event_id("evt-1", "rag-worker", 1));
  CHECK(e1.routing_key == "custom.key");
  auto d1 = parse(e1.body);
  CHECK(d1["version"].GetInt() == 3);
  CHECK(d1["payload"].IsObject());
  CHECK(d1["payload"].MemberCount() == 0);
  CHECK(str(d1, "aggregate_id") == "<absent>");
}

TEST_CASE("emit: camelCase envelope for emit: {style: camel}", "[emit]") {
  EmitOptions o;
  o.style = config::EmitStyle::Camel;
  auto b = build({R"({"event_type":"rag.dfn_generated","aggregate_id":"d-1","aggregate_type":"Draft"})"},
                 {"evt-1", "corr-9", "{}", "h"}, o);
  REQUIRE(b.ok);
  auto d = parse(b.events[0].body);
  CHECK(str(d, "eventId") == b.events[0].event_id);
  CHECK(str(d, "eventType") == "rag.dfn_generated");
  CHECK(str(d, "aggregateId") == "d-1");
  CHECK(str(d, "aggregateType") == "Draft");
  CHECK(str(d, "correlationId") == "corr-9");
  CHECK(str(d, "causationId") == "evt-1");
  CHECK(str(d, "timestamp") == "2026-12-01T10:00:00.000Z");
  for (const char* snake : {"event_id", "event_type", "aggregate_id", "correlation_id", "causation_id"})
    CHECK(str(d, snake) == "<absent>");
}

TEST_CASE("emit: no correlation id inherits the event id; no event id seeds from the body", "[emit]") {
  auto b = build({R"({"event_type":"a.b"})"}, {"evt-7", "", "{}", "h"});
  REQUIRE(b.ok);
  CHECK(b.events[0].correlation_id == "evt-7");
  CHECK(str(parse(b.events[0].body), "correlation_id") == "evt-7");

  auto x1 = build({R"({"event_type":"a.b"})"}, {"", "", R"({"event_type":"x"})", "h"});
  auto x2 = build({R"({"event_type":"a.b"})"}, {"", "", R"({"event_type":"x"})", "h"});
  auto y = build({R"({"event_type":"a.b"})"}, {"", "", R"({"event_type":"y"})", "h"});
  REQUIRE(x1.ok);
  CHECK(x1.events[0].event_id == x2.events[0].event_id);
  CHECK(x1.events[0].event_id != y.events[0].event_id);
  auto d = parse(x1.events[0].body);
  CHECK(str(d, "causation_id") == "<absent>");
  CHECK(str(d, "correlation_id") == "<absent>");
  CHECK(x1.events[0].correlation_id.empty());
}

TEST_CASE("emit: a retried handler builds the same ids; another handler different ones", "[emit]") {
  std::vector<std::string> emits = {R"({"event_type":"a.b"})", R"({"event_type":"a.c"})"};
  auto first = build(emits, {"evt-1", "", "{}", "h1"});
  auto again = build(emits, {"evt-1", "", "{}", "h1"});
  auto other = build(emits, {"evt-1", "", "{}", "h2"});
  REQUIRE((first.ok && again.ok && other.ok));
  for (size_t i = 0; i < 2; ++i) {
    CHECK(first.events[i].event_id == again.events[i].event_id);
    CHECK(first.events[i].event_id != other.events[i].event_id);
  }
  CHECK(first.events[0].event_id != first.events[1].event_id);
}

TEST_CASE("emit: garbage has a defined error naming the index (and type when known)", "[emit]") {
  struct Case {
    std::string emit;
    std::string error;
  };
  const std::vector<Case> cases = {
      {"not json", "emit[1]: invalid JSON"},
      {"[1,2]", "emit[1]: not a JSON object"},
      {R"("a.b")", "emit[1]: not a JSON object"},
      {R"({})", "emit[1]: no event_type"},
      {R"({"eventType":"a.b"})", "emit[1]: no event_type (the keys of an emit object are snake_case"},
      {R"({"event_type":""})", "emit[1]: 'event_type' must be a non-empty string"},
      {R"({"event_type":7})", "emit[1]: 'event_type' must be a non-empty string"},
      {R"({"event_type":")" + std::string(256, 't') + R"("})", "emit[1]: 'event_type' must be"},
      {R"({"event_type":"a.b","payload":[1]})", "emit[1] (a.b): 'payload' must be a JSON object"},
      {R"({"event_type":"a.b","payload":"x"})", "emit[1] (a.b): 'payload' must be a JSON object"},
      {R"({"event_type":"a.b","routing_key":""})", "emit[1] (a.b): 'routing_key' must be"},
      {R"({"event_type":"a.b","aggregate_id":5})", "emit[1] (a.b): 'aggregate_id' must be"},
      {R"({"event_type":"a.b","version":0})", "emit[1] (a.b): 'version' must be a positive integer"},
      {R"({"event_type":"a.b","version":"1"})", "emit[1] (a.b): 'version' must be a positive integer"},
      {R"({"event_type":"a.b","event_id":"mine"})", "emit[1]: 'event_id' is the daemon's to set"},
      {R"({"event_type":"a.b","causationId":"x"})", "emit[1]: 'causationId' is the daemon's to set"},
      {R"({"event_type":"a.b","timestamp":"x"})", "emit[1]: 'timestamp' is the daemon's to set"},
      {R"({"event_type":"a.b","event_type":"c.d"})", "emit[1]: duplicate key 'event_type'"},
      {std::string(100, '[') + std::string(100, ']'), "emit[1]: nested deeper than 64 levels"},
      {R"({"event_type":"a.b","payload":)" + std::string(70, '[') + std::string(70, ']') + "}",
       "emit[1]: nested deeper than 64 levels"},
      {"{\"event_type\":\"a\xff\"}", "emit[1]: invalid JSON"},
  };
  for (const auto& c : cases) {
    INFO(c.emit.substr(0, 80));
    auto b = build({R"({"event_type":"ok.first"})", c.emit});
    CHECK_FALSE(b.ok);
    CHECK(b.events.empty());  // all or nothing
    CHECK(b.error.rfind(c.error, 0) == 0);
    INFO(b.error);
  }
  // Unknown keys are ignored (later versions may add some).
  CHECK(build({R"({"event_type":"a.b","later_field":{"x":1}})"}).ok);
}

TEST_CASE("emit: caps on count, total bytes and each envelope's size", "[emit]") {
  std::vector<std::string> many(kMaxEmits, R"({"event_type":"a.b"})");
  CHECK(build(many).ok);
  many.push_back(R"({"event_type":"a.b"})");
  auto b = build(many);
  CHECK_FALSE(b.ok);
  CHECK(b.error == "1001 emitted events, at most 1000");

  std::string big = R"({"event_type":"a.b","payload":{"s":")" + std::string(kMaxEmitTotalBytes, 'x') + "\"}}";
  b = build({big});
  CHECK_FALSE(b.ok);
  CHECK(b.error.find("bytes together, at most 16777216") != std::string::npos);

  EmitOptions o;
  o.max_event_bytes = 1000;
  b = build({R"({"event_type":"a.b","payload":{"s":")" + std::string(2000, 'x') + "\"}}"}, {"e", "", "{}", "h"}, o);
  CHECK_FALSE(b.ok);
  CHECK(b.error.find("emit[0] (a.b): the event is ") == 0);
  CHECK(b.error.find("over max_message_bytes 1000") != std::string::npos);
}

TEST_CASE("emit: validated against the configured schemas, the error names the event", "[emit]") {
  auto schemas = event::SchemaSet::load(kSchemas);
  EmitOptions o;
  o.schemas = schemas.get();
  // The shipped envelope.json wants ids safe for file names: ours are UUIDs.
  auto ok = build({R"({"event_type":"rag.dfn_generated","payload":{"dfn":"x"}})"}, {"evt-1", "", "{}", "h"}, o);
  CHECK(ok.ok);
  auto bad = build({R"({"event_type":"rag.dfn_generated"})", R"({"event_type":"speaker.onboarded","payload":{}})"},
                   {"evt-1", "", "{}", "h"}, o);
  REQUIRE_FALSE(bad.ok);
  CHECK(bad.error.rfind("emit[1] (speaker.onboarded): schema violation: speaker.onboarded.json", 0) == 0);
}

TEST_CASE("emit: publish properties", "[emit]") {
  auto b = build({R"({"event_type":"a.b"})"});
  REQUIRE(b.ok);
  const auto& e = b.events[0];
  amqp_basic_properties_t p = e.properties(1700000000);
  auto s = [](amqp_bytes_t x) { return std::string(static_cast<const char*>(x.bytes), x.len); };
  CHECK(s(p.content_type) == "application/json");
  CHECK(p.delivery_mode == 2);
  CHECK(s(p.message_id) == e.event_id);
  CHECK(s(p.type) == "a.b");
  CHECK(s(p.correlation_id) == "corr-9");
  CHECK(p.timestamp == 1700000000u);
  CHECK((p._flags & AMQP_BASIC_CORRELATION_ID_FLAG) != 0);
  EmittedEvent none = e;
  none.correlation_id.clear();
  CHECK((none.properties(1)._flags & AMQP_BASIC_CORRELATION_ID_FLAG) == 0);
}
