#include "settle/settle.hpp"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>

namespace er::settle {

std::string now_iso8601() {
  auto now = std::chrono::system_clock::now();
  auto secs = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return buf;
}

namespace {
bool key_is(const amqp_table_entry_t& e, const char* k) {
  size_t n = std::strlen(k);
  return e.key.len == n && std::memcmp(e.key.bytes, k, n) == 0;
}
bool ours(const amqp_table_entry_t& e) {
  for (const char* k : {kReason, kDetail, kHandler, kAttempts, kFirstFailedAt, kLastFailedAt, kOriginalExchange,
                        kOriginalRoutingKey, kOriginalQueue}) {
    if (key_is(e, k)) return true;
  }
  return false;
}
}  // namespace

DeadLetterProperties::DeadLetterProperties(const amqp_basic_properties_t& original, const DeadLetterInfo& info)
    : props_(original) {
  std::string first_failed;
  if (original._flags & AMQP_BASIC_HEADERS_FLAG) {
    const amqp_table_t& h = original.headers;
    entries_.reserve(static_cast<size_t>(h.num_entries) + 9);
    for (int i = 0; i < h.num_entries; ++i) {
      const auto& e = h.entries[i];
      if (key_is(e, kFirstFailedAt) && e.value.kind == AMQP_FIELD_KIND_UTF8)
        first_failed.assign(static_cast<const char*>(e.value.value.bytes.bytes), e.value.value.bytes.len);
      if (!ours(e)) entries_.push_back(e);
    }
  } else {
    entries_.reserve(9);
  }
  strings_.reserve(9);
  std::string now = now_iso8601();
  add_string(kReason, std::string(info.reason));
  add_string(kDetail, std::string(info.detail));
  if (!info.handler.empty()) add_string(kHandler, std::string(info.handler));
  amqp_table_entry_t attempts;
  attempts.key = amqp_cstring_bytes(kAttempts);
  attempts.value.kind = AMQP_FIELD_KIND_I64;
  attempts.value.value.i64 = info.attempts;
  entries_.push_back(attempts);
  add_string(kFirstFailedAt, first_failed.empty() ? now : first_failed);
  add_string(kLastFailedAt, now);
  add_string(kOriginalExchange, std::string(info.exchange));
  add_string(kOriginalRoutingKey, std::string(info.routing_key));
  add_string(kOriginalQueue, std::string(info.queue));

  props_._flags |= AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  props_.delivery_mode = AMQP_DELIVERY_PERSISTENT;
  props_.headers.num_entries = static_cast<int>(entries_.size());
  props_.headers.entries = entries_.data();
}

void DeadLetterProperties::add_string(const char* key, std::string value) {
  strings_.push_back(std::move(value));  // reserved above: no reallocation moves the bytes
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_bytes_t{strings_.back().size(), strings_.back().data()};
  entries_.push_back(e);
}

}  // namespace er::settle
