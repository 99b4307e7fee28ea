#include "settle/settle.hpp"

#include "util/time.hpp"

#include <amqp_framing.h>

#include <cctype>
#include <cstring>

namespace er::settle {

namespace {

constexpr size_t kShortStrMax = 255;
constexpr int kMaxTableDepth = 64;

std::string_view view(amqp_bytes_t b) { return {static_cast<const char*>(b.bytes), b.len}; }

bool key_is(const amqp_table_entry_t& e, const char* k) {
  size_t n = std::strlen(k);
  return e.key.len == n && std::memcmp(e.key.bytes, k, n) == 0;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

// Headers the broker acts on (CC/BCC sender-selected distribution, x-delay,
// x-death, ...) or that carry our bookkeeping: never taken from the original.
bool refused_key(std::string_view k) {
  if (iequals(k, "cc") || iequals(k, "bcc")) return true;
  return k.size() >= 2 && (k[0] == 'x' || k[0] == 'X') && k[1] == '-';
}

bool value_size(const amqp_field_value_t& v, int depth, size_t& size);

bool table_size(const amqp_table_t& t, int depth, size_t& size) {
  if (depth > kMaxTableDepth || t.num_entries < 0) return false;
  size += 4;
  for (int i = 0; i < t.num_entries; ++i) {
    const auto& e = t.entries[i];
    if (e.key.len > kShortStrMax) return false;  // amqp_encode_table would write only the low byte of the length
    size += 1 + e.key.len;
    if (!value_size(e.value, depth, size)) return false;
  }
  return true;
}

// Adds the encoded size of `v` (its type octet included); false when rabbitmq-c
// would not encode it faithfully or RabbitMQ could not parse it.
bool value_size(const amqp_field_value_t& v, int depth, size_t& size) {
  size += 1;
  switch (v.kind) {
    case AMQP_FIELD_KIND_BOOLEAN:
    case AMQP_FIELD_KIND_I8:
    case AMQP_FIELD_KIND_U8: size += 1; return true;
    case AMQP_FIELD_KIND_I16:
    case AMQP_FIELD_KIND_U16: size += 2; return true;
    case AMQP_FIELD_KIND_I32:
    case AMQP_FIELD_KIND_U32:
    case AMQP_FIELD_KIND_F32: size += 4; return true;
    case AMQP_FIELD_KIND_I64:
    case AMQP_FIELD_KIND_F64:
    case AMQP_FIELD_KIND_TIMESTAMP: size += 8; return true;
    case AMQP_FIELD_KIND_DECIMAL: size += 5; return true;
    case AMQP_FIELD_KIND_VOID: return true;
    case AMQP_FIELD_KIND_UTF8:
    case AMQP_FIELD_KIND_BYTES:
      if (v.value.bytes.len > UINT32_MAX) return false;
      size += 4 + v.value.bytes.len;
      return true;
    case AMQP_FIELD_KIND_TABLE: return table_size(v.value.table, depth + 1, size);
    case AMQP_FIELD_KIND_ARRAY: {
      if (depth + 1 > kMaxTableDepth || v.value.array.num_entries < 0) return false;
      size += 4;
      for (int i = 0; i < v.value.array.num_entries; ++i)
        if (!value_size(v.value.array.entries[i], depth + 1, size)) return false;
      return true;
    }
    default: return false;  // U64 ('L') is not in RabbitMQ's field table grammar; unknown kinds do not encode
  }
}

bool looks_like_timestamp(std::string_view s) {  // 2026-01-01T00:00:00.000Z, as util::now_iso8601 writes
  return s.size() == 24 && s[4] == '-' && s[7] == '-' && s[10] == 'T' && s[13] == ':' && s[16] == ':' &&
         s[19] == '.' && s[23] == 'Z';
}

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

constexpr int64_t kMaxAttempt = 1000000;

}  // namespace

std::string cap_text(std::string_view text, size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  static constexpr char kEllipsis[] = "\xe2\x80\xa6";  // U+2026
  if (max_bytes < 3) return std::string(text.substr(0, 0));
  size_t cut = max_bytes - 3;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // not inside a UTF-8 sequence
  std::string out(text.substr(0, cut));
  out += kEllipsis;
  return out;
}

namespace {
// The x-headers-dropped an earlier copy of ours carried (capped), or empty.
std::string earlier_drop(const amqp_basic_properties_t& p) {
  if (!(p._flags & AMQP_BASIC_HEADERS_FLAG)) return {};
  for (int i = 0; i < p.headers.num_entries; ++i) {
    const auto& e = p.headers.entries[i];
    if (key_is(e, kHeadersDropped)) return cap_text(string_value(e.value), kMaxNameBytes);
  }
  return {};
}
}  // namespace

struct CopyProperties::Input {
  const amqp_basic_properties_t& original;
  std::string_view body;
  const DeadLetterInfo& info;
  const CopySigner* signer;
  bool retry;
  uint32_t next_attempt;
  uint64_t expiration_ms;
  std::string first_failed;  // from the original's history, else empty (= now)
  std::string dropped;       // x-headers-dropped of a verified copy of ours: carried on
};

CopyProperties::CopyProperties(const amqp_basic_properties_t& original, std::string_view body,
                               const DeadLetterInfo& info, const CopySigner& signer, size_t frame_max) {
  Input in{original, body, info, &signer, false, 0, 0, {}, {}};
  in.first_failed = std::string(read_history(original, body, signer).first_failed_at);
  if (!in.first_failed.empty()) in.dropped = earlier_drop(original);
  make(in, frame_max);
}

CopyProperties::CopyProperties(const amqp_basic_properties_t& original, std::string_view body,
                               const DeadLetterInfo& info, uint32_t next_attempt, uint64_t expiration_ms,
                               const CopySigner& signer, size_t frame_max) {
  Input in{original, body, info, &signer, true, next_attempt, expiration_ms, {}, {}};
  in.first_failed = std::string(read_history(original, body, signer).first_failed_at);
  if (!in.first_failed.empty()) in.dropped = earlier_drop(original);
  make(in, frame_max);
}

void CopyProperties::make(const Input& in, size_t frame_max) {
  struct Step {
    bool keep_headers;
    size_t detail_max;
  };
  for (Step s : {Step{true, kMaxDetailBytes}, Step{false, kMaxDetailBytes}, Step{false, kMaxFallbackDetailBytes}}) {
    if (in.info.plain && s.keep_headers) continue;
    build(in, s.keep_headers, s.detail_max);
    fitted_ = fits(frame_max);
    if (fitted_) return;
  }
}

void CopyProperties::build(const Input& in, bool keep_headers, size_t detail_max) {
  const amqp_basic_properties_t& o = in.original;
  const DeadLetterInfo& info = in.info;
  props_ = amqp_basic_properties_t{};
  entries_.clear();
  strings_.clear();
  headers_dropped_ = false;

  // Content properties: only those listed in the header comment, only when encodable.
  auto carry = [&](amqp_flags_t flag, amqp_bytes_t amqp_basic_properties_t::*field) {
    if (!info.plain && (o._flags & flag) && (o.*field).len <= kShortStrMax) {
      props_._flags |= flag;
      props_.*field = o.*field;
    }
  };
  carry(AMQP_BASIC_CONTENT_TYPE_FLAG, &amqp_basic_properties_t::content_type);
  carry(AMQP_BASIC_CONTENT_ENCODING_FLAG, &amqp_basic_properties_t::content_encoding);
  carry(AMQP_BASIC_CORRELATION_ID_FLAG, &amqp_basic_properties_t::correlation_id);
  if ((o._flags & AMQP_BASIC_REPLY_TO_FLAG) && view(o.reply_to) != "amq.rabbitmq.reply-to")
    carry(AMQP_BASIC_REPLY_TO_FLAG, &amqp_basic_properties_t::reply_to);
  carry(AMQP_BASIC_MESSAGE_ID_FLAG, &amqp_basic_properties_t::message_id);
  carry(AMQP_BASIC_TYPE_FLAG, &amqp_basic_properties_t::type);
  carry(AMQP_BASIC_APP_ID_FLAG, &amqp_basic_properties_t::app_id);
  if (o._flags & AMQP_BASIC_PRIORITY_FLAG) {
    props_._flags |= AMQP_BASIC_PRIORITY_FLAG;
    props_.priority = o.priority;
  }
  if (o._flags & AMQP_BASIC_TIMESTAMP_FLAG) {
    props_._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
    props_.timestamp = o.timestamp;
  }

  size_t original_bytes = 4;  // encoded size of the original headers we would keep
  int original_count = 0;
  if ((o._flags & AMQP_BASIC_HEADERS_FLAG) && o.headers.num_entries > 0) {
    const amqp_table_t& h = o.headers;
    entries_.reserve(static_cast<size_t>(h.num_entries) + 12);
    for (int i = 0; i < h.num_entries; ++i) {
      const auto& e = h.entries[i];
      size_t size = 1 + e.key.len;
      if (e.key.len > kShortStrMax || refused_key(view(e.key)) || !value_size(e.value, 0, size)) continue;
      original_bytes += size;
      ++original_count;
      if (keep_headers) entries_.push_back(e);
    }
  }

  std::string exchange = cap_text(info.exchange, kMaxNameBytes);
  std::string routing_key = cap_text(info.routing_key, kMaxNameBytes);
  std::string queue = cap_text(info.queue, kMaxNameBytes);
  std::string reason = cap_text(info.reason, kMaxNameBytes);
  std::string detail = cap_text(info.detail, detail_max);
  std::string now = util::now_iso8601();
  std::string first = looks_like_timestamp(in.first_failed) ? in.first_failed : now;

  SignedFields sf;
  if (in.retry) {
    sf.kind = CopyKind::Retry;
    sf.attempt = in.next_attempt;
    add_int(kAttempt, in.next_attempt);
    std::string last_error = reason;
    if (!detail.empty()) last_error.append(": ").append(detail);
    add_string(kLastError, std::move(last_error));
  } else {
    sf.kind = CopyKind::DeadLetter;
    sf.attempt = info.attempts;
    add_string(kReason, std::move(reason));
    add_string(kDetail, std::move(detail));
    add_int(kAttempts, info.attempts);
  }
  if (!info.handler.empty()) add_string(kHandler, cap_text(info.handler, kMaxNameBytes));
  add_string(kFirstFailedAt, first);
  add_string(kLastFailedAt, std::move(now));
  add_string(kOriginalExchange, exchange);
  add_string(kOriginalRoutingKey, routing_key);
  add_string(kOriginalQueue, queue);
  if (in.signer) {
    sf.original_exchange = exchange;
    sf.original_routing_key = routing_key;
    sf.original_queue = queue;
    sf.first_failed_at = first;
    add_string(kSignature, in.signer->sign(sf, in.body));
  }
  if (info.plain) {
    headers_dropped_ = true;
    add_string(kHeadersDropped, "the broker refused the copy with the original's headers and properties");
  } else if (!keep_headers && original_count > 0) {
    headers_dropped_ = true;
    add_string(kHeadersDropped,
               "original headers did not fit in a frame (" + std::to_string(original_bytes) + " bytes)");
  } else if (!in.dropped.empty()) {
    // An earlier copy of ours lost the publisher's headers: say so on this one too.
    headers_dropped_ = true;
    add_string(kHeadersDropped, in.dropped);
  }

  if (in.retry) {
    set_bytes(props_.expiration, std::to_string(in.expiration_ms));
    props_._flags |= AMQP_BASIC_EXPIRATION_FLAG;
  }
  props_._flags |= AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  props_.delivery_mode = AMQP_DELIVERY_PERSISTENT;
  props_.headers.num_entries = static_cast<int>(entries_.size());
  props_.headers.entries = entries_.data();
}

bool CopyProperties::fits(size_t frame_max) const {
  if (frame_max <= kHeaderFrameOverhead) return false;
  thread_local std::vector<char> scratch;
  scratch.resize(frame_max - kHeaderFrameOverhead);
  amqp_basic_properties_t p = props_;  // amqp_encode_properties takes a non-const pointer
  return amqp_encode_properties(AMQP_BASIC_CLASS, &p, amqp_bytes_t{scratch.size(), scratch.data()}) >= 0;
}

void CopyProperties::set_bytes(amqp_bytes_t& field, std::string value) {
  strings_.push_back(std::move(value));
  field = amqp_bytes_t{strings_.back().size(), strings_.back().data()};
}

void CopyProperties::add_string(const char* key, std::string value) {
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  set_bytes(e.value.value.bytes, std::move(value));
  entries_.push_back(e);
}

void CopyProperties::add_int(const char* key, int64_t value) {
  amqp_table_entry_t e;
  e.key = amqp_cstring_bytes(key);
  e.value.kind = AMQP_FIELD_KIND_I64;
  e.value.value.i64 = value;
  entries_.push_back(e);
}

DeliveryHistory read_history(const amqp_basic_properties_t& props, std::string_view body, const CopySigner& signer) {
  const DeliveryHistory fresh;
  if (!(props._flags & AMQP_BASIC_HEADERS_FLAG)) return fresh;
  enum { kAtt, kAtts, kExch, kRk, kQueue, kFirst, kSig, kCount };
  static const char* const kNames[kCount] = {kAttempt, kAttempts, kOriginalExchange, kOriginalRoutingKey,
                                             kOriginalQueue, kFirstFailedAt, kSignature};
  const amqp_field_value_t* found[kCount] = {};
  for (int i = 0; i < props.headers.num_entries; ++i) {
    const auto& e = props.headers.entries[i];
    if (e.key.len < 2 || static_cast<const char*>(e.key.bytes)[0] != 'x') continue;
    for (int k = 0; k < kCount; ++k) {
      if (!key_is(e, kNames[k])) continue;
      if (found[k]) return fresh;  // a second copy of a header: which one would the signature mean?
      found[k] = &e.value;
    }
  }
  // Strings as longstr or byte array: the signature covers the bytes, whichever kind a relay chose.
  auto is_text = [](const amqp_field_value_t* v) {
    return v && (v->kind == AMQP_FIELD_KIND_UTF8 || v->kind == AMQP_FIELD_KIND_BYTES);
  };
  if (!is_text(found[kSig])) return fresh;
  if (!found[kAtt] == !found[kAtts]) return fresh;  // exactly one: a retry copy or a dead-letter copy
  for (int k : {kExch, kRk, kQueue, kFirst})
    if (!is_text(found[k])) return fresh;
  int64_t n;
  const amqp_field_value_t* att = found[kAtt] ? found[kAtt] : found[kAtts];
  if (!int_value(*att, &n) || n < 1 || n > kMaxAttempt) return fresh;

  SignedFields f;
  f.kind = found[kAtt] ? CopyKind::Retry : CopyKind::DeadLetter;
  f.attempt = static_cast<uint32_t>(n);
  f.original_exchange = string_value(*found[kExch]);
  f.original_routing_key = string_value(*found[kRk]);
  f.original_queue = string_value(*found[kQueue]);
  f.first_failed_at = string_value(*found[kFirst]);
  if (!signer.verify(f, body, string_value(*found[kSig]))) return fresh;

  DeliveryHistory h;
  h.has_original = true;
  h.original_exchange = f.original_exchange;
  h.original_routing_key = f.original_routing_key;
  h.original_queue = f.original_queue;
  h.first_failed_at = f.first_failed_at;
  if (f.kind == CopyKind::Retry) {
    h.attempt = f.attempt;
  } else {
    h.attempts_made = f.attempt;
  }
  return h;
}

}  // namespace er::settle
