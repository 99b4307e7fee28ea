// decode_validate(): one parse that decodes and validates must answer
// exactly what decode() followed by validate() answers, wherever the event
// type comes from and however long the body is.
#include <catch2/catch.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "event/envelope.hpp"
#include "event/schema.hpp"

using er::event::DecodeStatus;
using er::event::Envelope;
using er::event::SchemaSet;

namespace {

const std::string kShipped = std::string(ER_SOURCE_DIR) + "/config/schemas/events";

const std::string kPayload = R"({"speaker_id":"1","external_id":"ext-1","name":"John Doe","bucket":"GOOD"})";
const std::string kHead = R"("event_id":"e-1","aggregate_id":"a-1","timestamp":"2026-11-28T02:34:17Z","version":1)";

struct Result {
  DecodeStatus status;
  Envelope env;
  std::string detail;
  bool valid;
};

Result two_passes(const SchemaSet& set, const std::string& body, const std::string& rk) {
  Result r;
  r.status = er::event::decode(body.data(), body.size(), rk, r.env, r.detail);
  r.valid = true;
  if (r.status == DecodeStatus::Ok) r.valid = set.validate(body.data(), body.size(), r.env.event_type, r.detail);
  return r;
}

Result one_pass(const SchemaSet& set, const std::string& body, const std::string& rk) {
  Result r;
  r.detail = "stale";
  r.valid = false;
  r.status = set.decode_validate(body.data(), body.size(), rk, r.env, r.detail, r.valid);
  if (r.status != DecodeStatus::Ok) r.valid = true;  // not asked
  return r;
}

void same(const Result& a, const Result& b) {
  CHECK(static_cast<int>(a.status) == static_cast<int>(b.status));
  CHECK(a.detail == b.detail);
  CHECK(a.valid == b.valid);
  CHECK(a.env.event_id == b.env.event_id);
  CHECK(a.env.event_type == b.env.event_type);
  CHECK(a.env.aggregate_id == b.env.aggregate_id);
  CHECK(a.env.timestamp == b.env.timestamp);
  CHECK(a.env.version == b.env.version);
  CHECK(a.env.type_from_routing_key == b.env.type_from_routing_key);
}

// A large array in the payload: hundreds of parser events before what follows.
std::string filler(size_t n) {
  std::string s = "[";
  for (size_t i = 0; i < n; ++i) s += (i ? ",\"" : "\"") + std::to_string(i) + "\"";
  return s + "]";
}

}  // namespace

TEST_CASE("decode_validate: the same answers as decode() then validate()", "[schema][decode]") {
  auto set = SchemaSet::load(kShipped);
  const std::string bad_payload = R"({"speaker_id":"1","external_id":"ext-1","name":"John Doe"})";  // no bucket
  const std::string big = filler(400);  // past the replay buffer
  const std::string long_text = "\"" + std::string(5000, 'x') + "\"";
  struct Case {
    const char* name;
    std::string body;
    std::string rk;
    int expect_valid;  // 1 valid, 0 invalid, -1 a decode error
  };
  const std::vector<Case> cases = {
      {"snake, type second", R"({"event_id":"e-1","event_type":"speaker.onboarded","payload":)" + kPayload + "}",
       "speaker.onboarded", 1},
      {"camel", R"({"eventId":"e-1","eventType":"speaker.onboarded","payload":)" + kPayload + "}", "x.y", 1},
      {"type schema fails", R"({"event_id":"e-1","event_type":"speaker.onboarded","payload":)" + bad_payload + "}",
       "speaker.onboarded", 0},
      {"envelope fails first", R"({"event_id":".bad","event_type":"speaker.onboarded","payload":)" + bad_payload + "}",
       "speaker.onboarded", 0},
      {"envelope fails: no event_id", R"({"event_type":"speaker.onboarded","payload":)" + kPayload + "}",
       "speaker.onboarded", 0},
      {"type last", "{" + kHead + R"(,"payload":)" + bad_payload + R"(,"event_type":"speaker.onboarded"})", "a.b", 0},
      {"type last, valid", "{" + kHead + R"(,"payload":)" + kPayload + R"(,"event_type":"speaker.onboarded"})",
       "a.b", 1},
      {"type only from the routing key, invalid", "{" + kHead + R"(,"payload":)" + bad_payload + "}",
       "speaker.onboarded", 0},
      {"type only from the routing key: the envelope schema wants one", "{" + kHead + R"(,"payload":)" + kPayload + "}",
       "speaker.onboarded", 0},
      {"routing key differs from the body's type", R"({"event_id":"e-1","event_type":"speaker.onboarded","payload":)" +
       bad_payload + "}", "draft.ingested", 0},
      {"a type without a schema", R"({"event_id":"e-1","event_type":"other.thing","payload":{}})", "speaker.onboarded",
       1},
      {"null, then the camel spelling", R"({"event_id":"e-1","event_type":null,"eventType":"speaker.onboarded",)"
       R"("payload":)" + bad_payload + "}", "x", 0},
      {"an integer event type", R"({"event_id":"e-1","event_type":5})", "speaker.onboarded", 1},
      {"type after hundreds of events", R"({"event_id":"e-1","payload":{"speaker_id":"1","list":)" + big +
       R"(},"event_type":"speaker.onboarded"})", "x", 0},
      {"type after a long string", R"({"event_id":"e-1","note":)" + long_text +
       R"(,"payload":)" + bad_payload + R"(,"event_type":"speaker.onboarded"})", "x", 0},
      {"type after hundreds of events, valid", R"({"event_id":"e-1","payload":{"speaker_id":"1","external_id":"x",)"
       R"("name":"n","bucket":"b","list":)" + big + R"(},"event_type":"speaker.onboarded"})", "x", 1},
      {"the type schema fails before the envelope's, type last",
       R"({"payload":{"speaker_id":1},"event_id":".bad","event_type":"speaker.onboarded"})", "x", 0},
      {"the same after hundreds of events",
       R"({"payload":{"speaker_id":1,"list":)" + big + R"(},"event_id":".bad","event_type":"speaker.onboarded"})",
       "x", 0},
      {"the envelope fails first, type last", R"({"event_id":".bad","payload":{"speaker_id":1},)"
       R"("event_type":"speaker.onboarded"})", "x", 0},
      {"invalid JSON", R"({"event_id":"e-1","event_type":"speaker.onboarded",)", "x", -1},
      {"not an object", "[1,2]", "x", -1},
      {"too long a field", R"({"event_id":")" + std::string(300, 'i') + R"(","event_type":"a"})", "x", -1},
      {"no type at all", R"({"event_id":"e-1"})", "", -1},
      {"trailing NUL", std::string(R"({"event_id":"e-1"})") + std::string(1, '\0') + "x", "a", -1},
  };
  // The same bodies against type schemas alone (no envelope.json), where an
  // event type taken from the routing key meets its schema.
  char tmpl[] = "/tmp/er-dv-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  std::filesystem::copy_file(kShipped + "/speaker.onboarded.json", std::string(tmpl) + "/speaker.onboarded.json");
  auto types_only = SchemaSet::load(tmpl);
  std::filesystem::remove_all(tmpl);
  for (const auto& c : cases) {
    INFO(c.name << " (types only)");
    same(two_passes(*types_only, c.body, c.rk), one_pass(*types_only, c.body, c.rk));
  }
  const std::string from_rk = "{" + kHead + R"(,"payload":)" + bad_payload + "}";
  const std::string large_from_rk = R"({"event_id":"e-1","payload":{"speaker_id":"1","list":)" + big + "}}";
  for (const auto* body : {&from_rk, &large_from_rk}) {
    Result b = one_pass(*types_only, *body, "speaker.onboarded");
    CHECK(b.status == DecodeStatus::Ok);
    CHECK(b.env.type_from_routing_key);
    CHECK_FALSE(b.valid);
    CHECK(b.detail.find("speaker.onboarded.json: required") == 0);
  }

  for (const auto& c : cases) {
    INFO(c.name);
    Result b = one_pass(*set, c.body, c.rk);
    same(two_passes(*set, c.body, c.rk), b);
    if (c.expect_valid < 0) {
      CHECK(b.status != DecodeStatus::Ok);
    } else {
      CHECK(b.status == DecodeStatus::Ok);
      CHECK(b.valid == (c.expect_valid == 1));
      if (!b.valid) CHECK_FALSE(b.detail.empty());
    }
  }
}

TEST_CASE("decode_validate: a schema set without schemas only decodes", "[schema][decode]") {
  char tmpl[] = "/tmp/er-dv-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  auto set = SchemaSet::load(tmpl);
  Envelope env;
  std::string detail;
  bool valid = false;
  const std::string body = R"({"event_id":"e-1","event_type":"a.b"})";
  CHECK(set->decode_validate(body.data(), body.size(), "", env, detail, valid) == DecodeStatus::Ok);
  CHECK(valid);
  CHECK(env.event_type == "a.b");
  rmdir(tmpl);
}
