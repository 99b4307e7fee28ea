// Envelope decoding with RapidJSON's SAX reader: no DOM, only the top-level
// envelope fields are copied (into `out`'s reused strings).
//
// Decisions for bad or odd input (each has a test in test_envelope.cpp):
//  - The body must be exactly one JSON value plus whitespace; anything after
//    it (including a raw NUL byte) is InvalidJson. Strings must be valid UTF-8.
//  - Nesting deeper than 64 levels is InvalidJson ("nesting deeper than 64
//    levels"): the handler stops the parse there, so the recursive reader
//    cannot exhaust the stack on hostile input.
//  - Numbers: integers beyond 64 bits and big reals are accepted (parsed as
//    double, then ignored). A number that overflows a double (1e400) is a
//    RapidJSON error, so InvalidJson ("Number too big to be stored in double.").
//  - Duplicate keys are accepted. A field takes the first usable occurrence,
//    whichever spelling: unusable values (null, bool, real, object, array,
//    empty string) count as absent.
//  - \u0000 is fine in the payload, but InvalidJson in a top-level envelope
//    string field: those become C strings and environment variables.
//  - A top-level envelope string over its cap (kMaxFieldBytes, event_type
//    kMaxEventTypeBytes) stops the parse at once: FieldTooLong. The value is
//    never copied into the envelope; only RapidJSON's own parse buffer held it.
#include "event/envelope.hpp"

#include <rapidjson/error/en.h>
#include <rapidjson/memorystream.h>
#include <rapidjson/reader.h>

#include <charconv>
#include <cstring>

namespace er::event {

const char* reason_code(DecodeStatus s) {
  switch (s) {
    case DecodeStatus::Ok: return "ok";
    case DecodeStatus::InvalidJson: return "invalid_json";
    case DecodeStatus::NotObject: return "not_object";
    case DecodeStatus::NoEventType: return "no_event_type";
    case DecodeStatus::FieldTooLong: return "field_too_long";
  }
  return "unknown";
}

void Envelope::clear() {
  event_id.clear();  // clear() keeps capacity for the next decode
  event_type.clear();
  aggregate_id.clear();
  aggregate_type.clear();
  correlation_id.clear();
  timestamp.clear();
  version = 0;
  type_from_routing_key = false;
}

namespace {

constexpr unsigned kMaxDepth = 64;
constexpr size_t kQuotedPrefix = 16;

// The first bytes of a value, safe for a log line or a header: printable
// ASCII as is, anything else as \xNN.
std::string escaped_prefix(const char* s, size_t len) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < len && i < kQuotedPrefix; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

enum Field { kNone = -1, kEventId, kEventType, kAggregateId, kAggregateType, kCorrelationId,
             kTimestamp, kVersion, kFieldCount };

struct KeyName {
  const char* name;
  size_t len;
  Field field;
};

#define ER_KEY(s, f) {s, sizeof(s) - 1, f}
constexpr KeyName kKeys[] = {
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

class EnvelopeHandler {
 public:
  explicit EnvelopeHandler(Envelope& out) : out_(out) {}

  TopKind top = TopKind::None;
  const char* error = nullptr;  // set when the handler stopped the parse
  const char* error_key = nullptr;
  size_t error_key_len = 0;
  bool too_long = false;        // the error is a field over its cap
  size_t too_long_len = 0;
  size_t too_long_cap = 0;
  std::string too_long_prefix;  // escaped, for the detail

  bool Null() { return scalar(TopKind::Null); }
  bool Bool(bool) { return scalar(TopKind::Bool); }
  bool Int(int i) { return integer(i); }
  bool Uint(unsigned u) { return integer(u); }
  bool Int64(int64_t i) { return integer(i); }
  bool Uint64(uint64_t u) {
    // Too big for `version` (treated as absent); still fine as text for an id.
    if (u > static_cast<uint64_t>(INT64_MAX) && depth_ == 1 && pending_ == kVersion) {
      return scalar(TopKind::Number);
    }
    return integer(u);
  }
  bool Double(double) { return scalar(TopKind::Number); }
  bool RawNumber(const char*, rapidjson::SizeType, bool) { return scalar(TopKind::Number); }

  bool String(const char* s, rapidjson::SizeType len, bool) {
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

  bool Key(const char* s, rapidjson::SizeType len, bool) {
    if (depth_ != 1) return true;
    pending_ = kNone;
    for (const auto& k : kKeys) {
      if (k.len == len && std::memcmp(k.name, s, len) == 0) {
        pending_ = k.field;
        error_key = k.name;  // for the NUL error message
        error_key_len = k.len;
        break;
      }
    }
    return true;
  }

  bool StartObject() { return open(TopKind::Object); }
  bool EndObject(rapidjson::SizeType) { --depth_; return true; }
  bool StartArray() { return open(TopKind::Array); }
  bool EndArray(rapidjson::SizeType) { --depth_; return true; }

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

  bool scalar(TopKind kind) {
    if (depth_ == 0) top = kind;
    if (depth_ == 1) pending_ = kNone;
    return true;
  }

  template <typename T>
  bool integer(T v) {
    if (depth_ == 0) top = TopKind::Number;
    if (depth_ != 1 || pending_ == kNone) return true;
    Field f = pending_;
    pending_ = kNone;
    if (seen_[f]) return true;
    seen_[f] = true;
    if (f == kVersion) {
      out_.version = static_cast<int64_t>(v);
    } else {
      char buf[24];
      auto r = std::to_chars(buf, buf + sizeof buf, v);
      str(f).assign(buf, r.ptr);
    }
    return true;
  }

  Envelope& out_;
  unsigned depth_ = 0;
  Field pending_ = kNone;
  bool seen_[kFieldCount] = {};
};

const char* kind_name(TopKind k) {
  switch (k) {
    case TopKind::Array: return "an array";
    case TopKind::String: return "a string";
    case TopKind::Number: return "a number";
    case TopKind::Bool: return "a boolean";
    case TopKind::Null: return "null";
    default: return "not an object";
  }
}

}  // namespace

DecodeStatus decode(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                    std::string& detail) {
  out.clear();
  detail.clear();

  // The reader keeps its string stack between calls: no allocation per event.
  thread_local rapidjson::Reader reader;
  rapidjson::MemoryStream stream(body ? body : "", body ? len : 0);
  EnvelopeHandler handler(out);
  constexpr unsigned kFlags = rapidjson::kParseValidateEncodingFlag;  // no StopWhenDone: trailing data is an error
  rapidjson::ParseResult r = reader.Parse<kFlags>(stream, handler);

  if (r.IsError()) {
    if (r.Code() == rapidjson::kParseErrorTermination && handler.too_long) {
      detail.assign(handler.error_key, handler.error_key_len);
      detail += " is " + std::to_string(handler.too_long_len) + " bytes, longer than the " +
                std::to_string(handler.too_long_cap) +
                " allowed: \"" + handler.too_long_prefix + "\"...";
      out.clear();
      return DecodeStatus::FieldTooLong;
    }
    if (r.Code() == rapidjson::kParseErrorTermination && handler.error) {
      detail = handler.error;
      if (handler.error_key) detail.append(handler.error_key, handler.error_key_len);
    } else {
      detail = "invalid JSON at offset ";
      detail += std::to_string(r.Offset());
      detail += ": ";
      detail += rapidjson::GetParseError_En(r.Code());
    }
    out.clear();
    return DecodeStatus::InvalidJson;
  }
  // MemoryStream reports a raw NUL byte as the end of input; reject what follows it.
  if (stream.Tell() != len) {
    detail = "invalid JSON at offset ";
    detail += std::to_string(stream.Tell());
    detail += ": NUL byte outside a string.";
    out.clear();
    return DecodeStatus::InvalidJson;
  }
  if (handler.top != TopKind::Object) {
    detail = "top-level JSON value is ";
    detail += kind_name(handler.top);
    out.clear();
    return DecodeStatus::NotObject;
  }
  if (out.event_type.empty()) {
    if (routing_key.empty()) {
      detail = "the envelope has no event_type and the routing key is empty";
      return DecodeStatus::NoEventType;
    }
    out.event_type.assign(routing_key.data(), routing_key.size());
    out.type_from_routing_key = true;
  }
  return DecodeStatus::Ok;
}

}  // namespace er::event
