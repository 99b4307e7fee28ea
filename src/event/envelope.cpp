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

#include "event/envelope_sax.hpp"

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

namespace sax {

std::string escaped_prefix(const char* s, size_t len) {
  constexpr size_t kQuotedPrefix = 16;
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

namespace {
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

DecodeStatus finish(const rapidjson::ParseResult& r, size_t tell, size_t len, const State& handler,
                    std::string_view routing_key, Envelope& out, std::string& detail) {
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
  if (tell != len) {
    detail = "invalid JSON at offset ";
    detail += std::to_string(tell);
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

}  // namespace sax

DecodeStatus decode(const char* body, size_t len, std::string_view routing_key, Envelope& out,
                    std::string& detail) {
  sax::NoTee none;
  return sax::decode_with(body, len, routing_key, out, detail, none);
}

}  // namespace er::event
