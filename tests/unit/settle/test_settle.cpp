#include <catch2/catch.hpp>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "settle/settle.hpp"

using namespace er::settle;

namespace {
std::map<std::string, amqp_field_value_t> headers_of(const amqp_basic_properties_t* p) {
  std::map<std::string, amqp_field_value_t> out;
  REQUIRE((p->_flags & AMQP_BASIC_HEADERS_FLAG));
  for (int i = 0; i < p->headers.num_entries; ++i) {
    const auto& e = p->headers.entries[i];
    std::string key(static_cast<const char*>(e.key.bytes), e.key.len);
    REQUIRE(out.count(key) == 0);  // no duplicated header names
    out[key] = e.value;
  }
  return out;
}
std::string str(const amqp_field_value_t& v) {
  REQUIRE(v.kind == AMQP_FIELD_KIND_UTF8);
  return std::string(static_cast<const char*>(v.value.bytes.bytes), v.value.bytes.len);
}
amqp_table_entry_t entry(const char* k, const char* v) {
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(k);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_cstring_bytes(v);
  return e;
}
const CopySigner& signer() {
  static const CopySigner s(std::string(32, 'k'));
  return s;
}
}  // namespace

TEST_CASE("dead-letter properties keep the original and add the reason headers", "[settle]") {
  amqp_basic_properties_t orig{};
  orig._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_CORRELATION_ID_FLAG |
                AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  orig.content_type = amqp_cstring_bytes("application/json");
  orig.message_id = amqp_cstring_bytes("m-1");
  orig.correlation_id = amqp_cstring_bytes("c-1");
  orig.timestamp = 1700000000;
  orig.delivery_mode = 1;
  amqp_table_entry_t in[] = {entry("traceparent", "00-abc"), entry("x-death-reason", "stale"),
                             entry("x-first-failed-at", "2026-01-01T00:00:00.000Z")};
  orig.headers.num_entries = 3;
  orig.headers.entries = in;

  DeadLetterInfo info;
  info.reason = "handler_failed";
  info.detail = "exit code 3; stderr: boom";
  info.handler = "index-draft";
  info.queue = "draft.events";
  info.exchange = "draft-genie.events";
  info.routing_key = "draft.ingested";
  info.attempts = 2;
  CopyProperties dl(orig, "", info, signer(), 131072);
  const amqp_basic_properties_t* p = dl.get();

  CHECK(std::string(static_cast<const char*>(p->content_type.bytes), p->content_type.len) == "application/json");
  CHECK(std::string(static_cast<const char*>(p->message_id.bytes), p->message_id.len) == "m-1");
  CHECK(std::string(static_cast<const char*>(p->correlation_id.bytes), p->correlation_id.len) == "c-1");
  CHECK(p->timestamp == 1700000000);
  CHECK(p->delivery_mode == AMQP_DELIVERY_PERSISTENT);

  auto h = headers_of(p);
  CHECK(str(h.at("traceparent")) == "00-abc");
  CHECK(str(h.at(kReason)) == "handler_failed");
  CHECK(str(h.at(kDetail)) == "exit code 3; stderr: boom");
  CHECK(str(h.at(kHandler)) == "index-draft");
  CHECK(h.at(kAttempts).kind == AMQP_FIELD_KIND_I64);
  CHECK(h.at(kAttempts).value.i64 == 2);
  // An unsigned x-first-failed-at is a publisher's, not ours: not believed.
  CHECK(str(h.at(kFirstFailedAt)) == str(h.at(kLastFailedAt)));
  CHECK(str(h.at(kLastFailedAt)).size() == 24);
  CHECK(str(h.at(kOriginalExchange)) == "draft-genie.events");
  CHECK(str(h.at(kOriginalRoutingKey)) == "draft.ingested");
  CHECK(str(h.at(kOriginalQueue)) == "draft.events");
  CHECK(h.count(kSignature) == 1);
  CHECK(h.size() == 11);
}

TEST_CASE("dead-letter properties on a message without headers or handler", "[settle]") {
  amqp_basic_properties_t orig{};
  DeadLetterInfo info;
  info.reason = "invalid_json";
  info.detail = "invalid JSON at offset 0";
  info.queue = "q";
  CopyProperties dl(orig, "", info, signer(), 131072);
  auto h = headers_of(dl.get());
  CHECK(h.count(kHandler) == 0);
  CHECK(str(h.at(kReason)) == "invalid_json");
  CHECK(str(h.at(kFirstFailedAt)) == str(h.at(kLastFailedAt)));
  CHECK(dl.get()->delivery_mode == AMQP_DELIVERY_PERSISTENT);
}

TEST_CASE("a retry copy carries its attempt and original routing, and reads back", "[settle]") {
  amqp_basic_properties_t orig{};
  orig._flags = AMQP_BASIC_CONTENT_TYPE_FLAG;
  orig.content_type = amqp_cstring_bytes("application/json");
  DeadLetterInfo info;
  info.reason = "handler_failed";
  info.detail = "exit code 75 (EX_TEMPFAIL)";
  info.handler = "h";
  info.queue = "q";
  info.exchange = "ex";
  info.routing_key = "";  // an empty original key must survive as empty, not as "unknown"
  info.attempts = 1;
  CopyProperties copy(orig, "", info, 2, 1500, signer(), 131072);
  const amqp_basic_properties_t* p = copy.get();
  REQUIRE((p->_flags & AMQP_BASIC_EXPIRATION_FLAG));
  CHECK(std::string(static_cast<const char*>(p->expiration.bytes), p->expiration.len) == "1500");
  auto h = headers_of(p);
  CHECK(h.at(kAttempt).value.i64 == 2);
  CHECK(str(h.at(kLastError)) == "handler_failed: exit code 75 (EX_TEMPFAIL)");
  CHECK(h.count(kReason) == 0);

  DeliveryHistory hist = read_history(*p, "", signer());
  CHECK(hist.attempt == 2);
  CHECK(hist.has_original);
  CHECK(hist.original_exchange == "ex");
  CHECK(hist.original_routing_key.empty());

  // The dead-letter copy of a retried event drops the retry bookkeeping and the expiration.
  CopyProperties dl(*p, "", info, signer(), 131072);
  CHECK((dl.get()->_flags & AMQP_BASIC_EXPIRATION_FLAG) == 0);
  auto h2 = headers_of(dl.get());
  CHECK(h2.count(kAttempt) == 0);
  CHECK(h2.count(kLastError) == 0);
  CHECK(str(h2.at(kFirstFailedAt)) == str(h.at(kFirstFailedAt)));

  amqp_basic_properties_t fresh{};
  CHECK(read_history(fresh, "", signer()).attempt == 1);
  CHECK_FALSE(read_history(fresh, "", signer()).has_original);
}
