// libFuzzer target for er::event::decode(), and for SchemaSet::decode_validate()
// (one parse) against decode() then validate() (two): the same answers.
// Input: byte 0 = routing key length (mod 64), then the key, then the body.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "event/envelope.hpp"
#include "event/schema.hpp"

using er::event::DecodeStatus;
using er::event::Envelope;

namespace {

#define CHECK(cond) \
  do {              \
    if (!(cond)) __builtin_trap(); \
  } while (0)

bool no_nul(const std::string& s) { return s.find('\0') == std::string::npos; }

bool all_empty(const Envelope& e) {
  return e.event_id.empty() && e.event_type.empty() && e.aggregate_id.empty() &&
         e.aggregate_type.empty() && e.correlation_id.empty() && e.timestamp.empty() &&
         e.version == 0 && !e.type_from_routing_key;
}

bool same(const Envelope& a, const Envelope& b) {
  return a.event_id == b.event_id && a.event_type == b.event_type &&
         a.aggregate_id == b.aggregate_id && a.aggregate_type == b.aggregate_type &&
         a.correlation_id == b.correlation_id && a.timestamp == b.timestamp &&
         a.version == b.version && a.type_from_routing_key == b.type_from_routing_key;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  size_t key_len = size ? data[0] % 64 : 0;
  const uint8_t* p = size ? data + 1 : data;
  size_t left = size ? size - 1 : 0;
  if (key_len > left) key_len = left;
  std::string_view key(reinterpret_cast<const char*>(p), key_len);
  // The body ends exactly at the end of libFuzzer's buffer: ASan sees overreads.
  const char* body = reinterpret_cast<const char*>(p + key_len);
  size_t len = left - key_len;

  // Reused across inputs, like the consumer does: stale fields must not leak.
  static Envelope reused;
  static std::string reused_detail = "stale";
  DecodeStatus s = er::event::decode(len ? body : nullptr, len, key, reused, reused_detail);

  Envelope fresh;
  std::string detail;
  DecodeStatus s2 = er::event::decode(body, len, key, fresh, detail);
  CHECK(s == s2 && same(reused, fresh) && detail == reused_detail);

  // The shipped envelope and type schemas; the routing key picks a type when
  // the body names none, so both ways of finding the type are reached.
  static auto schemas = er::event::SchemaSet::load(ER_FUZZ_SCHEMAS);
  Envelope one;
  std::string one_detail = "stale";
  bool valid = false;
  DecodeStatus s3 = schemas->decode_validate(body, len, key, one, one_detail, valid);
  CHECK(s3 == s2 && same(one, fresh));
  if (s3 == DecodeStatus::Ok) {
    std::string two_detail;
    bool two_valid = schemas->validate(body, len, fresh.event_type, two_detail);
    CHECK(valid == two_valid && one_detail == two_detail);
  } else {
    CHECK(one_detail == detail);
  }

  const char* code = er::event::reason_code(s);
  CHECK(code != nullptr && std::strcmp(code, "unknown") != 0);

  switch (s) {
    case DecodeStatus::Ok:
      CHECK(detail.empty());
      CHECK(!fresh.event_type.empty());
      CHECK(fresh.event_id.size() <= er::event::kMaxFieldBytes && fresh.aggregate_id.size() <= er::event::kMaxFieldBytes &&
            fresh.aggregate_type.size() <= er::event::kMaxFieldBytes &&
            fresh.correlation_id.size() <= er::event::kMaxFieldBytes &&
            fresh.timestamp.size() <= er::event::kMaxFieldBytes);
      if (!fresh.type_from_routing_key) CHECK(fresh.event_type.size() <= er::event::kMaxEventTypeBytes);
      if (fresh.type_from_routing_key) CHECK(fresh.event_type == key && !key.empty());
      CHECK(no_nul(fresh.event_id) && no_nul(fresh.aggregate_id) &&
            no_nul(fresh.aggregate_type) && no_nul(fresh.correlation_id) &&
            no_nul(fresh.timestamp));
      if (!fresh.type_from_routing_key) CHECK(no_nul(fresh.event_type));
      break;
    case DecodeStatus::NoEventType:
      CHECK(!detail.empty() && key.empty() && fresh.event_type.empty());
      CHECK(!fresh.type_from_routing_key);
      break;
    case DecodeStatus::InvalidJson:
    case DecodeStatus::NotObject:
      CHECK(!detail.empty() && all_empty(fresh));
      break;
    case DecodeStatus::FieldTooLong:
      // Names the field and quotes at most a short prefix, never the value.
      CHECK(!detail.empty() && all_empty(fresh) && detail.size() < 200);
      break;
    default:
      CHECK(false);
  }
  return 0;
}
