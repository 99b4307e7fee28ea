#include "settle/settle.hpp"

#include "util/time.hpp"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>

namespace er::settle {

namespace {
bool key_is(const amqp_table_entry_t& e, const char* k) {
  size_t n = std::strlen(k);
  return e.key.len == n && std::memcmp(e.key.bytes, k, n) == 0;
}
bool ours(const amqp_table_entry_t& e) {
  for (const char* k : {kReason, kDetail, kHandler, kAttempts, kFirstFailedAt, kLastFailedAt, kOriginalExchange,
                        kOriginalRoutingKey, kOriginalQueue, kAttempt, kLastError}) {
    if (key_is(e, k)) return true;
  }
  return false;
}
}  // namespace

CopyProperties::CopyProperties(const amqp_basic_properties_t& original, const DeadLetterInfo& info)
    : props_(original) {
  copy_original(original);
  add_string(kReason, std::string(info.reason));
  add_string(kDetail, std::string(info.detail));
  if (!info.handler.empty()) add_string(kHandler, std::string(info.handler));
  add_int(kAttempts, info.attempts);
  add_common(info);
  finish();
}

CopyProperties::CopyProperties(const amqp_basic_properties_t& original, const DeadLetterInfo& info,
                               uint32_t next_attempt, uint64_t expiration_ms)
    : props_(original) {
  copy_original(original);
  add_int(kAttempt, next_attempt);
  std::string last_error(info.reason);
  if (!info.detail.empty()) last_error.append(": ").append(info.detail);
  add_string(kLastError, std::move(last_error));
  if (!info.handler.empty()) add_string(kHandler, std::string(info.handler));
  add_common(info);
  strings_.push_back(std::to_string(expiration_ms));
  props_._flags |= AMQP_BASIC_EXPIRATION_FLAG;
  props_.expiration = amqp_bytes_t{strings_.back().size(), strings_.back().data()};
  finish();
}

void CopyProperties::copy_original(const amqp_basic_properties_t& original) {
  constexpr size_t kOurs = 12;
  strings_.reserve(kOurs);  // never reallocates: entries point into these strings
  if (original._flags & AMQP_BASIC_HEADERS_FLAG) {
    const amqp_table_t& h = original.headers;
    entries_.reserve(static_cast<size_t>(h.num_entries) + kOurs);
    for (int i = 0; i < h.num_entries; ++i) {
      const auto& e = h.entries[i];
      if (key_is(e, kFirstFailedAt) && e.value.kind == AMQP_FIELD_KIND_UTF8)
        first_failed_.assign(static_cast<const char*>(e.value.value.bytes.bytes), e.value.value.bytes.len);
      if (!ours(e)) entries_.push_back(e);
    }
  } else {
    entries_.reserve(kOurs);
  }
  props_._flags &= ~AMQP_BASIC_EXPIRATION_FLAG;
}

void CopyProperties::add_common(const DeadLetterInfo& info) {
  std::string now = util::now_iso8601();
  add_string(kFirstFailedAt, first_failed_.empty() ? now : first_failed_);
  add_string(kLastFailedAt, std::move(now));
  add_string(kOriginalExchange, std::string(info.exchange));
  add_string(kOriginalRoutingKey, std::string(info.routing_key));
  add_string(kOriginalQueue, std::string(info.queue));
}

void CopyProperties::finish() {
  props_._flags |= AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  props_.delivery_mode = AMQP_DELIVERY_PERSISTENT;
  props_.headers.num_entries = static_cast<int>(entries_.size());
  props_.headers.entries = entries_.data();
}

void CopyProperties::add_string(const char* key, std::string value) {
  strings_.push_back(std::move(value));
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_bytes_t{strings_.back().size(), strings_.back().data()};
  entries_.push_back(e);
}

void CopyProperties::add_int(const char* key, int64_t value) {
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_I64;
  e.value.value.i64 = value;
  entries_.push_back(e);
}

namespace {
bool int_value(const amqp_field_value_t& v, int64_t* out) {
  switch (v.kind) {
    case AMQP_FIELD_KIND_I8: *out = v.value.i8; return true;
    case AMQP_FIELD_KIND_U8: *out = v.value.u8; return true;
    case AMQP_FIELD_KIND_I16: *out = v.value.i16; return true;
    case AMQP_FIELD_KIND_U16: *out = v.value.u16; return true;
    case AMQP_FIELD_KIND_I32: *out = v.value.i32; return true;
    case AMQP_FIELD_KIND_U32: *out = v.value.u32; return true;
    case AMQP_FIELD_KIND_I64: *out = v.value.i64; return true;
    case AMQP_FIELD_KIND_U64: *out = static_cast<int64_t>(v.value.u64); return true;
    default: return false;
  }
}
std::string_view string_value(const amqp_field_value_t& v) {
  if (v.kind != AMQP_FIELD_KIND_UTF8 && v.kind != AMQP_FIELD_KIND_BYTES) return {};
  return {static_cast<const char*>(v.value.bytes.bytes), v.value.bytes.len};
}
}  // namespace

DeliveryHistory read_history(const amqp_basic_properties_t& props) {
  DeliveryHistory h;
  if (!(props._flags & AMQP_BASIC_HEADERS_FLAG)) return h;
  for (int i = 0; i < props.headers.num_entries; ++i) {
    const auto& e = props.headers.entries[i];
    if (e.key.len < 2 || static_cast<const char*>(e.key.bytes)[0] != 'x') continue;  // cheap skip of foreign headers
    int64_t n;
    if (key_is(e, kAttempt) && int_value(e.value, &n) && n >= 1 && n <= 1000000) {
      h.attempt = static_cast<uint32_t>(n);
    } else if (key_is(e, kOriginalExchange)) {
      h.original_exchange = string_value(e.value);
    } else if (key_is(e, kOriginalRoutingKey)) {
      h.original_routing_key = string_value(e.value);
      h.has_original = true;
    }
  }
  return h;
}

}  // namespace er::settle
