#include "settle/emit.hpp"

#include <openssl/evp.h>
#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cstdint>
#include <cstring>

#include "event/envelope.hpp"
#include "event/schema.hpp"
#include "settle/settle.hpp"
#include "util/time.hpp"

namespace er::settle {

namespace {

constexpr unsigned kParseFlags =
    rapidjson::kParseValidateEncodingFlag | rapidjson::kParseFullPrecisionFlag | rapidjson::kParseIterativeFlag;
constexpr size_t kShowTypeBytes = 64;  // of an event type quoted in an error

std::string hex(const unsigned char* b, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  s.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    s += digits[b[i] >> 4];
    s += digits[b[i] & 0x0F];
  }
  return s;
}

void netstring(std::string& out, std::string_view s) {
  out += std::to_string(s.size());
  out += ':';
  out += s;
  out += ',';
}

}  // namespace

bool json_too_deep(std::string_view text, size_t max_depth) {
  size_t depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) return true;
    } else if (c == '}' || c == ']') {
      if (depth > 0) --depth;
    }
  }
  return false;
}

namespace {

// Deeper than the envelope decoder reads, or deep enough that writing the
// payload back (recursive) could exhaust the stack.
bool too_deep(std::string_view text) { return json_too_deep(text, kMaxEmitDepth); }

// The keys an emit object may carry; any other key is ignored (later
// versions may add some), except the envelope fields the daemon owns.
enum Key { kType, kPayload, kAggregateId, kAggregateType, kRoutingKey, kVersion, kKeyCount };
const char* const kKeys[kKeyCount] = {"event_type", "payload", "aggregate_id", "aggregate_type", "routing_key",
                                      "version"};
const char* const kOwned[] = {"event_id",   "eventId",      "timestamp",      "correlation_id",
                              "correlationId", "causation_id", "causationId"};
const char* const kCamel[] = {"eventType", "aggregateId", "aggregateType", "routingKey"};

struct Names {
  const char *id, *type, *aggregate_id, *aggregate_type, *correlation_id, *causation_id;
};
constexpr Names kSnake{"event_id", "event_type", "aggregate_id", "aggregate_type", "correlation_id", "causation_id"};
constexpr Names kCamelNames{"eventId", "eventType", "aggregateId", "aggregateType", "correlationId", "causationId"};

using Writer = rapidjson::Writer<rapidjson::StringBuffer>;

void put(Writer& w, const char* key, std::string_view value) {
  w.Key(key);
  w.String(value.data(), static_cast<rapidjson::SizeType>(value.size()));
}

// One emit object; `why` (without the index) on failure, `type` as soon as known.
bool build_one(std::string_view text, size_t index, const EmitTrigger& t, std::string_view trigger_key,
               const EmitOptions& o, std::string_view ts, EmittedEvent& ev, std::string& why) {
  if (too_deep(text)) {
    why = "nested deeper than " + std::to_string(kMaxEmitDepth) + " levels";
    return false;
  }
  rapidjson::Document d;
  d.Parse<kParseFlags>(text.data(), text.size());
  if (d.HasParseError()) {
    why = std::string("invalid JSON: ") + rapidjson::GetParseError_En(d.GetParseError()) + " (at byte " +
          std::to_string(d.GetErrorOffset()) + ")";
    return false;
  }
  if (!d.IsObject()) {
    why = "not a JSON object";
    return false;
  }
  const rapidjson::Value* v[kKeyCount] = {};
  for (auto& m : d.GetObject()) {
    std::string_view k(m.name.GetString(), m.name.GetStringLength());
    for (const char* owned : kOwned) {
      if (k == owned) {
        why = "'" + std::string(k) + "' is the daemon's to set";
        return false;
      }
    }
    for (int i = 0; i < kKeyCount; ++i) {
      if (k != kKeys[i]) continue;
      if (v[i]) {
        why = "duplicate key '" + std::string(k) + "'";
        return false;
      }
      v[i] = &m.value;
    }
  }
  auto absent = [&](Key k) { return !v[k] || v[k]->IsNull(); };
  // A short, non-empty string of at most `max` bytes.
  auto text_of = [&](Key k, size_t max, std::string& into) {
    if (!v[k]->IsString() || v[k]->GetStringLength() == 0 || v[k]->GetStringLength() > max) {
      why = std::string("'") + kKeys[k] + "' must be a non-empty string of at most " + std::to_string(max) + " bytes";
      return false;
    }
    into.assign(v[k]->GetString(), v[k]->GetStringLength());
    return true;
  };
  if (absent(kType)) {
    why = "no event_type";
    for (const char* c : kCamel)
      if (d.HasMember(c)) why += " (the keys of an emit object are snake_case: '" + std::string(c) + "' is not one)";
    return false;
  }
  if (!text_of(kType, event::kMaxEventTypeBytes, ev.event_type)) return false;
  ev.routing_key = ev.event_type;
  if (!absent(kRoutingKey) && !text_of(kRoutingKey, event::kMaxEventTypeBytes, ev.routing_key)) return false;
  std::string aggregate_id, aggregate_type;
  if (!absent(kAggregateId) && !text_of(kAggregateId, event::kMaxFieldBytes, aggregate_id)) return false;
  if (!absent(kAggregateType) && !text_of(kAggregateType, event::kMaxFieldBytes, aggregate_type)) return false;
  if (!absent(kPayload) && !v[kPayload]->IsObject()) {
    why = "'payload' must be a JSON object";
    return false;
  }
  int64_t version = 1;
  if (!absent(kVersion)) {
    if (!v[kVersion]->IsInt64() || v[kVersion]->GetInt64() < 1) {
      why = "'version' must be a positive integer";
      return false;
    }
    version = v[kVersion]->GetInt64();
  }

  ev.event_id = emit_event_id(trigger_key, t.handler, index);
  ev.correlation_id = std::string(t.correlation_id.empty() ? t.event_id : t.correlation_id);
  const Names& n = o.style == config::EmitStyle::Camel ? kCamelNames : kSnake;
  rapidjson::StringBuffer buf;
  Writer w(buf);
  w.StartObject();
  put(w, n.id, ev.event_id);
  put(w, n.type, ev.event_type);
  put(w, "timestamp", ts);
  w.Key("version");
  w.Int64(version);
  if (!aggregate_id.empty()) put(w, n.aggregate_id, aggregate_id);
  if (!aggregate_type.empty()) put(w, n.aggregate_type, aggregate_type);
  if (!ev.correlation_id.empty()) put(w, n.correlation_id, ev.correlation_id);
  if (!t.event_id.empty()) put(w, n.causation_id, t.event_id);
  w.Key("payload");
  if (absent(kPayload)) {
    w.StartObject();
    w.EndObject();
  } else {
    v[kPayload]->Accept(w);
  }
  w.EndObject();
  if (buf.GetSize() > o.max_event_bytes) {
    why = "the event is " + std::to_string(buf.GetSize()) + " bytes, over max_message_bytes " +
          std::to_string(o.max_event_bytes);
    return false;
  }
  ev.body.assign(buf.GetString(), buf.GetSize());
  // What consumers will decode: the daemon's own decoder and the schemas.
  event::Envelope env;
  std::string detail;
  auto st = event::decode(ev.body.data(), ev.body.size(), {}, env, detail);
  if (st != event::DecodeStatus::Ok) {
    why = std::string(event::reason_code(st)) + ": " + detail;
    return false;
  }
  if (o.schemas && !o.schemas->validate(ev.body.data(), ev.body.size(), ev.event_type, detail)) {
    why = "schema violation: " + detail;
    return false;
  }
  return true;
}

}  // namespace

amqp_basic_properties_t EmittedEvent::properties(uint64_t unix_seconds) const {
  auto b = [](const std::string& s) { return amqp_bytes_t{s.size(), const_cast<char*>(s.data())}; };
  amqp_basic_properties_t p{};
  p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG |
             AMQP_BASIC_TYPE_FLAG | AMQP_BASIC_TIMESTAMP_FLAG;
  p.content_type = amqp_cstring_bytes("application/json");
  p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
  p.message_id = b(event_id);
  p.type = b(event_type);
  p.timestamp = unix_seconds;
  if (!correlation_id.empty() && correlation_id.size() <= 255) {
    p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
    p.correlation_id = b(correlation_id);
  }
  return p;
}

std::string emit_event_id(std::string_view trigger, std::string_view handler, size_t index) {
  static const unsigned char* ns = [] {
    static unsigned char b[16];
    const char* s = kEmitNamespace;
    for (int i = 0; i < 16; ++i) {
      while (*s == '-') ++s;
      auto nib = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
      b[i] = static_cast<unsigned char>(nib(s[0]) << 4 | nib(s[1]));
      s += 2;
    }
    return b;
  }();
  std::string name(reinterpret_cast<const char*>(ns), 16);
  netstring(name, trigger);
  netstring(name, handler);
  name += std::to_string(index);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(name.data(), name.size(), md, &len, EVP_sha1(), nullptr);
  md[6] = static_cast<unsigned char>((md[6] & 0x0F) | 0x50);  // version 5
  md[8] = static_cast<unsigned char>((md[8] & 0x3F) | 0x80);  // RFC 4122 variant
  std::string h = hex(md, 16);
  return h.substr(0, 8) + '-' + h.substr(8, 4) + '-' + h.substr(12, 4) + '-' + h.substr(16, 4) + '-' + h.substr(20);
}

bool build_emits(const std::vector<std::string>& emits, const EmitTrigger& t, const EmitOptions& o,
                 std::vector<EmittedEvent>& out, std::string& error) {
  out.clear();
  if (emits.size() > kMaxEmits) {
    error = std::to_string(emits.size()) + " emitted events, at most " + std::to_string(kMaxEmits);
    return false;
  }
  size_t total = 0;
  for (const auto& e : emits) total += e.size();
  if (total > kMaxEmitTotalBytes) {
    error = "emitted events of " + std::to_string(total) + " bytes together, at most " +
            std::to_string(kMaxEmitTotalBytes);
    return false;
  }
  std::string trigger_key;
  if (t.event_id.empty()) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_Digest(t.body.data(), t.body.size(), md, &len, EVP_sha256(), nullptr);
    trigger_key = "sha256:" + hex(md, len);
  }
  const std::string ts = o.timestamp.empty() ? util::now_iso8601() : o.timestamp;
  out.resize(emits.size());
  std::string why;
  for (size_t i = 0; i < emits.size(); ++i) {
    if (build_one(emits[i], i, t, t.event_id.empty() ? std::string_view(trigger_key) : t.event_id, o, ts, out[i],
                  why))
      continue;
    error = "emit[" + std::to_string(i) + "]";
    const std::string& type = out[i].event_type;
    if (!type.empty()) {
      error += " (";
      error += cap_text(type, kShowTypeBytes);
      error += ')';
    }
    error += ": " + why;
    out.clear();
    return false;
  }
  return true;
}

}  // namespace er::settle
