#include <catch2/catch.hpp>

#include <rapidjson/document.h>

#include <regex>
#include <set>
#include <string>

#include "publish/publish.hpp"
#include "util/time.hpp"

using er::publish::FillOptions;
using er::publish::InvalidEvent;
using er::publish::prepare;
using er::publish::Prepared;
using er::publish::split_input;

namespace {

const std::regex kUuidV4("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
const std::regex kIsoMs("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$");

FillOptions fixed() {
  FillOptions o;
  o.new_id = [] { return std::string("11111111-2222-4333-8444-555555555555"); };
  o.now = [] { return std::string("2024-05-01T12:34:56.789Z"); };
  return o;
}

rapidjson::Document parse(const std::string& s) {
  rapidjson::Document d;
  d.Parse(s.c_str());
  REQUIRE_FALSE(d.HasParseError());
  REQUIRE(d.IsObject());
  return d;
}

}  // namespace

TEST_CASE("uuid_v4: format, version and variant, unique", "[publish]") {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    std::string u = er::publish::uuid_v4();
    CHECK(std::regex_match(u, kUuidV4));
    seen.insert(u);
  }
  CHECK(seen.size() == 1000);
}

TEST_CASE("uuid_v4_from_bytes sets the version and variant bits", "[publish]") {
  uint8_t ones[16];
  for (auto& b : ones) b = 0xFF;
  CHECK(er::publish::uuid_v4_from_bytes(ones) == "ffffffff-ffff-4fff-bfff-ffffffffffff");
  uint8_t zeros[16] = {};
  CHECK(er::publish::uuid_v4_from_bytes(zeros) == "00000000-0000-4000-8000-000000000000");
  uint8_t seq[16];
  for (int i = 0; i < 16; ++i) seq[i] = static_cast<uint8_t>(i * 17);
  CHECK(er::publish::uuid_v4_from_bytes(seq) == "00112233-4455-4677-8899-aabbccddeeff");
}

TEST_CASE("iso8601_utc_ms: UTC with milliseconds and Z", "[publish]") {
  using namespace std::chrono;
  system_clock::time_point t{milliseconds(1714566896789LL)};
  CHECK(er::util::iso8601_utc_ms(t) == "2024-05-01T12:34:56.789Z");
  CHECK(er::util::iso8601_utc_ms(system_clock::time_point{}) == "1970-01-01T00:00:00.000Z");
  CHECK(std::regex_match(er::util::iso8601_utc_ms(system_clock::now()), kIsoMs));
}

TEST_CASE("prepare fills event_id, timestamp and version in snake_case", "[publish]") {
  Prepared p = prepare(R"({"event_type":"speaker.onboarded","payload":{"a":[1,2,{"b":null}]}})", "", fixed());
  CHECK_FALSE(p.camel);
  CHECK(p.filled == std::vector<std::string>{"event_id", "timestamp", "version"});
  CHECK(p.event_id == "11111111-2222-4333-8444-555555555555");
  CHECK(p.event_type == "speaker.onboarded");
  CHECK(p.routing_key == "speaker.onboarded");
  CHECK(p.correlation_id.empty());
  // Added fields first, then the event's own, unchanged and in their order.
  CHECK(p.body ==
        R"({"event_id":"11111111-2222-4333-8444-555555555555","timestamp":"2024-05-01T12:34:56.789Z",)"
        R"("version":1,"event_type":"speaker.onboarded","payload":{"a":[1,2,{"b":null}]}})");
  auto d = parse(p.body);
  CHECK_FALSE(d.HasMember("eventId"));
}

TEST_CASE("prepare fills eventId in camelCase envelopes", "[publish]") {
  SECTION("eventType marks camelCase") {
    Prepared p = prepare(R"({"eventType":"draft.ingested","correlationId":"c-1","payload":{}})", "", fixed());
    CHECK(p.camel);
    CHECK(p.filled.front() == "eventId");
    auto d = parse(p.body);
    CHECK(std::string(d["eventId"].GetString()) == "11111111-2222-4333-8444-555555555555");
    CHECK_FALSE(d.HasMember("event_id"));
    CHECK(p.correlation_id == "c-1");
    CHECK(p.routing_key == "draft.ingested");
  }
  SECTION("with real random ids") {
    Prepared p = prepare(R"({"eventType":"draft.ingested"})", "");
    CHECK(std::regex_match(p.event_id, kUuidV4));
    auto d = parse(p.body);
    CHECK(std::string(d["eventId"].GetString()) == p.event_id);
    CHECK(std::regex_match(std::string(d["timestamp"].GetString()), kIsoMs));
    CHECK(d["version"].GetInt() == 1);
  }
}

TEST_CASE("prepare keeps fields that are there", "[publish]") {
  SECTION("nothing missing: the input as it is (no re-serialization)") {
    std::string in =
        R"(  {"event_id": "e-1", "event_type": "x.y", "timestamp": "2020-01-01T00:00:00Z", "version": 3, "n": 1.50}  )";
    Prepared p = prepare(in, "", fixed());
    CHECK(p.filled.empty());
    CHECK(p.body == in.substr(2, in.size() - 4));
    CHECK(p.event_id == "e-1");
  }
  SECTION("only the missing ones") {
    Prepared p = prepare(R"({"eventId":"mine","eventType":"x.y","version":7})", "", fixed());
    CHECK(p.filled == std::vector<std::string>{"timestamp"});
    CHECK(p.event_id == "mine");
    auto d = parse(p.body);
    CHECK(std::string(d["eventId"].GetString()) == "mine");
    CHECK(d["version"].GetInt() == 7);
    CHECK(d.MemberCount() == 4);
  }
  SECTION("either spelling of the id counts") {
    Prepared p = prepare(R"({"event_id":"snake","eventType":"x.y"})", "", fixed());
    CHECK(p.event_id == "snake");
    CHECK(std::find(p.filled.begin(), p.filled.end(), "eventId") == p.filled.end());
  }
  SECTION("null counts as missing and is replaced, not duplicated") {
    Prepared p = prepare(R"({"event_id":null,"event_type":"x.y","timestamp":null,"version":null})", "", fixed());
    CHECK(p.filled.size() == 3);
    auto d = parse(p.body);
    CHECK(d.MemberCount() == 4);
    CHECK(d["event_id"].IsString());
    CHECK(d["version"].GetInt() == 1);
  }
  SECTION("unicode and escapes survive") {
    Prepared p = prepare(R"({"event_type":"x.y","payload":{"s":"h\u00e9 \"q\" \n ✓"}})", "", fixed());
    auto d = parse(p.body);
    CHECK(std::string(d["payload"]["s"].GetString()) == "h\xc3\xa9 \"q\" \n \xe2\x9c\x93");
  }
}

TEST_CASE("prepare: the routing key", "[publish]") {
  SECTION("defaults to the event type") {
    CHECK(prepare(R"({"event_type":"a.b"})", "", fixed()).routing_key == "a.b");
    CHECK(prepare(R"({"eventType":"c.d"})", "", fixed()).routing_key == "c.d");
  }
  SECTION("--routing-key overrides it") {
    Prepared p = prepare(R"({"event_type":"a.b"})", "other.key", fixed());
    CHECK(p.routing_key == "other.key");
    CHECK(p.event_type == "a.b");
  }
  SECTION("no type: the routing key is the type, as the daemon reads it") {
    Prepared p = prepare(R"({"payload":{}})", "z.z", fixed());
    CHECK(p.routing_key == "z.z");
    CHECK(p.event_type == "z.z");
  }
  SECTION("neither: an error that says so") {
    CHECK_THROWS_WITH(prepare(R"({"payload":{}})", "", fixed()), Catch::Contains("no --routing-key"));
    CHECK_THROWS_AS(prepare(R"({"event_type":""})", "", fixed()), InvalidEvent);
  }
}

TEST_CASE("prepare rejects what cannot be published", "[publish]") {
  CHECK_THROWS_WITH(prepare("{nope", "", fixed()), Catch::Contains("invalid JSON"));
  CHECK_THROWS_WITH(prepare("[1,2]", "k", fixed()), Catch::Contains("not a JSON object"));
  CHECK_THROWS_WITH(prepare(R"({"event_type":"a","event_id":5})", "", fixed()),
                    Catch::Contains("event_id must be a non-empty string"));
  CHECK_THROWS_WITH(prepare(R"({"eventType":"a","eventId":""})", "", fixed()),
                    Catch::Contains("eventId must be a non-empty string"));
  CHECK_THROWS_AS(prepare("{\"event_type\":\"a\"} {}", "", fixed()), InvalidEvent);
}

TEST_CASE("split_input: one object or NDJSON", "[publish]") {
  SECTION("a pretty-printed object is one event") {
    auto v = split_input("\n{\n  \"event_type\": \"a\",\n  \"payload\": {}\n}\n");
    REQUIRE(v.size() == 1);
    CHECK(v[0].line == 2);
  }
  SECTION("NDJSON: one per line, blank lines skipped, line numbers kept") {
    auto v = split_input("{\"a\":1}\n\n  \r\n{\"b\":2}\r\n{\"c\":3}");
    REQUIRE(v.size() == 3);
    CHECK(v[0].line == 1);
    CHECK(v[1].line == 4);
    CHECK(v[1].text == "{\"b\":2}");
    CHECK(v[2].line == 5);
  }
  SECTION("empty input") {
    CHECK(split_input("").empty());
    CHECK(split_input(" \n\n").empty());
  }
  SECTION("a bad line stays a line (reported with its number)") {
    auto v = split_input("{\"a\":1}\n{bad\n");
    REQUIRE(v.size() == 2);
    CHECK(v[1].line == 2);
    CHECK(v[1].text == "{bad");
  }
}
