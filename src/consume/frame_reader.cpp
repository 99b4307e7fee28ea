#include "consume/frame_reader.hpp"

#include <algorithm>
#include <cstring>

namespace er::consume {

namespace {
bool dup(amqp_bytes_t& b, amqp_pool_t* pool) {
  if (b.len == 0) {
    b = amqp_empty_bytes;
    return true;
  }
  amqp_bytes_t out;
  amqp_pool_alloc_bytes(pool, b.len, &out);
  if (!out.bytes) return false;
  std::memcpy(out.bytes, b.bytes, b.len);
  b = out;
  return true;
}
}  // namespace

bool clone_properties(const amqp_basic_properties_t& src, amqp_basic_properties_t& dst, amqp_pool_t* pool) {
  dst = src;
  const amqp_flags_t f = src._flags;
  struct Field {
    amqp_flags_t flag;
    amqp_bytes_t* b;
  } fields[] = {
      {AMQP_BASIC_CONTENT_TYPE_FLAG, &dst.content_type}, {AMQP_BASIC_CONTENT_ENCODING_FLAG, &dst.content_encoding},
      {AMQP_BASIC_CORRELATION_ID_FLAG, &dst.correlation_id}, {AMQP_BASIC_REPLY_TO_FLAG, &dst.reply_to},
      {AMQP_BASIC_EXPIRATION_FLAG, &dst.expiration}, {AMQP_BASIC_MESSAGE_ID_FLAG, &dst.message_id},
      {AMQP_BASIC_TYPE_FLAG, &dst.type}, {AMQP_BASIC_USER_ID_FLAG, &dst.user_id},
      {AMQP_BASIC_APP_ID_FLAG, &dst.app_id}, {AMQP_BASIC_CLUSTER_ID_FLAG, &dst.cluster_id},
  };
  for (auto& fl : fields)
    if ((f & fl.flag) && !dup(*fl.b, pool)) return false;
  if (f & AMQP_BASIC_HEADERS_FLAG) {
    if (amqp_table_clone(&src.headers, &dst.headers, pool) != AMQP_STATUS_OK) return false;
  }
  return true;
}

FrameReader& FrameReader::operator=(FrameReader&& o) noexcept {
  if (this != &o) {
    for (auto& kv : partial_) destroy(kv.second);
    partial_ = std::move(o.partial_);
    o.partial_.clear();
  }
  return *this;
}

FrameReader::~FrameReader() {
  for (auto& kv : partial_) destroy(kv.second);
}

void FrameReader::destroy(Partial& p) {
  if (p.kind == Kind::Delivery) amqp_destroy_envelope(&p.env);
  p.kind = Kind::None;
}

void FrameReader::forget(amqp_channel_t ch) {
  auto it = partial_.find(ch);
  if (it == partial_.end()) return;
  destroy(it->second);
  partial_.erase(it);
}

void FrameReader::start_delivery(amqp_channel_t ch, const amqp_basic_deliver_t& m, size_t keep) {
  forget(ch);  // a message cut short by a new one: the broker never does this
  Partial& p = partial_[ch];
  p.kind = Kind::Delivery;
  p.keep = keep;
  p.started = std::chrono::steady_clock::now();
  amqp_envelope_t& e = p.env;
  std::memset(&e, 0, sizeof e);
  e.channel = ch;
  e.delivery_tag = m.delivery_tag;
  e.redelivered = m.redelivered;
  e.consumer_tag = amqp_bytes_malloc_dup(m.consumer_tag);
  e.exchange = amqp_bytes_malloc_dup(m.exchange);
  e.routing_key = amqp_bytes_malloc_dup(m.routing_key);
  init_amqp_pool(&e.message.pool, 4096);
  e.message.body = amqp_empty_bytes;
}

void FrameReader::start_return(amqp_channel_t ch, const amqp_basic_return_t& m) {
  forget(ch);
  Partial& p = partial_[ch];
  p.kind = Kind::Return;
  p.started = std::chrono::steady_clock::now();
  p.exchange.assign(static_cast<const char*>(m.exchange.bytes), m.exchange.len);
  p.routing_key.assign(static_cast<const char*>(m.routing_key.bytes), m.routing_key.len);
}

bool FrameReader::content(const amqp_frame_t& frame, Done& done) {
  done.kind = Kind::None;
  auto it = partial_.find(frame.channel);
  if (frame.frame_type == AMQP_FRAME_HEARTBEAT) return true;
  if (it == partial_.end()) return false;
  Partial& p = it->second;
  p.started = std::chrono::steady_clock::now();  // progress: the stall clock starts again
  if (frame.frame_type == AMQP_FRAME_HEADER) {
    if (p.have_header) return false;
    p.have_header = true;
    p.body_size = frame.payload.properties.body_size;
    if (p.kind == Kind::Delivery) {
      auto* props = static_cast<amqp_basic_properties_t*>(frame.payload.properties.decoded);
      amqp_envelope_t& e = p.env;
      if (!clone_properties(*props, e.message.properties, &e.message.pool)) e.message.properties._flags = 0;
      p.keep = static_cast<size_t>(std::min<uint64_t>(p.keep, p.body_size));
      if (p.keep > 0) {
        e.message.body = amqp_bytes_malloc(p.keep);
        if (!e.message.body.bytes) p.keep = 0, e.message.body = amqp_empty_bytes;
      }
      e.message.body.len = 0;  // grows as body frames arrive
    }
  } else if (frame.frame_type == AMQP_FRAME_BODY) {
    if (!p.have_header) return false;
    const amqp_bytes_t& frag = frame.payload.body_fragment;
    if (p.kind == Kind::Delivery) {
      amqp_bytes_t& body = p.env.message.body;
      size_t room = p.keep - body.len;
      size_t n = std::min(room, frag.len);
      if (n > 0) std::memcpy(static_cast<char*>(body.bytes) + body.len, frag.bytes, n);
      body.len += n;
    }
    p.received += frag.len;
    if (p.received > p.body_size) return false;
  } else {
    return false;
  }
  if (!p.have_header || p.received < p.body_size) return true;
  done.kind = p.kind;
  done.body_size = p.body_size;
  if (p.kind == Kind::Delivery) {
    done.env = p.env;
    if (done.env.message.body.len == 0 && done.env.message.body.bytes) {
      amqp_bytes_free(done.env.message.body);
      done.env.message.body = amqp_empty_bytes;
    }
  }
  done.exchange = std::move(p.exchange);
  done.routing_key = std::move(p.routing_key);
  partial_.erase(it);  // the envelope now belongs to `done`
  return true;
}

bool FrameReader::stalled(std::chrono::milliseconds limit) const {
  const auto now = std::chrono::steady_clock::now();
  for (const auto& kv : partial_)
    if (now - kv.second.started > limit) return true;
  return false;
}

}  // namespace er::consume
