#pragma once
// The envelope decoder's SAX handler (see envelope.cpp for its rules), open
// to a "tee" that sees every parser event the decoder accepted: schema
// validation rides on the decoder's one parse instead of parsing again.
// Internal to src/event.
#include <rapidjson/memorystream.h>
#include <rapidjson/reader.h>

#include <charconv>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "event/envelope.hpp"

namespace er::event::sax {

inline constexpr unsigned kMaxDepth = 64;

// The first bytes of a value, safe for a log line or a header.
std::string escaped_prefix(const char* s, size_t len);

enum Field { kNone = -1, kEventId, kEventType, kAggregateId, kAggregateType, kCorrelationId,
             kTimestamp, kVersion, kFieldCount };

struct KeyName {
  const char* name;
  size_t len;
  Field field;
};

#define ER_KEY(s, f) {s, sizeof(s) - 1, f}
inline constexpr KeyName kKeys[] = {
    ER_KEY("event_id", kEventId),
    ER_KEY("eventId", kEventId),
    ER_KEY("event_type", kEventType),
    ER_KEY("eventType", kEventType),
    ER_KEY("aggregate_id", kAggregateId),
    ER_KEY("aggregateId", kAggregateId),
    ER_KEY("aggregate_type", kAggregateType),
    ER_KEY("aggregateType", kAggregateType),
    ER_KEY("correlation_id", kCorrelationId),
    ER_KEY("correlationId", kCorrelationId),
    ER_KEY("timestamp", kTimestamp),
    ER_KEY("version", kVersion),
};
#undef ER_KEY

enum class TopKind { None, Object, Array, String, Number, Bool, Null };

// What the handler found out, for finish().
struct State {
  TopKind top = TopKind::None;
  const char* error = nullptr;  // set when the handler stopped the parse
  const char* error_key = nullptr;
  size_t error_key_len = 0;
  bool too_long = false;        // the error is a field over its cap
  size_t too_long_len = 0;
  size_t too_long_cap = 0;
  std::string too_long_prefix;  // escaped, for the detail
};

// A tee that sees nothing: plain decode().
struct NoTee {
  void Null() {}
  void Bool(bool) {}
  void Int(int) {}
  void Uint(unsigned) {}
  void Int64(int64_t) {}
  void Uint64(uint64_t) {}
  void Double(double) {}
  void String(const char*, rapidjson::SizeType) {}
  void Key(const char*, rapidjson::SizeType) {}
  void StartObject() {}
  void EndObject(rapidjson::SizeType) {}
  void StartArray() {}
  void EndArray(rapidjson::SizeType) {}
};

template <class Tee>
class Handler : public State {
 public:
  Handler(Envelope& out, Tee& tee) : out_(out), tee_(tee) {}

  bool Null() { scalar(TopKind::Null); tee_.Null(); return true; }
  bool Bool(bool b) { scalar(TopKind::Bool); tee_.Bool(b); return true; }
  bool Int(int i) { integer(i); tee_.Int(i); return true; }
  bool Uint(unsigned u) { integer(u); tee_.Uint(u); return true; }
  bool Int64(int64_t i) { integer(i); tee_.Int64(i); return true; }
  bool Uint64(uint64_t u) {
    // Too big for `version` (treated as absent); still fine as text for an id.
    if (u > static_cast<uint64_t>(INT64_MAX) && depth_ == 1 && pending_ == kVersion) {
      scalar(TopKind::Number);
    } else {
      integer(u);
    }
    tee_.Uint64(u);
    return true;
  }
  bool Double(double d) { scalar(TopKind::Number); tee_.Double(d); return true; }
  bool RawNumber(const char*, rapidjson::SizeType, bool) { scalar(TopKind::Number); return true; }  // not enabled

  bool String(const char* s, rapidjson::SizeType len, bool) {
    if (!string(s, len)) return false;
    tee_.String(s, len);
    return true;
  }

  bool Key(const char* s, rapidjson::SizeType len, bool) {
    if (depth_ == 1) {
      pending_ = kNone;
      for (const auto& k : kKeys) {
        if (k.len == len && std::memcmp(k.name, s, len) == 0) {
          pending_ = k.field;
          error_key = k.name;  // for the NUL error message
          error_key_len = k.len;
          break;
        }
      }
    }
    tee_.Key(s, len);
    return true;
  }

  bool StartObject() {
    if (!open(TopKind::Object)) return false;
    tee_.StartObject();
    return true;
  }
  bool EndObject(rapidjson::SizeType n) { --depth_; tee_.EndObject(n); return true; }
  bool StartArray() {
    if (!open(TopKind::Array)) return false;
    tee_.StartArray();
    return true;
  }
  bool EndArray(rapidjson::SizeType n) { --depth_; tee_.EndArray(n); return true; }

 private:
  std::string& str(Field f) {
    switch (f) {
      case kEventId: return out_.event_id;
      case kEventType: return out_.event_type;
      case kAggregateId: return out_.aggregate_id;
      case kAggregateType: return out_.aggregate_type;
      case kCorrelationId: return out_.correlation_id;
      default: return out_.timestamp;
    }
  }

  bool string(const char* s, rapidjson::SizeType len) {
    if (depth_ == 0) top = TopKind::String;
    if (depth_ != 1 || pending_ == kNone) return true;
    Field f = pending_;
    pending_ = kNone;
    if (f == kVersion) return true;
    size_t cap = f == kEventType ? kMaxEventTypeBytes : kMaxFieldBytes;
    if (len > cap) {
      too_long = true;
      too_long_len = len;
      too_long_cap = cap;
      too_long_prefix = escaped_prefix(s, len);
      return false;
    }
    if (std::memchr(s, '\0', len) != nullptr) {
      error = "NUL character in ";
      return false;
    }
    if (len > 0 && !seen_[f]) {
      seen_[f] = true;
      str(f).assign(s, len);
    }
    return true;
  }

  bool open(TopKind kind) {
    if (depth_ == 0) top = kind;
    if (depth_ == 1) pending_ = kNone;  // a container is never an envelope value
    if (++depth_ > kMaxDepth) {
      error = "nesting deeper than 64 levels";
      error_key = nullptr;
      return false;
    }
    return true;
  }

  void scalar(TopKind kind) {
    if (depth_ == 0) top = kind;
    if (depth_ == 1) pending_ = kNone;
  }

  template <typename T>
  void integer(T v) {
    if (depth_ == 0) top = TopKind::Number;
    if (depth_ != 1 || pending_ == kNone) return;
    Field f = pending_;
    pending_ = kNone;
    if (seen_[f]) return;
    seen_[f] = true;
    if (f == kVersion) {
      out_.version = static_cast<int64_t>(v);
    } else {
      char buf[24];
      auto r = std::to_chars(buf, buf + sizeof buf, v);
      str(f).assign(buf, r.ptr);
    }
  }

  Envelope& out_;
  Tee& tee_;
  unsigned depth_ = 0;
  Field pending_ = kNone;
  bool seen_[kFieldCount] = {};
};

// The status and detail of a finished parse; fills the event type from the
// routing key when the body names none.
DecodeStatus finish(const rapidjson::ParseResult& r, size_t tell, size_t len, const State& st,
                    std::string_view routing_key, Envelope& out, std::string& detail);

template <class Tee>
DecodeStatus decode_with(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                         std::string& detail, Tee& tee) {
  out.clear();
  detail.clear();
  // The reader keeps its string stack between calls: no allocation per event.
  thread_local rapidjson::Reader reader;
  rapidjson::MemoryStream stream(body ? body : "", body ? len : 0);
  Handler<Tee> handler(out, tee);
  constexpr unsigned kFlags = rapidjson::kParseValidateEncodingFlag;  // no StopWhenDone: trailing data is an error
  rapidjson::ParseResult r = reader.Parse<kFlags>(stream, handler);
  return finish(r, stream.Tell(), len, handler, routing_key, out, detail);
}

}  // namespace er::event::sax
