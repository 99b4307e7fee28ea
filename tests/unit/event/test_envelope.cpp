#include <catch2/catch.hpp>

#include <string>

#include "event/envelope.hpp"

using er::event::decode;
using er::event::DecodeStatus;
using er::event::Envelope;

namespace {

struct Decoded {
  DecodeStatus status;
  Envelope env;
  std::string detail;
};

Decoded run(const std::string& body, std::string_view routing_key = "rk.type") {
  Decoded d;
  d.status = decode(body.data(), body.size(), routing_key, d.env, d.detail);
  return d;
}

std::string nested(int levels) {
  // `levels` containers in total, the top-level object included.
  std::string s = "{\"payload\":";
  for (int i = 1; i < levels; ++i) s += '[';
  s += '1';
  for (int i = 1; i < levels; ++i) s += ']';
  s += '}';
  return s;
}

}  // namespace

TEST_CASE("envelope: snake_case from the Python services", "[envelope]") {
  auto d = run(R"({"event_id":"50d48889-1c2e-4b5a-9f0e-1234567890ab","event_type":"speaker.onboarded",)"
               R"("aggregate_id":"c0ffee00-0000-4000-8000-000000000123","aggregate_type":"Speaker",)"
               R"("timestamp":"2026-11-28T02:34:17.388725Z","version":1,)"
               R"("correlation_id":"7d1e2f3a-aaaa-bbbb-cccc-0123456789ab",)"
               R"("payload":{"speaker_id":"123","external_id":"ext-123","name":"John Doe","bucket":"GOOD"}})",
               "speaker.onboarded");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.detail.empty());
  CHECK(d.env.event_id == "50d48889-1c2e-4b5a-9f0e-1234567890ab");
  CHECK(d.env.event_type == "speaker.onboarded");
  CHECK(d.env.aggregate_id == "c0ffee00-0000-4000-8000-000000000123");
  CHECK(d.env.aggregate_type == "Speaker");
  CHECK(d.env.timestamp == "2026-11-28T02:34:17.388725Z");
  CHECK(d.env.version == 1);
  CHECK(d.env.correlation_id == "7d1e2f3a-aaaa-bbbb-cccc-0123456789ab");
  CHECK_FALSE(d.env.type_from_routing_key);
}

TEST_CASE("envelope: camelCase from the TypeScript services", "[envelope]") {
  auto d = run(R"({"eventId":"e-1","eventType":"order.placed","aggregateId":"a-1","aggregateType":"Order",)"
               R"("correlationId":"c-1","timestamp":"2026-01-01T00:00:00Z","version":7,"payload":{}})");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_id == "e-1");
  CHECK(d.env.event_type == "order.placed");
  CHECK(d.env.aggregate_id == "a-1");
  CHECK(d.env.aggregate_type == "Order");
  CHECK(d.env.correlation_id == "c-1");
  CHECK(d.env.timestamp == "2026-01-01T00:00:00Z");
  CHECK(d.env.version == 7);
}

TEST_CASE("envelope: the first spelling seen wins", "[envelope]") {
  auto d = run(R"({"eventType":"camel","event_type":"snake","event_id":"s","eventId":"c"})");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_type == "camel");
  CHECK(d.env.event_id == "s");
}

TEST_CASE("envelope: missing fields stay empty", "[envelope]") {
  auto d = run(R"({"event_type":"x.y"})");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_type == "x.y");
  CHECK(d.env.event_id.empty());
  CHECK(d.env.aggregate_id.empty());
  CHECK(d.env.aggregate_type.empty());
  CHECK(d.env.correlation_id.empty());
  CHECK(d.env.timestamp.empty());
  CHECK(d.env.version == 0);
}

TEST_CASE("envelope: only top-level fields count", "[envelope]") {
  auto d = run(R"({"payload":{"event_type":"inner","event_id":"inner","version":9},"items":[{"event_id":"x"}]})",
               "from.key");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_type == "from.key");
  CHECK(d.env.event_id.empty());
  CHECK(d.env.version == 0);
}

TEST_CASE("envelope: event type from the routing key", "[envelope]") {
  SECTION("absent") {
    auto d = run(R"({"event_id":"1"})", "speaker.onboarded");
    REQUIRE(d.status == DecodeStatus::Ok);
    CHECK(d.env.event_type == "speaker.onboarded");
    CHECK(d.env.type_from_routing_key);
  }
  SECTION("empty string") {
    auto d = run(R"({"event_type":""})", "speaker.onboarded");
    REQUIRE(d.status == DecodeStatus::Ok);
    CHECK(d.env.event_type == "speaker.onboarded");
    CHECK(d.env.type_from_routing_key);
  }
  SECTION("not a string") {
    auto d = run(R"({"event_type":{"name":"x"}})", "speaker.onboarded");
    REQUIRE(d.status == DecodeStatus::Ok);
    CHECK(d.env.event_type == "speaker.onboarded");
  }
}

TEST_CASE("envelope: no event type anywhere", "[envelope]") {
  auto d = run(R"({"event_id":"1"})", "");
  CHECK(d.status == DecodeStatus::NoEventType);
  CHECK(std::string(er::event::reason_code(d.status)) == "no_event_type");
  CHECK_FALSE(d.detail.empty());
}

TEST_CASE("envelope: not JSON", "[envelope]") {
  auto d = run("hello");
  CHECK(d.status == DecodeStatus::InvalidJson);
  CHECK(d.detail == "invalid JSON at offset 0: Invalid value.");
  CHECK(d.env.event_type.empty());

  auto e = run("");
  CHECK(e.status == DecodeStatus::InvalidJson);
  CHECK(e.detail == "invalid JSON at offset 0: The document is empty.");

  auto m = run(R"({"event_type":"a", 5:1})");
  CHECK(m.status == DecodeStatus::InvalidJson);
  CHECK(m.detail == "invalid JSON at offset 19: Missing a name for object member.");
}

TEST_CASE("envelope: truncated JSON", "[envelope]") {
  auto d = run(R"({"event_type":"a.b","payload":{"x":1)");
  CHECK(d.status == DecodeStatus::InvalidJson);
  CHECK(d.detail.rfind("invalid JSON at offset 36: ", 0) == 0);
  // No half-decoded fields leak out.
  CHECK(d.env.event_type.empty());
}

TEST_CASE("envelope: trailing garbage is an error", "[envelope]") {
  auto d = run(R"({"event_type":"a.b"} x)");
  CHECK(d.status == DecodeStatus::InvalidJson);
  CHECK(d.detail == "invalid JSON at offset 21: The document root must not be followed by other values.");

  auto two = run(R"({"event_type":"a"}{"event_type":"b"})");
  CHECK(two.status == DecodeStatus::InvalidJson);

  auto ws = run("{\"event_type\":\"a.b\"} \r\n\t ");
  CHECK(ws.status == DecodeStatus::Ok);

  // A raw NUL byte would otherwise look like the end of the input.
  std::string nul = std::string(R"({"event_type":"a.b"})") + '\0' + "junk";
  auto n = run(nul);
  CHECK(n.status == DecodeStatus::InvalidJson);
  CHECK(n.detail == "invalid JSON at offset 20: NUL byte outside a string.");
}

TEST_CASE("envelope: top level must be an object", "[envelope]") {
  auto a = run(R"([{"event_type":"a.b"}])");
  CHECK(a.status == DecodeStatus::NotObject);
  CHECK(a.detail == "top-level JSON value is an array");
  CHECK(std::string(er::event::reason_code(a.status)) == "not_object");
  CHECK(run(R"("text")").detail == "top-level JSON value is a string");
  CHECK(run("42").detail == "top-level JSON value is a number");
  CHECK(run("true").detail == "top-level JSON value is a boolean");
  CHECK(run("null").detail == "top-level JSON value is null");
  // Broken JSON is reported as such even when it starts like an array.
  CHECK(run("[1,2").status == DecodeStatus::InvalidJson);
}

TEST_CASE("envelope: invalid UTF-8", "[envelope]") {
  auto d = run("{\"event_type\":\"a.b\",\"payload\":{\"name\":\"J\xff" "hn\"}}");
  CHECK(d.status == DecodeStatus::InvalidJson);
  CHECK(d.detail == "invalid JSON at offset 40: Invalid encoding in string.");
  CHECK(std::string(er::event::reason_code(d.status)) == "invalid_json");

  // Overlong encoding of '/' and a lone continuation byte.
  CHECK(run("{\"event_type\":\"\xc0\xaf\"}").status == DecodeStatus::InvalidJson);
  CHECK(run("{\"event_type\":\"\x80\"}").status == DecodeStatus::InvalidJson);
  // Valid multi-byte UTF-8 is fine.
  auto ok = run("{\"event_type\":\"caf\xc3\xa9.\xe2\x82\xac\"}");
  CHECK(ok.status == DecodeStatus::Ok);
  CHECK(ok.env.event_type == "caf\xc3\xa9.\xe2\x82\xac");
}

// Decision: at most 64 nested levels (the top-level object counts as one).
// Deeper input is refused before the recursive parser can exhaust the stack.
TEST_CASE("envelope: nesting limit of 64 levels", "[envelope]") {
  CHECK(run(nested(64)).status == DecodeStatus::Ok);
  auto d = run(nested(65));
  CHECK(d.status == DecodeStatus::InvalidJson);
  CHECK(d.detail == "nesting deeper than 64 levels");

  std::string hostile(1000000, '[');  // would overflow the stack without the limit
  auto h = run("{\"a\":" + hostile);
  CHECK(h.status == DecodeStatus::InvalidJson);
  CHECK(h.detail == "nesting deeper than 64 levels");
}

// Decision: numbers that fit a double are accepted (integers beyond 64 bits
// become doubles and are ignored as envelope values); 1e400 overflows a
// double, which RapidJSON reports as an error, so the body is InvalidJson.
TEST_CASE("envelope: huge numbers", "[envelope]") {
  auto big = run(R"({"event_type":"a.b","version":123456789012345678901234567890,"payload":{"n":1e300}})");
  CHECK(big.status == DecodeStatus::Ok);
  CHECK(big.env.version == 0);

  auto u64 = run(R"({"event_type":"a.b","version":18446744073709551615,"event_id":18446744073709551615})");
  CHECK(u64.status == DecodeStatus::Ok);
  CHECK(u64.env.version == 0);  // does not fit int64
  CHECK(u64.env.event_id == "18446744073709551615");

  auto i64 = run(R"({"event_type":"a.b","version":-9223372036854775808})");
  CHECK(i64.status == DecodeStatus::Ok);
  CHECK(i64.env.version == INT64_MIN);

  auto over = run(R"({"event_type":"a.b","payload":{"n":1e400}})");
  CHECK(over.status == DecodeStatus::InvalidJson);
  CHECK(over.detail == "invalid JSON at offset 35: Number too big to be stored in double.");
}

TEST_CASE("envelope: version must be an integer", "[envelope]") {
  CHECK(run(R"({"event_type":"a","version":"3"})").env.version == 0);
  CHECK(run(R"({"event_type":"a","version":2.5})").env.version == 0);
  CHECK(run(R"({"event_type":"a","version":null,"version":4})").env.version == 4);
}

// Decision: duplicate keys are accepted; the first usable occurrence wins.
TEST_CASE("envelope: duplicate keys", "[envelope]") {
  auto d = run(R"({"event_type":"first","event_type":"second","version":1,"version":2})");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_type == "first");
  CHECK(d.env.version == 1);

  // null / empty do not count, so a later real value is used.
  auto n = run(R"({"event_type":null,"event_type":"","eventType":"real"})");
  REQUIRE(n.status == DecodeStatus::Ok);
  CHECK(n.env.event_type == "real");
}

// Decision: \u0000 is data in the payload, but envelope fields become C
// strings and environment variables, so there it is an error.
TEST_CASE("envelope: NUL in payload vs in an envelope field", "[envelope]") {
  auto p = run(R"({"event_type":"a.b","payload":{"name":"a\u0000b"},"\u0000":"\u0000"})");
  CHECK(p.status == DecodeStatus::Ok);
  CHECK(p.env.event_type == "a.b");

  auto t = run(R"({"event_type":"a\u0000b"})");
  CHECK(t.status == DecodeStatus::InvalidJson);
  CHECK(t.detail == "NUL character in event_type");
  CHECK(t.env.event_type.empty());

  auto c = run(R"({"correlationId":"\u0000"})");
  CHECK(c.status == DecodeStatus::InvalidJson);
  CHECK(c.detail == "NUL character in correlationId");
}

TEST_CASE("envelope: numeric ids become decimal text", "[envelope]") {
  auto d = run(R"({"event_type":"a","event_id":12345,"aggregate_id":-7,"correlation_id":1.5,"aggregateType":true})");
  REQUIRE(d.status == DecodeStatus::Ok);
  CHECK(d.env.event_id == "12345");
  CHECK(d.env.aggregate_id == "-7");
  CHECK(d.env.correlation_id.empty());  // reals are ignored
  CHECK(d.env.aggregate_type.empty());
}

TEST_CASE("envelope: reuse across calls resets every field", "[envelope]") {
  Envelope env;
  std::string detail;
  std::string full = R"({"event_id":"1","event_type":"t","aggregate_id":"a","aggregate_type":"A",)"
                     R"("correlation_id":"c","timestamp":"ts","version":3})";
  REQUIRE(decode(full.data(), full.size(), "", env, detail) == DecodeStatus::Ok);
  std::string bare = "{}";
  REQUIRE(decode(bare.data(), bare.size(), "k", env, detail) == DecodeStatus::Ok);
  CHECK(env.event_type == "k");
  CHECK(env.type_from_routing_key);
  CHECK(env.event_id.empty());
  CHECK(env.aggregate_id.empty());
  CHECK(env.aggregate_type.empty());
  CHECK(env.correlation_id.empty());
  CHECK(env.timestamp.empty());
  CHECK(env.version == 0);

  std::string bad = "{";
  REQUIRE(decode(bad.data(), bad.size(), "k", env, detail) == DecodeStatus::InvalidJson);
  REQUIRE(decode(bare.data(), bare.size(), "k", env, detail) == DecodeStatus::Ok);
  CHECK(detail.empty());

  env.event_id = "x";
  env.version = 5;
  env.type_from_routing_key = true;
  env.clear();
  CHECK(env.event_id.empty());
  CHECK(env.version == 0);
  CHECK_FALSE(env.type_from_routing_key);
  CHECK(std::string(er::event::reason_code(DecodeStatus::Ok)) == "ok");
}

// Decision: every envelope field the daemon reads has a cap (event_type 255,
// the routing-key limit; the others 256). A longer one fails the decode
// without copying the value; the detail names the field and quotes only an
// escaped 16-byte prefix.
TEST_CASE("envelope: fields over their cap are field_too_long", "[envelope]") {
  using er::event::kMaxEventTypeBytes;
  using er::event::kMaxFieldBytes;
  auto with = [](const char* key, const std::string& value) {
    return run(std::string(R"({"event_type":"a.b",")") + key + "\":\"" + value + "\"}");
  };
  // At the cap: fine.
  auto ok = with("event_id", std::string(kMaxFieldBytes, 'i'));
  REQUIRE(ok.status == DecodeStatus::Ok);
  CHECK(ok.env.event_id.size() == kMaxFieldBytes);
  CHECK(run("{\"event_type\":\"" + std::string(kMaxEventTypeBytes, 't') + "\"}").status == DecodeStatus::Ok);

  for (const char* key : {"event_id", "eventId", "aggregate_id", "aggregateId", "aggregate_type", "aggregateType",
                          "correlation_id", "correlationId", "timestamp"}) {
    INFO(key);
    auto d = with(key, std::string(kMaxFieldBytes + 1, 'x'));
    CHECK(d.status == DecodeStatus::FieldTooLong);
    CHECK(std::string(er::event::reason_code(d.status)) == "field_too_long");
    CHECK(d.detail == std::string(key) + " is 257 bytes, longer than the 256 allowed: \"xxxxxxxxxxxxxxxx\"...");
    CHECK(d.env.event_type.empty());  // nothing half-decoded leaks out
  }
  auto t = run("{\"eventType\":\"" + std::string(kMaxEventTypeBytes + 1, 't') + "\"}");
  CHECK(t.status == DecodeStatus::FieldTooLong);
  CHECK(t.detail == "eventType is 256 bytes, longer than the 255 allowed: \"tttttttttttttttt\"...");

  // The prefix is escaped: quotes, backslashes, control and non-ASCII bytes as \xNN.
  std::string hostile = "\\\"<\\n\xc3\xa9" + std::string(1000000, 'A');
  auto h = with("correlation_id", hostile);
  CHECK(h.status == DecodeStatus::FieldTooLong);
  CHECK(h.detail == "correlation_id is 1000005 bytes, longer than the 256 allowed: \"\\x22<\\x0a\\xc3\\xa9AAAAAAAAAAA\"...");

  // Any occurrence counts, even after a usable one; strings in the payload or
  // under `version` (read only as an integer) are not envelope fields.
  CHECK(run("{\"event_id\":\"a\",\"eventId\":\"" + std::string(300, 'x') + "\",\"event_type\":\"t\"}").status ==
        DecodeStatus::FieldTooLong);
  auto payload = run("{\"event_type\":\"t\",\"version\":\"" + std::string(5000, 'v') + "\",\"payload\":{\"event_id\":\"" +
                     std::string(5000, 'p') + "\"}}");
  CHECK(payload.status == DecodeStatus::Ok);
  CHECK(payload.env.version == 0);

  // The cap stops the parse: trailing garbage after the long field is not reached.
  CHECK(with("event_id", std::string(300, 'x') + "\"} garbage").status == DecodeStatus::FieldTooLong);
}
