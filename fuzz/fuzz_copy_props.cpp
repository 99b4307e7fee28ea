// libFuzzer target for settle::CopyProperties and read_history(): builds an
// arbitrary incoming message (every property, a header table with nested
// tables/arrays of any kind, long keys, CC/BCC/x- headers, forged signatures)
// and checks that both copies, for frame_max 131072 and 4096:
//  - encode into one content header frame (checked with rabbitmq-c itself,
//    then decoded back: what the broker would receive),
//  - carry no user_id, cluster_id, CC/BCC, and no x- header but ours, once each,
//  - read back, with the right key, exactly the attempt and original routing
//    written; with a wrong key, as a fresh delivery.
// And that the incoming message's own bookkeeping is never believed.
#include <amqp.h>
#include <amqp_framing.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "settle/settle.hpp"
#include "settle/signer.hpp"

using namespace er::settle;

namespace {

#define CHECK(cond) \
  do {              \
    if (!(cond)) __builtin_trap(); \
  } while (0)

class Input {
 public:
  Input(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  uint8_t u8() { return pos_ < n_ ? d_[pos_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() << 8 | u8()); }
  uint32_t u32() { return static_cast<uint32_t>(u16()) << 16 | u16(); }
  uint64_t u64() { return static_cast<uint64_t>(u32()) << 32 | u32(); }
  // Up to `max` bytes taken from the input.
  std::string text(size_t max) {
    size_t len = u16() % (max + 1);
    len = std::min(len, n_ - pos_);
    std::string s(reinterpret_cast<const char*>(d_ + pos_), len);
    pos_ += len;
    return s;
  }
  // A long value for few input bytes: up to 65535 copies of one byte.
  std::string bulk() {
    size_t len = u16();
    return std::string(len, static_cast<char>(u8()));
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t pos_ = 0;
};

const char* const kInteresting[] = {
    "CC", "BCC", "cc", "Bcc", "x-death", "X-Delay", "x-match", "x-dead-letter-exchange", "x-er-sig", "x-attempt",
    "x-attempts", "x-original-routing-key", "x-original-exchange", "x-original-queue", "x-first-failed-at",
    "x-headers-dropped", "x-death-reason", "traceparent", "", "x", "X-"};

const char kKinds[] = {AMQP_FIELD_KIND_BOOLEAN, AMQP_FIELD_KIND_I8,  AMQP_FIELD_KIND_U8,      AMQP_FIELD_KIND_I16,
                       AMQP_FIELD_KIND_U16,     AMQP_FIELD_KIND_I32, AMQP_FIELD_KIND_U32,     AMQP_FIELD_KIND_I64,
                       AMQP_FIELD_KIND_U64,     AMQP_FIELD_KIND_F32, AMQP_FIELD_KIND_F64,     AMQP_FIELD_KIND_DECIMAL,
                       AMQP_FIELD_KIND_UTF8,    AMQP_FIELD_KIND_ARRAY, AMQP_FIELD_KIND_TIMESTAMP, AMQP_FIELD_KIND_TABLE,
                       AMQP_FIELD_KIND_VOID,    AMQP_FIELD_KIND_BYTES, 'Z'};

// Owns everything the built message points to.
struct Message {
  std::deque<std::string> strings;
  std::deque<std::vector<amqp_table_entry_t>> tables;
  std::deque<std::vector<amqp_field_value_t>> arrays;
  amqp_basic_properties_t props{};
  std::string body;

  amqp_bytes_t keep(std::string s) {
    strings.push_back(std::move(s));
    return amqp_bytes_t{strings.back().size(), strings.back().data()};
  }

  amqp_field_value_t value(Input& in, int depth) {
    amqp_field_value_t v{};
    v.kind = static_cast<uint8_t>(kKinds[in.u8() % sizeof kKinds]);
    switch (v.kind) {
      case AMQP_FIELD_KIND_UTF8:
      case AMQP_FIELD_KIND_BYTES: v.value.bytes = keep(in.u8() & 1 ? in.bulk() : in.text(64)); break;
      case AMQP_FIELD_KIND_TABLE:
        if (depth > 70) v.kind = AMQP_FIELD_KIND_VOID;
        else v.value.table = table(in, depth + 1);
        break;
      case AMQP_FIELD_KIND_ARRAY: {
        if (depth > 70) {
          v.kind = AMQP_FIELD_KIND_VOID;
          break;
        }
        int n = in.u8() % 5;
        arrays.emplace_back();
        auto& a = arrays.back();
        for (int i = 0; i < n; ++i) a.push_back(value(in, depth + 1));
        v.value.array = amqp_array_t{n, a.data()};
        break;
      }
      default: v.value.u64 = in.u64(); break;  // every scalar kind reads its part of the union
    }
    return v;
  }

  amqp_table_t table(Input& in, int depth) {
    int n = in.u8() % 10;
    tables.emplace_back();
    auto& t = tables.back();
    for (int i = 0; i < n; ++i) {
      amqp_table_entry_t e{};
      uint8_t pick = in.u8();
      e.key = pick < 128 ? keep(kInteresting[pick % (sizeof kInteresting / sizeof *kInteresting)]) : keep(in.text(300));
      e.value = value(in, depth);
      t.push_back(e);
    }
    return amqp_table_t{n, t.data()};
  }

  void build(Input& in) {
    props._flags = in.u16() & 0xfffc;
    for (amqp_bytes_t* f : {&props.content_type, &props.content_encoding, &props.correlation_id, &props.reply_to,
                            &props.expiration, &props.message_id, &props.type, &props.user_id, &props.app_id,
                            &props.cluster_id}) {
      uint8_t how = in.u8();
      *f = keep(how < 16 ? std::string("amq.rabbitmq.reply-to") : how < 32 ? std::string(255, 'p') : in.text(300));
    }
    props.delivery_mode = in.u8();
    props.priority = in.u8();
    props.timestamp = in.u64();
    props.headers = table(in, 0);
    body = in.text(512);
  }
};

bool iequals(std::string_view a, const char* b) {
  if (a.size() != std::strlen(b)) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if ((a[i] | 0x20) != (b[i] | 0x20)) return false;
  return true;
}

std::string_view sv(amqp_bytes_t b) { return {static_cast<const char*>(b.bytes), b.len}; }

void check_copy(const CopyProperties& c, bool retry, size_t frame_max, const Message& m, const DeadLetterInfo& info,
                uint32_t next_attempt, const CopySigner& signer, const CopySigner& wrong) {
  CHECK(c.fitted());
  // Encode as rabbitmq-c does for this frame_max, and decode: what the broker would get.
  static std::vector<char> scratch(131072);  // reused: zeroing 128 KiB per copy under ASan halves exec/s
  amqp_bytes_t buf{frame_max - kHeaderFrameOverhead, scratch.data()};
  amqp_basic_properties_t p = *c.get();
  int n = amqp_encode_properties(AMQP_BASIC_CLASS, &p, buf);
  CHECK(n >= 0);
  amqp_pool_t pool;
  init_amqp_pool(&pool, 4096);
  void* out = nullptr;
  CHECK(amqp_decode_properties(AMQP_BASIC_CLASS, &pool, amqp_bytes_t{static_cast<size_t>(n), buf.bytes}, &out) == 0);
  const auto& d = *static_cast<amqp_basic_properties_t*>(out);

  CHECK((d._flags & (AMQP_BASIC_USER_ID_FLAG | AMQP_BASIC_CLUSTER_ID_FLAG)) == 0);
  CHECK(!(d._flags & AMQP_BASIC_EXPIRATION_FLAG) == !retry);
  CHECK((d._flags & AMQP_BASIC_DELIVERY_MODE_FLAG) && d.delivery_mode == 2);
  if (d._flags & AMQP_BASIC_REPLY_TO_FLAG) CHECK(sv(d.reply_to) != "amq.rabbitmq.reply-to");
  static const std::set<std::string_view> kOurs = {kReason, kDetail, kHandler, kAttempts, kFirstFailedAt,
                                                    kLastFailedAt, kOriginalExchange, kOriginalRoutingKey,
                                                    kOriginalQueue, kAttempt, kLastError, kSignature,
                                                    kHeadersDropped};
  std::set<std::string_view> seen;
  CHECK(d._flags & AMQP_BASIC_HEADERS_FLAG);
  for (int i = 0; i < d.headers.num_entries; ++i) {
    std::string_view k = sv(d.headers.entries[i].key);
    CHECK(!iequals(k, "cc") && !iequals(k, "bcc"));
    if (k.size() >= 2 && (k[0] | 0x20) == 'x' && k[1] == '-') {
      CHECK(kOurs.count(k) == 1);
      CHECK(seen.insert(k).second);
    }
  }
  CHECK(seen.count(kSignature) == 1);
  CHECK(seen.count(kHeadersDropped) == (c.headers_dropped() ? 1u : 0u));

  DeliveryHistory h = read_history(d, m.body, signer);
  CHECK(h.has_original);
  CHECK(h.original_exchange == cap_text(info.exchange, kMaxNameBytes));
  CHECK(h.original_routing_key == cap_text(info.routing_key, kMaxNameBytes));
  CHECK(h.original_queue == cap_text(info.queue, kMaxNameBytes));
  if (retry) {
    CHECK(h.attempt == next_attempt);
  } else {
    CHECK(h.attempt == 1 && h.attempts_made == info.attempts);
  }
  DeliveryHistory w = read_history(d, m.body, wrong);
  CHECK(w.attempt == 1 && !w.has_original && w.original_routing_key.empty());
  empty_amqp_pool(&pool);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const CopySigner signer(std::string(32, 'k'));
  static const CopySigner wrong(std::string(32, 'w'));
  Input in(data, size);
  Message m;
  m.build(in);
  std::string reason = in.text(300), detail = in.u8() & 1 ? in.bulk() : in.text(300), handler = in.text(300),
              queue = in.text(300), exchange = in.text(300), routing_key = in.text(300);
  DeadLetterInfo info{reason, detail, handler, queue, exchange, routing_key, in.u32() % 1000000 + 1};
  uint32_t next_attempt = in.u32() % 1000000 + 1;
  uint64_t expiration = in.u64();

  // Whatever the message says about its history, it is not ours.
  DeliveryHistory forged = read_history(m.props, m.body, signer);
  CHECK(forged.attempt == 1 && !forged.has_original);

  for (size_t frame_max : {size_t{131072}, kMinFrameMax}) {
    CopyProperties dl(m.props, m.body, info, signer, frame_max);
    check_copy(dl, false, frame_max, m, info, 0, signer, wrong);
    CopyProperties retry(m.props, m.body, info, next_attempt, expiration, signer, frame_max);
    check_copy(retry, true, frame_max, m, info, next_attempt, signer, wrong);
    // A copy of our own copy (the next failure) is just as clean.
    CopyProperties again(*retry.get(), m.body, info, signer, frame_max);
    check_copy(again, false, frame_max, m, info, 0, signer, wrong);
  }
  return 0;
}
