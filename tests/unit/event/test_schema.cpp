#include <catch2/catch.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "event/schema.hpp"
#include "temp_dir.hpp"

namespace fs = std::filesystem;
using er::event::SchemaSet;

namespace {

const std::string kShipped = std::string(ER_SOURCE_DIR) + "/config/schemas/events";

const std::string kSnake =
    R"({"event_id":"50d48889-1c2e-4b5a-9f0e-1234567890ab","event_type":"speaker.onboarded",)"
    R"("aggregate_id":"c0ffee00-0000-4000-8000-000000000123","aggregate_type":"Speaker",)"
    R"("timestamp":"2026-11-28T02:34:17.388725Z","version":1,)"
    R"("correlation_id":"7d1e2f3a-aaaa-bbbb-cccc-0123456789ab",)"
    R"("payload":{"speaker_id":"123","external_id":"ext-123","name":"John Doe","bucket":"GOOD"}})";

const std::string kCamel =
    R"({"eventId":"50d48889-1c2e-4b5a-9f0e-1234567890ab","eventType":"speaker.onboarded",)"
    R"("aggregateId":"c0ffee00-0000-4000-8000-000000000123","aggregateType":"Speaker",)"
    R"("timestamp":"2026-11-28T02:34:17.388Z","version":1,)"
    R"("correlationId":"7d1e2f3a-aaaa-bbbb-cccc-0123456789ab",)"
    R"("payload":{"speaker_id":"123","external_id":"ext-123","name":"John Doe","bucket":"GOOD"}})";

std::shared_ptr<const SchemaSet> shipped() {
  static auto set = SchemaSet::load(kShipped);
  return set;
}

// "" when valid, else the detail.
std::string check(const SchemaSet& set, const std::string& body, std::string_view type) {
  std::string detail = "stale";
  bool ok = set.validate(body.data(), body.size(), type, detail);
  if (ok) {
    CHECK(detail.empty());
    return "";
  }
  CHECK_FALSE(detail.empty());
  return detail;
}

std::string with_timestamp(const std::string& ts) {
  return R"({"event_id":"1","event_type":"order.placed","timestamp":")" + ts + R"("})";
}

std::string load_error(const std::string& dir) {
  try {
    SchemaSet::load(dir);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "<no error>";
}

// One file, a.type.json, in a fresh folder: the load error with the folder
// shown as <dir>, or "<no error>".
std::string schema_error(const std::string& schema) {
  TempDir tmp;
  tmp.file("a.type.json", schema);
  std::string e = load_error(tmp.path);
  if (e.compare(0, tmp.path.size(), tmp.path) == 0) e.replace(0, tmp.path.size(), "<dir>");
  return e;
}

}  // namespace

TEST_CASE("schema: the shipped schemas load", "[schema]") {
  auto set = shipped();
  REQUIRE(set);
  CHECK(set->size() == 11);  // envelope.json included
  CHECK(set->event_types() ==
        std::vector<std::string>{"draft.correction_vector_created", "draft.correction_vector_updated",
                                 "draft.ingested", "evaluation.completed", "evaluation.failed",
                                 "evaluation.started", "rag.dfn_generated", "speaker.bucket_reassigned",
                                 "speaker.onboarded", "speaker.updated"});
}

TEST_CASE("schema: speaker.onboarded from the Python and the TypeScript services is valid", "[schema]") {
  auto set = shipped();
  CHECK(check(*set, kSnake, "speaker.onboarded") == "");
  CHECK(check(*set, kCamel, "speaker.onboarded") == "");
  // The detail is cleared, and the per-thread state reused, call after call.
  for (int i = 0; i < 3; ++i) CHECK(check(*set, kSnake, "speaker.onboarded") == "");
}

TEST_CASE("schema: speaker.onboarded payload problems name the property and its path", "[schema]") {
  auto set = shipped();
  std::string body = kSnake;
  const std::string bucket = R"(,"bucket":"GOOD")";
  body.replace(body.find(bucket), bucket.size(), "");
  CHECK(check(*set, body, "speaker.onboarded") ==
        "speaker.onboarded.json: required: missing property 'bucket' at #/payload");
  CHECK(check(*set, R"({"event_id":"1","event_type":"t","payload":{"name":"x","speaker_id":"1"}})",
              "speaker.onboarded") ==
        "speaker.onboarded.json: required: missing properties 'external_id', 'bucket' at #/payload");
  CHECK(check(*set, R"({"event_id":"1","event_type":"t"})", "speaker.onboarded") ==
        "speaker.onboarded.json: required: missing property 'payload' at #");

  body = kCamel;
  body.replace(body.find(R"("speaker_id":"123")"), 18, R"("speaker_id":123)");
  CHECK(check(*set, body, "speaker.onboarded") ==
        "speaker.onboarded.json: type: expected string, got integer at #/payload/speaker_id");
}

TEST_CASE("schema: envelope: version must be an integer", "[schema]") {
  auto set = shipped();
  std::string body = kSnake;
  body.replace(body.find(R"("version":1)"), 11, R"("version":"1")");
  CHECK(check(*set, body, "speaker.onboarded") == "envelope.json: type: expected integer, got string at #/version");
  body = kCamel;
  body.replace(body.find(R"("version":1)"), 11, R"("version":1.5)");
  CHECK(check(*set, body, "speaker.onboarded") == "envelope.json: type: expected integer, got number at #/version");
}

TEST_CASE("schema: envelope: timestamp must be an ISO 8601 date-time", "[schema]") {
  auto set = shipped();
  // No zone is local time in ISO 8601, and what Python's utcnow().isoformat() writes.
  for (const char* good : {"2026-11-28T02:34:17", "2026-11-28T02:34:17.388725", "2026-11-28T02:34:17Z", "2026-11-28T02:34:17.388Z", "2026-11-28T02:34:17.388725Z",
                           "2026-11-28T02:34:17+01:00", "2026-11-28T02:34:17.5-0530"}) {
    INFO(good);
    CHECK(check(*set, with_timestamp(good), "order.placed") == "");
  }
  for (const char* bad : {"2026-11-28 02:34:17Z", "2026-11-28T02:34", "2026-11-28T02:34:17.Z",
                          "2026-11-28T02:34Z", "x2026-11-28T02:34:17Z", "2026-11-28T02:34:17ZZ",
                          "2026-11-28T02:34:17+1", ""}) {
    INFO(bad);
    CHECK(check(*set, with_timestamp(bad), "order.placed") ==
          "envelope.json: pattern: '" + std::string(bad) + "' does not match at #/timestamp");
  }
  CHECK(check(*set, R"({"event_id":"1","event_type":"t","timestamp":1764297257})", "t") ==
        "envelope.json: type: expected string, got integer at #/timestamp");
  CHECK(check(*set, with_timestamp("2026-11-28T02:34:17.3887251234567890123456789012345678901Z"), "t") ==
        "");
  CHECK(check(*set, with_timestamp("not a timestamp, but a very long text that is cut in the detail"), "t") ==
        "envelope.json: pattern: 'not a timestamp, but a very long text th...' does not match at #/timestamp");
}

TEST_CASE("schema: envelope: ids, types and the payload", "[schema]") {
  auto set = shipped();
  CHECK(check(*set, R"({"event_type":"t"})", "t") ==
        "envelope.json: required: missing property 'event_id' or 'eventId' at #");
  CHECK(check(*set, R"({"eventId":"1","version":1})", "t") ==
        "envelope.json: required: missing property 'event_type' or 'eventType' at #");
  CHECK(check(*set, R"({"eventId":"1","event_type":"t"})", "t") == "");  // mixed spellings are fine
  CHECK(check(*set, R"({"event_id":"1","event_type":"t","payload":[1]})", "t") ==
        "envelope.json: type: expected object, got array at #/payload");
  CHECK(check(*set, R"(["event_id"])", "t") == "envelope.json: type: expected object, got array at #");
}

TEST_CASE("schema: envelope: event ids are short and safe in file names", "[schema]") {
  auto set = shipped();
  auto id = [&](const std::string& key, const std::string& v) {
    return check(*set, "{\"" + key + "\":\"" + v + "\",\"event_type\":\"t\"}", "t");
  };
  for (const char* key : {"event_id", "eventId"}) {
    CHECK(id(key, "50d48889-1c2e-4b5a-9f0e-1234567890ab") == "");
    CHECK(id(key, "urn:evt:A_b.9") == "");
    CHECK(id(key, std::string(128, 'a')) == "");
    CHECK(id(key, "../../x").find("pattern") != std::string::npos);
    CHECK(id(key, ".hidden").find("pattern") != std::string::npos);
    CHECK(id(key, "a/b").find("pattern") != std::string::npos);
    CHECK(id(key, "a b").find("pattern") != std::string::npos);
    CHECK(id(key, "").find("pattern") != std::string::npos);
    CHECK(id(key, std::string(129, 'a')).find("maxLength") != std::string::npos);
  }
  CHECK(check(*set, R"({"event_id":7,"event_type":"t"})", "t").find("type") != std::string::npos);
}

TEST_CASE("schema: an event type without a schema file is checked against the envelope only", "[schema]") {
  auto set = shipped();
  CHECK(check(*set, R"({"event_id":"1","event_type":"order.placed","payload":{"anything":[1,{"x":null}]}})",
              "order.placed") == "");
  CHECK(check(*set, R"({"event_id":"1","event_type":"order.placed"})", "order.placed") == "");
  CHECK(check(*set, R"({"event_type":"order.placed","payload":{}})", "order.placed") ==
        "envelope.json: required: missing property 'event_id' or 'eventId' at #");
  // Permissive type schemas accept any payload object.
  CHECK(check(*set, R"({"eventId":"1","eventType":"draft.ingested","payload":{"extra":true}})",
              "draft.ingested") == "");
}

TEST_CASE("schema: bodies that are not JSON, or nest too deeply", "[schema]") {
  auto set = shipped();
  CHECK(check(*set, R"({"event_id":"1","event_type":"t")", "t") ==
        "invalid JSON at offset 32: Missing a comma or '}' after an object member.");
  CHECK(check(*set, "", "t") == "invalid JSON at offset 0: The document is empty.");
  std::string nul = R"({"event_id":"1","event_type":"t"})";
  nul += '\0';
  CHECK(check(*set, nul, "t") == "invalid JSON at offset 33: NUL byte outside a string.");
  std::string deep = R"({"event_id":"1","event_type":"t","payload":{"x":)" + std::string(100, '[') +
                     std::string(100, ']') + "}}";
  CHECK(check(*set, deep, "t") == "nesting deeper than 64 levels");
  std::string detail;
  CHECK_FALSE(set->validate(nullptr, 0, "t", detail));
  CHECK(detail == "invalid JSON at offset 0: The document is empty.");
}

TEST_CASE("schema: validate() may be called from several threads", "[schema]") {
  auto set = shipped();
  std::string bad = kSnake;
  bad.replace(bad.find(R"("2026-11-28T)"), 12, R"("2026-11-28 )");
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      std::string detail;
      for (int i = 0; i < 500; ++i) {
        if (!set->validate(kCamel.data(), kCamel.size(), "speaker.onboarded", detail)) ++wrong;
        if (set->validate(bad.data(), bad.size(), "speaker.onboarded", detail) ||
            detail.find("pattern") == std::string::npos)
          ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(wrong == 0);
}

TEST_CASE("schema: a folder of schemas: envelope optional, other files ignored", "[schema]") {
  TempDir tmp;
  tmp.file("order.placed.json", R"({"type":"object","required":["payload"],
    "properties":{"payload":{"$ref":"#/definitions/order"}},
    "definitions":{"order":{"type":"object","required":["sku"],"additionalProperties":false,
                            "properties":{"sku":{"type":"string","pattern":"^[A-Z]{3}-[0-9]+$"}}}}})");
  tmp.file("README.md", "not a schema");
  tmp.file(".hidden.json", "not JSON");
  fs::create_directories(tmp.path + "/sub.json");
  auto set = SchemaSet::load(tmp.path);
  CHECK(set->size() == 1);
  CHECK(set->event_types() == std::vector<std::string>{"order.placed"});
  CHECK(check(*set, R"({"payload":{"sku":"ABC-12"}})", "order.placed") == "");
  CHECK(check(*set, R"({"payload":{}})", "order.placed") ==
        "order.placed.json: required: missing property 'sku' at #/payload");  // through the $ref
  CHECK(check(*set, R"({"payload":{"sku":"abc"}})", "order.placed") ==
        "order.placed.json: pattern: 'abc' does not match at #/payload/sku");
  CHECK(check(*set, R"({"payload":{"sku":"ABC-1","extra":1}})", "order.placed") ==
        "order.placed.json: additionalProperties: property not allowed at #/payload/extra");
  CHECK(check(*set, "[]", "other.type") == "");  // no envelope.json, no schema: nothing to check

  TempDir empty;
  CHECK(SchemaSet::load(empty.path)->size() == 0);
}

TEST_CASE("schema: load errors name the file", "[schema]") {
  CHECK(load_error("/nonexistent/schemas") == "/nonexistent/schemas: No such file or directory");

  CHECK(schema_error("{\"type\": \"object\",\n  \"properties\": {]}\n") ==
        "<dir>/a.type.json: invalid JSON at offset 36 (line 2, column 18): Missing a name for object member.");
  CHECK(schema_error("") == "<dir>/a.type.json: invalid JSON at offset 0 (line 1, column 1): The document is empty.");
  CHECK(schema_error(R"({"type":"object","properties":{"payload":{"type":"objekt"}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/payload/type: not valid draft-04 "
        "(meta-schema keyword 'anyOf' at #/properties/type)");
  CHECK(schema_error(R"({"required":"bucket"})") ==
        "<dir>/a.type.json: invalid schema at #/required: not valid draft-04 "
        "(meta-schema keyword 'type' at #/definitions/stringArray)");
  CHECK(schema_error(R"({"properties":{"a":{"minLength":-1}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/a/minLength: not valid draft-04 "
        "(meta-schema keyword 'allOf' at #/definitions/positiveIntegerDefault0)");
  CHECK(schema_error(R"(["type"])") == "<dir>/a.type.json: invalid schema: the top level must be an object");
  CHECK(schema_error(R"({"$schema":"http://json-schema.org/draft-07/schema#"})") ==
        "<dir>/a.type.json: invalid schema: $schema 'http://json-schema.org/draft-07/schema#' is not draft-04, "
        "the only draft RapidJSON 1.1 implements");
  CHECK(schema_error(R"({"$schema":"http://json-schema.org/draft-04/schema"})") == "<no error>");
}

TEST_CASE("schema: load errors: what RapidJSON 1.1 would silently ignore or crash on", "[schema]") {
  const std::string no_d = " (its regex has no \\d, \\w, \\s, lookaround or backreferences; use [0-9])";
  CHECK(schema_error(R"({"properties":{"ts":{"type":"string","pattern":"^\\d{4}$"}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/ts/pattern: RapidJSON cannot compile the pattern "
        "'^\\d{4}$'" + no_d);
  CHECK(schema_error(R"({"patternProperties":{"^x-[a-z]+$":{},"a(b":{}}})") ==
        "<dir>/a.type.json: invalid schema at #/patternProperties/a(b: pattern 'a(b': unbalanced '('");
  auto pattern_error = [](const std::string& pattern) {
    return schema_error(R"({"pattern":")" + pattern + R"("})");
  };
  CHECK(pattern_error("(") == "<dir>/a.type.json: invalid schema at #/pattern: pattern '(': unbalanced '('");
  CHECK(pattern_error("a)") == "<dir>/a.type.json: invalid schema at #/pattern: pattern 'a)': unbalanced ')'");
  CHECK(pattern_error("a()") ==
        "<dir>/a.type.json: invalid schema at #/pattern: pattern 'a()': empty group or alternative");
  CHECK(pattern_error("a||b") == "<dir>/a.type.json: invalid schema at #/pattern: pattern 'a||b': empty alternative");
  CHECK(pattern_error("{2}") == "<dir>/a.type.json: invalid schema at #/pattern: pattern '{2}': nothing to repeat");
  CHECK(pattern_error("a(*)") == "<dir>/a.type.json: invalid schema at #/pattern: pattern 'a(*)': nothing to repeat");
  CHECK(pattern_error("a{2,1001}") ==
        "<dir>/a.type.json: invalid schema at #/pattern: pattern 'a{2,1001}': repeat count above 1000");
  CHECK(pattern_error("a{0}") ==
        "<dir>/a.type.json: invalid schema at #/pattern: RapidJSON cannot compile the pattern 'a{0}'" + no_d);
  CHECK(pattern_error("") == "<no error>");
  CHECK(pattern_error("^(a|b[)(]|\\\\()+[0-9]{2,3}$") == "<no error>");

  CHECK(schema_error(R"({"properties":{"ts":{"type":"string","format":"date-time"}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/ts/format: 'format' is not checked by RapidJSON; "
        "use 'pattern'");
  CHECK(schema_error(R"({"properties":{"format":{"type":"string"}}})") == "<no error>");
  CHECK(schema_error(R"({"properties":{"a":{"$ref":"other.json#/x"}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/a/$ref: $ref 'other.json#/x': only references within "
        "the same file ('#...') are supported");
  CHECK(schema_error(R"({"properties":{"a":{"$ref":"#/definitions/nope"}}})") ==
        "<dir>/a.type.json: invalid schema at #/properties/a/$ref: $ref '#/definitions/nope' points to nothing");
  CHECK(schema_error(R"({"anyOf":[{"$ref":"#/title"}],"title":"t"})") ==
        "<dir>/a.type.json: invalid schema at #/anyOf/0/$ref: $ref '#/title' does not point to a schema object");
  CHECK(schema_error(R"({"definitions":{"a":{"$ref":"#/definitions/b"},"b":{"$ref":"#/definitions/a"}}})") ==
        "<dir>/a.type.json: invalid schema at #/definitions/a/$ref: circular $ref");
  CHECK(schema_error(R"({"not":{"$ref":"#"}})") == "<no error>");
}

TEST_CASE("schema: load errors: the folder and its files", "[schema]") {
  CHECK(load_error("/nonexistent/schemas") == "/nonexistent/schemas: No such file or directory");
  TempDir tmp;
  REQUIRE(symlink((tmp.path + "/missing").c_str(), (tmp.path + "/dangling.json").c_str()) == 0);
  CHECK(load_error(tmp.path) == tmp.path + "/dangling.json: cannot open: No such file or directory");
  std::ofstream(tmp.path + "/not-a-dir") << "x";
  CHECK(load_error(tmp.path + "/not-a-dir") == tmp.path + "/not-a-dir: Not a directory");
}
