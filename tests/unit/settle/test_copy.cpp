// The copies the daemon publishes for an untrusted message: what they carry,
// that they always fit a frame, and that their bookkeeping is signed.
#include <catch2/catch.hpp>

#include <amqp.h>
#include <amqp_framing.h>

#include <map>
#include <string>
#include <vector>

#include "settle/settle.hpp"
#include "settle/signer.hpp"

using namespace er::settle;

namespace {

const std::string kKey(32, 'k');
const std::string kOtherKey(32, 'o');

std::string S(amqp_bytes_t b) { return std::string(static_cast<const char*>(b.bytes), b.len); }

// The entry points into `v`: a literal, or a string that outlives the entry.
amqp_table_entry_t text(const char* k, const std::string& v) {
  amqp_table_entry_t e{};
  e.key = amqp_cstring_bytes(k);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_bytes_t{v.size(), const_cast<char*>(v.data())};
  return e;
}
amqp_table_entry_t text(const char* k, const char* v) {
  amqp_table_entry_t e{};
  e.key = amqp_cstring_bytes(k);
  e.value.kind = AMQP_FIELD_KIND_UTF8;
  e.value.value.bytes = amqp_cstring_bytes(v);
  return e;
}
amqp_table_entry_t text(const char* k, std::string&&) = delete;
amqp_table_entry_t integer(const char* k, int64_t v) {
  amqp_table_entry_t e{};
  e.key = amqp_cstring_bytes(k);
  e.value.kind = AMQP_FIELD_KIND_I64;
  e.value.value.i64 = v;
  return e;
}

std::map<std::string, amqp_field_value_t> headers_of(const amqp_basic_properties_t& p) {
  std::map<std::string, amqp_field_value_t> out;
  REQUIRE((p._flags & AMQP_BASIC_HEADERS_FLAG));
  for (int i = 0; i < p.headers.num_entries; ++i) {
    std::string key = S(p.headers.entries[i].key);
    REQUIRE(out.count(key) == 0);
    out[key] = p.headers.entries[i].value;
  }
  return out;
}
std::string str(const amqp_field_value_t& v) {
  REQUIRE(v.kind == AMQP_FIELD_KIND_UTF8);
  return S(v.value.bytes);
}

// What the broker would receive: the properties encoded as rabbitmq-c sends
// them in a frame of `frame_max`, then decoded again.
struct Wire {
  amqp_pool_t pool;
  amqp_basic_properties_t* props = nullptr;
  std::vector<char> buf;
  Wire(const amqp_basic_properties_t& p, size_t frame_max) : buf(frame_max - kHeaderFrameOverhead) {
    init_amqp_pool(&pool, 4096);
    amqp_basic_properties_t copy = p;
    int n = amqp_encode_properties(AMQP_BASIC_CLASS, &copy, amqp_bytes_t{buf.size(), buf.data()});
    REQUIRE(n >= 0);
    void* out = nullptr;
    REQUIRE(amqp_decode_properties(AMQP_BASIC_CLASS, &pool, amqp_bytes_t{static_cast<size_t>(n), buf.data()}, &out) ==
            0);
    props = static_cast<amqp_basic_properties_t*>(out);
  }
  ~Wire() { empty_amqp_pool(&pool); }
};

// reason, detail, handler, queue, exchange, routing key, attempts
DeadLetterInfo info_of() { return {"handler_failed", "exit code 3", "h", "work", "events", "order.placed", 3}; }

}  // namespace

TEST_CASE("copy: only the listed content properties are carried", "[settle][copy]") {
  amqp_basic_properties_t o{};
  o._flags = 0xfffc;  // every property flag
  o.content_type = amqp_cstring_bytes("application/json");
  o.content_encoding = amqp_cstring_bytes("gzip");
  o.headers = amqp_table_t{0, nullptr};
  o.delivery_mode = 1;
  o.priority = 7;
  o.correlation_id = amqp_cstring_bytes("c-1");
  o.reply_to = amqp_cstring_bytes("replies");
  o.expiration = amqp_cstring_bytes("60000");
  o.message_id = amqp_cstring_bytes("m-1");
  o.timestamp = 1700000000;
  o.type = amqp_cstring_bytes("order.placed");
  o.user_id = amqp_cstring_bytes("someone-else");
  o.app_id = amqp_cstring_bytes("shop");
  o.cluster_id = amqp_cstring_bytes("c");
  CopySigner signer(kKey);

  CopyProperties dl(o, "{}", info_of(), signer, 131072);
  const amqp_basic_properties_t& p = *dl.get();
  CHECK(dl.fitted());
  CHECK((p._flags & AMQP_BASIC_USER_ID_FLAG) == 0);  // the broker refuses another user's user_id (406)
  CHECK((p._flags & AMQP_BASIC_EXPIRATION_FLAG) == 0);
  CHECK((p._flags & AMQP_BASIC_CLUSTER_ID_FLAG) == 0);
  CHECK(p.delivery_mode == AMQP_DELIVERY_PERSISTENT);
  CHECK(S(p.content_type) == "application/json");
  CHECK(S(p.content_encoding) == "gzip");
  CHECK(p.priority == 7);
  CHECK(S(p.correlation_id) == "c-1");
  CHECK(S(p.reply_to) == "replies");
  CHECK(S(p.message_id) == "m-1");
  CHECK(p.timestamp == 1700000000);
  CHECK(S(p.type) == "order.placed");
  CHECK(S(p.app_id) == "shop");

  // The retry copy's expiration is its own delay, never the original's.
  CopyProperties retry(o, "{}", info_of(), 2, 1500, signer, 131072);
  CHECK((retry.get()->_flags & AMQP_BASIC_USER_ID_FLAG) == 0);
  CHECK(S(retry.get()->expiration) == "1500");

  // reply_to: the exact direct reply-to name makes the broker close our channel.
  o.reply_to = amqp_cstring_bytes("amq.rabbitmq.reply-to");
  CopyProperties direct(o, "{}", info_of(), signer, 131072);
  CHECK((direct.get()->_flags & AMQP_BASIC_REPLY_TO_FLAG) == 0);
  o.reply_to = amqp_cstring_bytes("amq.rabbitmq.reply-to.g1h2AA==.xyz");  // the broker's rewritten form: an address
  CopyProperties rewritten(o, "{}", info_of(), signer, 131072);
  CHECK(S(rewritten.get()->reply_to) == "amq.rabbitmq.reply-to.g1h2AA==.xyz");

  // A property that is no shortstr (cannot come from a broker) is left out, not truncated on the wire.
  std::string long_type(256, 't');
  o.type = amqp_bytes_t{long_type.size(), long_type.data()};
  CopyProperties bad(o, "{}", info_of(), signer, 131072);
  CHECK((bad.get()->_flags & AMQP_BASIC_TYPE_FLAG) == 0);
  CHECK(bad.fitted());
}

TEST_CASE("copy: CC, BCC and every x- header of the original are dropped, the others kept", "[settle][copy]") {
  std::string v = "v";
  amqp_field_value_t cc_list{};
  cc_list.kind = AMQP_FIELD_KIND_ARRAY;
  amqp_field_value_t rk{};
  rk.kind = AMQP_FIELD_KIND_UTF8;
  rk.value.bytes = amqp_cstring_bytes("other.queue");
  cc_list.value.array = amqp_array_t{1, &rk};
  amqp_table_entry_t cc{};
  cc.key = amqp_cstring_bytes("CC");
  cc.value = cc_list;
  amqp_table_entry_t bcc = cc;
  bcc.key = amqp_cstring_bytes("BCC");
  amqp_table_entry_t lower_cc = cc;
  lower_cc.key = amqp_cstring_bytes("cc");
  amqp_table_entry_t in[] = {cc, bcc, lower_cc, text("traceparent", "00-abc"), text("x-delay", "5000"),
                             text("X-Death", "forged"), text("x-match", "all"), text("x-dead-letter-exchange", "e"),
                             integer("x-attempt", 9), text("x-original-routing-key", "admin.delete"),
                             text("x-er-sig", "v1.00"), text("tenant", "t-1"), text("x", "short key"),
                             text("", "empty key")};
  amqp_basic_properties_t o{};
  o._flags = AMQP_BASIC_HEADERS_FLAG;
  o.headers = amqp_table_t{static_cast<int>(sizeof in / sizeof in[0]), in};
  CopySigner signer(kKey);

  for (bool retry : {false, true}) {
    CopyProperties c = retry ? CopyProperties(o, "b", info_of(), 2, 100, signer, 131072)
                             : CopyProperties(o, "b", info_of(), signer, 131072);
    // What the broker receives.
    Wire w(*c.get(), 131072);
    auto h = headers_of(*w.props);
    for (const char* refused : {"CC", "BCC", "cc", "x-delay", "X-Death", "x-match", "x-dead-letter-exchange"})
      CHECK(h.count(refused) == 0);
    CHECK(str(h.at("traceparent")) == "00-abc");
    CHECK(str(h.at("tenant")) == "t-1");
    CHECK(str(h.at("x")) == "short key");
    CHECK(str(h.at("")) == "empty key");
    // Ours replace the forged ones.
    CHECK(str(h.at(kOriginalRoutingKey)) == "order.placed");
    CHECK(str(h.at(kSignature)) != "v1.00");
    if (retry) CHECK(h.at(kAttempt).value.i64 == 2);
    else CHECK(h.count(kAttempt) == 0);
    CHECK(h.count(kHeadersDropped) == 0);
  }
}

TEST_CASE("copy: headers rabbitmq-c would not encode faithfully are dropped", "[settle][copy]") {
  std::string long_key(256, 'k');
  amqp_table_entry_t long_top = text("placeholder", "v");
  long_top.key = amqp_bytes_t{long_key.size(), long_key.data()};

  // A 256-byte key inside a nested table: its length would be written as one byte.
  amqp_table_entry_t inner_long = long_top;
  amqp_table_entry_t nested_bad{};
  nested_bad.key = amqp_cstring_bytes("nested-bad");
  nested_bad.value.kind = AMQP_FIELD_KIND_TABLE;
  nested_bad.value.value.table = amqp_table_t{1, &inner_long};

  amqp_table_entry_t inner_ok = text("x-inner", "kept: the broker reads only top-level headers");
  amqp_table_entry_t nested_ok{};
  nested_ok.key = amqp_cstring_bytes("nested-ok");
  nested_ok.value.kind = AMQP_FIELD_KIND_TABLE;
  nested_ok.value.value.table = amqp_table_t{1, &inner_ok};

  amqp_table_entry_t u64{};
  u64.key = amqp_cstring_bytes("big");
  u64.value.kind = AMQP_FIELD_KIND_U64;  // not in RabbitMQ's field grammar
  u64.value.value.u64 = 1;

  amqp_table_entry_t bogus{};
  bogus.key = amqp_cstring_bytes("bogus-kind");
  bogus.value.kind = 'Z';

  // 65 nested arrays: deeper than the 64 we accept.
  std::vector<amqp_field_value_t> chain(66);
  chain[65].kind = AMQP_FIELD_KIND_I32;
  for (int i = 64; i >= 0; --i) {
    chain[i].kind = AMQP_FIELD_KIND_ARRAY;
    chain[i].value.array = amqp_array_t{1, &chain[i + 1]};
  }
  amqp_table_entry_t deep{};
  deep.key = amqp_cstring_bytes("deep");
  deep.value = chain[0];
  amqp_table_entry_t shallow{};  // 64 levels: kept
  shallow.key = amqp_cstring_bytes("shallow");
  shallow.value = chain[1];

  amqp_table_entry_t in[] = {long_top, nested_bad, nested_ok, u64, bogus, deep, shallow, text("ok", "1")};
  amqp_basic_properties_t o{};
  o._flags = AMQP_BASIC_HEADERS_FLAG;
  o.headers = amqp_table_t{static_cast<int>(sizeof in / sizeof in[0]), in};
  CopyProperties c(o, "b", info_of(), CopySigner(kKey), 131072);
  REQUIRE(c.fitted());
  auto h = headers_of(*c.get());
  CHECK(h.count(long_key) == 0);
  CHECK(h.count("nested-bad") == 0);
  CHECK(h.count("big") == 0);
  CHECK(h.count("bogus-kind") == 0);
  CHECK(h.count("deep") == 0);
  CHECK(h.count("shallow") == 1);
  CHECK(h.count("nested-ok") == 1);
  CHECK(str(h.at("ok")) == "1");
  Wire w(*c.get(), 131072);  // and what is left encodes and decodes
  CHECK(w.props->headers.num_entries == c.get()->headers.num_entries);
}

TEST_CASE("cap_text: at most max bytes, cut on a UTF-8 boundary, marked with an ellipsis", "[settle][copy]") {
  CHECK(cap_text("short", 10) == "short");
  CHECK(cap_text("exactly10!", 10) == "exactly10!");
  CHECK(cap_text("abcdefghijk", 10) == "abcdefg\xe2\x80\xa6");
  // "é" is 2 bytes: the cut never splits it.
  std::string s = "abcdef\xc3\xa9xyz";  // 11 bytes
  std::string cut = cap_text(s, 10);
  CHECK(cut == "abcdef\xe2\x80\xa6");
  CHECK(cut.size() <= 10);
  CHECK(cap_text("abcdefg\xc3\xa9xyz", 10) == "abcdefg\xe2\x80\xa6");
  CHECK(cap_text(std::string(5000, 'd'), kMaxDetailBytes).size() == kMaxDetailBytes);
}

TEST_CASE("copy: every text the daemon adds is capped", "[settle][copy]") {
  std::string huge(10000, 'z');
  DeadLetterInfo i{huge, huge, huge, huge, huge, huge};
  amqp_basic_properties_t o{};
  CopySigner signer(kKey);
  CopyProperties dl(o, "b", i, signer, 131072);
  REQUIRE(dl.fitted());
  CHECK_FALSE(dl.headers_dropped());
  auto h = headers_of(*dl.get());
  for (const char* k : {kReason, kHandler, kOriginalQueue, kOriginalExchange, kOriginalRoutingKey}) {
    INFO(k);
    CHECK(str(h.at(k)).size() == kMaxNameBytes);
    CHECK(str(h.at(k)).substr(kMaxNameBytes - 3) == "\xe2\x80\xa6");
  }
  CHECK(str(h.at(kDetail)).size() == kMaxDetailBytes);

  CopyProperties retry(o, "b", i, 2, 100, signer, 131072);
  auto r = headers_of(*retry.get());
  CHECK(str(r.at(kLastError)).size() == kMaxNameBytes + 2 + kMaxDetailBytes);  // "reason: detail"
  // The capped names are what is signed and read back.
  DeliveryHistory hist = read_history(*retry.get(), "b", signer);
  CHECK(hist.attempt == 2);
  CHECK(hist.original_routing_key == cap_text(huge, kMaxNameBytes));
}

TEST_CASE("signed retry copy: read back with the key, refused otherwise", "[settle][signer]") {
  amqp_basic_properties_t o{};
  CopySigner signer(kKey);
  DeadLetterInfo i = info_of();
  CopyProperties c(o, "{\"a\":1}", i, 4, 100, signer, 131072);
  const amqp_basic_properties_t& p = *c.get();

  DeliveryHistory h = read_history(p, "{\"a\":1}", signer);
  CHECK(h.attempt == 4);
  CHECK(h.has_original);
  CHECK(h.original_exchange == "events");
  CHECK(h.original_routing_key == "order.placed");
  CHECK(h.original_queue == "work");
  CHECK(h.first_failed_at.size() == 24);

  auto fresh = [](const DeliveryHistory& d) { return d.attempt == 1 && !d.has_original && d.original_routing_key.empty(); };
  CHECK(fresh(read_history(p, "{\"a\":1}", CopySigner(kOtherKey))));
  CHECK(fresh(read_history(p, "{\"a\":2}", signer)));  // the signature does not move to another body

  // Edit one signed header at a time.
  std::vector<amqp_table_entry_t> edited(p.headers.entries, p.headers.entries + p.headers.num_entries);
  amqp_basic_properties_t e = p;
  e.headers = amqp_table_t{static_cast<int>(edited.size()), edited.data()};
  for (size_t k = 0; k < edited.size(); ++k) {
    std::string key = S(edited[k].key);
    if (key != kAttempt && key != kOriginalExchange && key != kOriginalRoutingKey && key != kOriginalQueue &&
        key != kFirstFailedAt && key != kSignature)
      continue;
    INFO(key);
    amqp_table_entry_t saved = edited[k];
    if (key == kAttempt) {
      edited[k].value.value.i64 = 1;
    } else {
      edited[k].value.value.bytes = amqp_cstring_bytes("admin.delete");
    }
    CHECK(fresh(read_history(e, "{\"a\":1}", signer)));
    edited[k] = saved;
  }
  CHECK(read_history(e, "{\"a\":1}", signer).attempt == 4);  // restored
  // The same bytes as a byte array ('x') instead of a longstr still verify.
  for (auto& en : edited)
    if (S(en.key) == kOriginalRoutingKey) en.value.kind = AMQP_FIELD_KIND_BYTES;
  CHECK(read_history(e, "{\"a\":1}", signer).original_routing_key == "order.placed");

  // A second x-original-routing-key, or an x-attempts next to x-attempt: not ours.
  edited.push_back(text(kOriginalRoutingKey, "admin.delete"));
  e.headers = amqp_table_t{static_cast<int>(edited.size()), edited.data()};
  CHECK(fresh(read_history(e, "{\"a\":1}", signer)));
  edited.back() = integer(kAttempts, 4);
  CHECK(fresh(read_history(e, "{\"a\":1}", signer)));
}

TEST_CASE("signed dead-letter copy: read back as attempt 1, cannot pose as a retry copy", "[settle][signer]") {
  amqp_basic_properties_t o{};
  CopySigner signer(kKey);
  CopyProperties c(o, "b", info_of(), signer, 131072);
  DeliveryHistory h = read_history(*c.get(), "b", signer);
  CHECK(h.has_original);
  CHECK(h.attempt == 1);  // consumed again (e.g. replayed), it starts over
  CHECK(h.attempts_made == 3);
  CHECK(h.original_routing_key == "order.placed");

  // Rename x-attempts to x-attempt: the kind is signed.
  std::vector<amqp_table_entry_t> entries(c.get()->headers.entries,
                                          c.get()->headers.entries + c.get()->headers.num_entries);
  bool renamed = false;
  for (auto& en : entries)
    if (S(en.key) == kAttempts) en.key = amqp_cstring_bytes(kAttempt), renamed = true;
  REQUIRE(renamed);
  amqp_basic_properties_t forged = *c.get();
  forged.headers = amqp_table_t{static_cast<int>(entries.size()), entries.data()};
  DeliveryHistory f = read_history(forged, "b", signer);
  CHECK(f.attempt == 1);
  CHECK_FALSE(f.has_original);
}

TEST_CASE("read_history: bookkeeping a publisher wrote is not believed", "[settle][signer]") {
  std::string forged_sig = "v1." + std::string(64, 'a');
  amqp_table_entry_t in[] = {integer(kAttempt, 5), text(kOriginalExchange, "admin"),
                             text(kOriginalRoutingKey, "admin.delete"), text(kOriginalQueue, "q"),
                             text(kFirstFailedAt, "2026-01-01T00:00:00.000Z"), text(kSignature, forged_sig)};
  amqp_basic_properties_t o{};
  o._flags = AMQP_BASIC_HEADERS_FLAG;
  o.headers = amqp_table_t{6, in};
  CopySigner signer(kKey);
  DeliveryHistory h = read_history(o, "b", signer);
  CHECK(h.attempt == 1);
  CHECK_FALSE(h.has_original);
  CHECK(h.original_routing_key.empty());
  amqp_basic_properties_t none{};
  CHECK(read_history(none, "b", signer).attempt == 1);

  // Its x-first-failed-at is not carried into our copy either.
  CopyProperties c(o, "b", info_of(), 2, 100, signer, 131072);
  CHECK(str(headers_of(*c.get()).at(kFirstFailedAt)) != "2026-01-01T00:00:00.000Z");
}

TEST_CASE("signed copies of a retried event carry the first failure time along", "[settle][signer]") {
  amqp_basic_properties_t o{};
  CopySigner signer(kKey);
  CopyProperties first(o, "b", info_of(), 2, 100, signer, 131072);
  std::string when = str(headers_of(*first.get()).at(kFirstFailedAt));
  CopyProperties second(*first.get(), "b", info_of(), 3, 100, signer, 131072);
  CHECK(str(headers_of(*second.get()).at(kFirstFailedAt)) == when);
  CHECK(read_history(*second.get(), "b", signer).attempt == 3);
  CopyProperties dl(*second.get(), "b", info_of(), signer, 131072);
  auto h = headers_of(*dl.get());
  CHECK(str(h.at(kFirstFailedAt)) == when);
  CHECK(h.count(kAttempt) == 0);
  CHECK(h.count(kLastError) == 0);
}

TEST_CASE("fits: original headers that do not fit are dropped, and the copy says so", "[settle][copy]") {
  std::string big(5000, 'h');
  amqp_table_entry_t in[] = {text("big", big), text("small", "s")};
  amqp_basic_properties_t o{};
  o._flags = AMQP_BASIC_HEADERS_FLAG;
  o.headers = amqp_table_t{2, in};
  CopySigner signer(kKey);

  CopyProperties roomy(o, "b", info_of(), signer, 131072);
  CHECK(roomy.fitted());
  CHECK_FALSE(roomy.headers_dropped());
  CHECK(str(headers_of(*roomy.get()).at("big")) == big);
  CHECK_FALSE(roomy.fits(4096));

  CopyProperties tight(o, "b", info_of(), signer, 4096);
  CHECK(tight.fitted());
  CHECK(tight.fits(4096));
  CHECK(tight.headers_dropped());
  auto h = headers_of(*tight.get());
  CHECK(h.count("big") == 0);
  CHECK(h.count("small") == 0);
  // 4 (table) + "big": 1+3 + 1+4+5000, "small": 1+5 + 1+4+1
  CHECK(str(h.at(kHeadersDropped)) == "original headers did not fit in a frame (5025 bytes)");
  CHECK(str(h.at(kDetail)) == "exit code 3");  // the detail was short enough to stay whole
  DeliveryHistory hist = read_history(*tight.get(), "b", signer);
  CHECK(hist.has_original);
  CHECK(hist.attempts_made == 3);
}

TEST_CASE("fits: with every input at its maximum, both copies fit the minimum frame_max", "[settle][copy]") {
  // Eight 255-byte shortstr properties, 100 kB of headers, 10 kB texts, the longest expiration.
  std::string s255(255, 'p');
  amqp_bytes_t b255{s255.size(), s255.data()};
  std::string huge(10000, '\xe2');  // not even valid UTF-8: the cut must still hold the size
  std::vector<std::string> values(50, std::string(2000, 'v'));
  std::vector<std::string> keys;
  for (int i = 0; i < 50; ++i) keys.push_back(std::string(200, 'a') + std::to_string(i));
  std::vector<amqp_table_entry_t> in;
  for (int i = 0; i < 50; ++i) {
    in.push_back(text("k", values[i]));
    in.back().key = amqp_bytes_t{keys[i].size(), keys[i].data()};
  }
  amqp_basic_properties_t o{};
  o._flags = 0xfffc;
  o.content_type = o.content_encoding = o.correlation_id = o.reply_to = o.expiration = o.message_id = o.type =
      o.user_id = o.app_id = o.cluster_id = b255;
  o.priority = 255;
  o.timestamp = UINT64_MAX;
  o.headers = amqp_table_t{static_cast<int>(in.size()), in.data()};
  DeadLetterInfo i;
  i.reason = i.detail = i.handler = i.queue = i.exchange = i.routing_key = huge;
  i.attempts = UINT32_MAX;
  CopySigner signer(kKey);
  std::string body(100000, 'b');

  CopyProperties dl(o, body, i, signer, kMinFrameMax);
  CopyProperties retry(o, body, i, 1000000, UINT64_MAX, signer, kMinFrameMax);
  for (CopyProperties* c : {&dl, &retry}) {
    REQUIRE(c->fitted());
    CHECK(c->fits(kMinFrameMax));
    CHECK(c->headers_dropped());
    Wire w(*c->get(), kMinFrameMax);  // encodes in a 4096-byte frame and decodes back
    auto h = headers_of(*w.props);
    CHECK(S(w.props->content_type) == s255);
    CHECK(S(w.props->correlation_id) == s255);
    CHECK(S(w.props->message_id) == s255);
    CHECK((w.props->_flags & AMQP_BASIC_USER_ID_FLAG) == 0);
    CHECK(h.count(kHeadersDropped) == 1);
  }
  auto h = headers_of(*dl.get());
  CHECK(str(h.at(kDetail)).size() <= kMaxFallbackDetailBytes);
  CHECK(str(h.at(kReason)).size() <= kMaxNameBytes);
  CHECK(read_history(*retry.get(), body, signer).attempt == 1000000);
  CHECK(S(retry.get()->expiration) == "18446744073709551615");

  // Below the AMQP minimum there is no promise: the copy says it does not fit.
  CopyProperties too_small(o, body, i, signer, 2048);
  CHECK_FALSE(too_small.fitted());
  CHECK_FALSE(too_small.fits(2048));
  CHECK_FALSE(too_small.fits(kHeaderFrameOverhead));
}
