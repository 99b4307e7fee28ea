// Planned validation (schema_plan.hpp) must accept and refuse exactly what
// RapidJSON's validator fed every parser event (Validation::Generic) does,
// with the same details: the shipped envelope on a corpus of its own, then
// many schema shapes on generated bodies, through validate() and
// decode_validate(). And which shapes get which plan.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "event/envelope.hpp"
#include "event/schema.hpp"
#include "event/schema_plan.hpp"
#include "temp_dir.hpp"

using er::event::DecodeStatus;
using er::event::Envelope;
using er::event::SchemaSet;
using er::event::Validation;
namespace plan = er::event::plan;

namespace {

const std::string kShipped = std::string(ER_SOURCE_DIR) + "/config/schemas/events";

// "" when valid, else the detail.
std::string check(const SchemaSet& set, const std::string& body, std::string_view type) {
  std::string detail = "stale";
  return set.validate(body.data(), body.size(), type, detail) ? "" : detail;
}

// decode_validate()'s whole answer, as one string.
std::string one_pass(const SchemaSet& set, const std::string& body, const std::string& rk) {
  Envelope env;
  std::string detail = "stale";
  bool valid = false;
  DecodeStatus st = set.decode_validate(body.data(), body.size(), rk, env, detail, valid);
  return std::string(er::event::reason_code(st)) + (st == DecodeStatus::Ok ? (valid ? " valid" : " invalid") : "") +
         " [" + detail + "] " + env.event_type + " " + env.event_id;
}

std::unique_ptr<plan::Plan> plan_of(const std::string& schema) {
  rapidjson::Document d;
  d.Parse(schema.c_str());
  REQUIRE_FALSE(d.HasParseError());
  return plan::make(d);
}

const plan::RootKey* key(const plan::Plan& p, const std::string& name) { return p.find(name.data(), name.size()); }

}  // namespace

TEST_CASE("schema plan: the shipped envelope, each alternative and each mistake", "[schema][plan]") {
  auto planned = SchemaSet::load(kShipped);
  auto generic = SchemaSet::load(kShipped, Validation::Generic);
  const std::string payload = R"("payload":{"speaker_id":"1","external_id":"x","name":"n","bucket":"b"})";
  const std::string ts = R"("timestamp":"2026-11-28T02:34:17Z")";
  const std::string no_id = "envelope.json: required: missing property 'event_id' or 'eventId' at #";
  const std::string no_type = "envelope.json: required: missing property 'event_type' or 'eventType' at #";
  struct Case {
    std::string body;
    std::string detail;  // "" valid
    std::string type = "speaker.onboarded";
  };
  const std::vector<Case> cases = {
      // Each spelling of each field, every combination.
      {R"({"event_id":"e-1","event_type":"speaker.onboarded",)" + payload + "}", ""},
      {R"({"eventId":"e-1","eventType":"speaker.onboarded",)" + payload + "}", ""},
      {R"({"event_id":"e-1","eventType":"speaker.onboarded",)" + payload + "}", ""},
      {R"({"eventId":"e-1","event_type":"speaker.onboarded",)" + payload + "}", ""},
      {R"({"event_id":"e-1","eventId":"e-2","event_type":"speaker.onboarded","eventType":"x",)" + payload + "}", ""},
      // Present is enough for `required`, whatever the value (the decoder has its own rules).
      {R"({"event_id":"e-1","event_type":null,"eventType":"speaker.onboarded",)" + payload + "}", ""},
      {R"({)" + payload + R"(,"eventType":"speaker.onboarded","eventId":"e-1"})", ""},  // order is free
      // Missing fields.
      {R"({"event_type":"speaker.onboarded",)" + payload + "}", no_id},
      {R"({"eventType":"speaker.onboarded",)" + payload + "}", no_id},
      {R"({"event_id":"e-1",)" + payload + "}", no_type},
      {R"({"eventId":"e-1",)" + ts + "," + payload + "}", no_type},
      {R"({"event":"e-1","eventtype":"speaker.onboarded","EventId":"e",)" + payload + "}", no_id},
      {R"({"speaker_id":"1","payload":{"event_id":"e-1","event_type":"speaker.onboarded"}})",  // not at the root
       "speaker.onboarded.json: required: missing properties 'speaker_id', 'external_id', 'name', 'bucket' at #/payload"},
      {R"({"speaker_id":"1","payload":{"event_id":"e-1","event_type":"speaker.onboarded"}})", no_id, "draft.ingested"},
      // Wrong types and values, before the missing alternative is noticed.
      {R"({"event_id":7,"event_type":"speaker.onboarded",)" + payload + "}",
       "envelope.json: type: expected string, got integer at #/event_id"},
      {R"({"eventId":".x","eventType":"speaker.onboarded",)" + payload + "}",
       "envelope.json: pattern: '.x' does not match at #/eventId"},
      {R"({"eventId":".x",)" + payload + "}", "envelope.json: pattern: '.x' does not match at #/eventId"},
      {R"({"event_type":"speaker.onboarded","version":"1",)" + payload + "}",
       "envelope.json: type: expected integer, got string at #/version"},
      {R"({"event_id":"e-1","event_type":"speaker.onboarded","timestamp":"yesterday",)" + payload + "}",
       "envelope.json: pattern: 'yesterday' does not match at #/timestamp"},
      {R"({"event_id":"e-1","event_type":"speaker.onboarded","payload":[1,2]})",
       "envelope.json: type: expected object, got array at #/payload"},
      {R"({"event_type":"speaker.onboarded","payload":"p"})", "envelope.json: type: expected object, got string at #/payload"},
      // The type schema's own checks.
      {R"({"event_id":"e-1","event_type":"speaker.onboarded","payload":{"speaker_id":"1"}})",
       "speaker.onboarded.json: required: missing properties 'external_id', 'name', 'bucket' at #/payload"},
      {R"({"event_id":"e-1","event_type":"speaker.onboarded"})",
       "speaker.onboarded.json: required: missing property 'payload' at #"},
      {R"({"event_type":"speaker.onboarded"})", no_id},  // both fail at the root's end: the envelope's first
      // Not an object at all.
      {R"(["event_id","event_type"])", "envelope.json: type: expected object, got array at #"},
      {R"("event_id")", "envelope.json: type: expected object, got string at #"},
  };
  for (const auto& c : cases) {
    INFO(c.body);
    CHECK(check(*planned, c.body, c.type) == c.detail);
    CHECK(check(*generic, c.body, c.type) == c.detail);
    CHECK(one_pass(*planned, c.body, c.type) == one_pass(*generic, c.body, c.type));
  }
}

TEST_CASE("schema plan: which shapes get which plan", "[schema][plan]") {
  rapidjson::Document env;
  std::ifstream in(kShipped + "/envelope.json");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  env.Parse(text.c_str());
  auto p = plan::make(env);
  REQUIRE(p);
  CHECK(p->has_formula);
  CHECK(p->prune);
  CHECK_FALSE(p->stripped_source.HasMember("allOf"));
  CHECK(p->stripped_source.HasMember("definitions"));
  CHECK(key(*p, "event_id")->action == plan::Member::Feed);    // a pattern
  CHECK(key(*p, "version")->action == plan::Member::Kind);     // only a type
  CHECK(key(*p, "payload")->action == plan::Member::Kind);
  CHECK(key(*p, "event_type")->action == plan::Member::Skip);  // only its presence matters
  CHECK(key(*p, "event_type")->bit >= 0);
  CHECK(key(*p, "aggregate_id") == nullptr);
  CHECK(p->other == plan::Member::Skip);
  CHECK(p->first_failure(0, false) == plan::kKeywords);  // `required` holds for a non-object
  CHECK(p->first_failure(0, true) == plan::kAllOf);

  // A branch that is more than `required`: RapidJSON runs it all.
  CHECK_FALSE(plan_of(R"({"anyOf":[{"required":["a"]},{"properties":{"a":{"type":"string"}}}]})"));
  // allOf taken, but anyOf is not: neither is.
  CHECK_FALSE(plan_of(R"({"allOf":[{"required":["a"]}],"anyOf":[{"type":"object"}]})"));
  // A $ref to the root, or into what would be taken out.
  CHECK_FALSE(plan_of(R"({"anyOf":[{"required":["a"]}],"properties":{"c":{"$ref":"#"}}})"));
  CHECK_FALSE(plan_of(R"({"anyOf":[{"required":["a"]}],"properties":{"c":{"$ref":"#/anyOf/0"}}})"));
  CHECK_FALSE(plan_of(R"({"$ref":"#/definitions/x","definitions":{"x":{"type":"object"}}})"));
  // Members pruned, no formula.
  p = plan_of(R"({"type":"object","required":["r"],"properties":{"a":{"type":"array"},"b":{"enum":[1]}},
                  "dependencies":{"d":["e"]},"additionalProperties":{"description":"anything"}})");
  REQUIRE(p);
  CHECK_FALSE(p->has_formula);
  CHECK(key(*p, "a")->action == plan::Member::Kind);
  CHECK(key(*p, "b")->action == plan::Member::Feed);
  CHECK(key(*p, "r")->action == plan::Member::Kind);  // required: its name is tracked
  CHECK(key(*p, "d")->action == plan::Member::Kind);
  CHECK(key(*p, "e")->action == plan::Member::Kind);
  CHECK(p->other == plan::Member::Skip);
  CHECK(plan_of(R"({"additionalProperties":false})")->other == plan::Member::Feed);
  CHECK(plan_of(R"({"additionalProperties":{"type":"string"}})")->other == plan::Member::Kind);
  CHECK(plan_of(R"({"additionalProperties":{"minLength":2}})")->other == plan::Member::Feed);
  // Root keywords that look into the members' values: no pruning.
  CHECK_FALSE(plan_of(R"({"patternProperties":{"^x":{"type":"string"}}})"));
  CHECK_FALSE(plan_of(R"({"dependencies":{"a":{"required":["b"]}}})"));
  CHECK_FALSE(plan_of(R"({"enum":[{"a":1}]})"));
  CHECK_FALSE(plan_of(R"({"properties":{"a":{}},"properties":{"b":{}}})"));
  p = plan_of(R"({"not":{"required":["legacy"]},"patternProperties":{"^x":{}}})");
  REQUIRE(p);
  CHECK(p->has_formula);
  CHECK_FALSE(p->prune);
  CHECK(p->first_failure(uint64_t{1} << key(*p, "legacy")->bit, true) == plan::kNot);
  CHECK(p->first_failure(0, false) == plan::kNot);  // a non-object has every `required`
}

TEST_CASE("schema plan: the same answers as the generic validator, shape after shape", "[schema][plan]") {
  // Each set: an envelope.json (or none) and t.json; bodies are checked as type t.
  const std::vector<std::pair<std::string, std::string>> sets = {
      {"", ""},  // the shipped folder
      {R"({"type":"object","oneOf":[{"required":["a"]},{"required":["b"]}],"not":{"required":["legacy"]},
           "required":["v"],"properties":{"v":{"type":"integer"},"o":{"type":"object"},"a":{},"b":{"type":"string"},
           "legacy":{},"c":{},"arr":{}},"additionalProperties":false})",
       R"({"type":"object","properties":{"o":{"type":"object","required":["k"]}}})"},
      {R"({"anyOf":[{"required":["a","b"]},{"allOf":[{"required":["c"]},{"not":{"required":["a"]}}]}],
           "allOf":[{"anyOf":[{"required":["v"]},{}]}],"minProperties":2,"maxProperties":5,
           "properties":{"a":{"type":["string","null"]},"c":{},"arr":{"type":"array","title":"t"}},
           "dependencies":{"b":["v"]},"additionalProperties":{"type":"string"}})",
       R"({"required":["o"],"properties":{"o":{"$ref":"#/definitions/o"},"arr":{"maxItems":1}},
           "definitions":{"o":{"type":"object","additionalProperties":{"type":"integer"}}}})"},
      {R"({"anyOf":[{"required":["a"]},{"properties":{"a":{"type":"string"}},"required":["b"]}],
           "properties":{"o":{"$ref":"#"}}})",
       R"({"patternProperties":{"^a":{"type":"string"}},"properties":{"v":{"type":"integer"}},
           "dependencies":{"c":{"required":["a"]}}})"},
      {R"({"not":{"anyOf":[{"required":["a"]},{"required":["b"]}]},"properties":{"v":{"enum":[1,"1"]}}})",
       R"({"type":["object","array"],"items":{"type":"integer"},"properties":{"arr":{"type":"array"},"o":{}}})"},
  };
  // Root members to combine, valid and not for the various schemas; the
  // first 19 are the ones the sets above name.
  const std::vector<std::string> members = {
      R"("a":"s")", R"("a":null)", R"("a":1)", R"("b":"s")", R"("b":{})", R"("c":"s")", R"("c":[1,{"x":[]}])",
      R"("v":1)", R"("v":"1")", R"("v":1.5)", R"("o":{})", R"("o":{"k":1})", R"("o":{"k":"x","y":[null]})",
      R"("o":[1])", R"("o":{"o":{"a":1}})", R"("legacy":true)", R"("arr":[1,2])", R"("arr":[])", R"("arr":{"0":1})",
      R"("x1":"s")", R"("x2":{"deep":[1,{"a":null}]})", R"("a/b~c":2)", R"("":0)",
      R"("event_id":"e-1")", R"("eventId":".bad")", R"("event_type":"t")", R"("eventType":"t")",
      R"("event_type":null)", R"("timestamp":"2026-11-28T02:34:17Z")", R"("timestamp":"no")", R"("version":1)",
      R"("payload":{"speaker_id":"1","external_id":"x","name":"n","bucket":"b"})", R"("payload":{"k":[]})",
      R"("payload":7)",
  };
  std::vector<std::string> bodies = {"[]", "[1,2]", "[\"a\"]", "\"x\"", "1", "null", "{}", R"([{"a":1}])", "{", "",
                                     R"({"a":"s"} x)", R"({"o":{"k":1},"o":{"k":"x"},"a":"s","a":"t"})"};
  std::mt19937 rng(20261201);
  for (int i = 0; i < 1500; ++i) {
    std::string b = "{";
    const int n = static_cast<int>(rng() % 7);
    const size_t pool = i % 2 ? members.size() : 19;
    for (int k = 0; k < n; ++k) b += (k ? "," : "") + members[rng() % pool];
    bodies.push_back(b + "}");
  }

  for (size_t si = 0; si < sets.size(); ++si) {
    TempDir tmp;
    std::string dir = kShipped;
    if (!sets[si].second.empty()) {
      dir = tmp.path;
      if (!sets[si].first.empty()) tmp.file("envelope.json", sets[si].first);
      tmp.file("t.json", sets[si].second);
    }
    auto planned = SchemaSet::load(dir);
    auto generic = SchemaSet::load(dir, Validation::Generic);
    int refused = 0, accepted = 0;
    for (const auto& b : bodies) {
      for (const char* type : {"t", "speaker.onboarded", "draft.ingested", "none"}) {
        INFO("set " << si << ", type " << type << ": " << b);
        std::string expected = check(*generic, b, type);
        REQUIRE(check(*planned, b, type) == expected);
        (expected.empty() ? accepted : refused) += 1;
      }
      // The event type from the body (its first spelling) or the routing key.
      for (const std::string rk : {"t", "speaker.onboarded", ""}) {
        INFO("set " << si << ", routing key " << rk << ": " << b);
        REQUIRE(one_pass(*planned, b, rk) == one_pass(*generic, b, rk));
      }
    }
    INFO("set " << si);
    // The corpus has something to say on each set.
    CHECK(refused > 20);
    CHECK(accepted > 20);
  }
}
