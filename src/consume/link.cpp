#include "consume/link.hpp"

#include <boost/asio/post.hpp>

#include <algorithm>
#include <cstring>

#include "amqp/topology.hpp"
#include "consume/frame_reader.hpp"
#include "util/log.hpp"

namespace er::consume {

namespace asio = boost::asio;
using std::chrono::milliseconds;

namespace {
// Frames handled per turn of the loop before other handlers (timers,
// /healthz, handler I/O) get theirs.
constexpr int kFramesPerTurn = 256;

milliseconds next_backoff(milliseconds current, milliseconds initial, milliseconds max) {
  return current.count() == 0 ? initial : std::min(current * 2, max);
}
}  // namespace

BrokerLink::BrokerLink(asio::io_context& io, LinkEvents& events)
    : io_(io), events_(events), heartbeat_timer_(io), reconnect_timer_(io), ack_timer_(io) {}

BrokerLink::~BrokerLink() {
  *alive_ = false;
  if (connector_.joinable()) connector_.join();
  if (socket_) socket_->release();  // the fd belongs to rabbitmq-c
}

void BrokerLink::start() { connect(); }

amqp_channel_t BrokerLink::next_channel() {
  // Numbers are never reused within a connection, so a late frame of a
  // closed channel cannot be taken for one of its successor.
  if (next_channel_ > conn_->channel_max()) return 0;
  return next_channel_++;
}

// What the connector thread does and hands back. It touches nothing of the
// link: the connection is the loop's only once it is handed over.
struct BrokerLink::Opening {
  std::shared_ptr<const config::Config> cfg;
  size_t url_index = 0;
  struct Wanted {
    std::string name;
    uint16_t prefetch;
    bool channel_wide;
  };
  std::vector<Wanted> queues;
  std::optional<amqp::Connection> conn;
  std::string error;
  bool permanent = false;
  amqp_channel_t publish_channel = 0;
  amqp_channel_t next_channel = 1;
  struct Started {
    amqp_channel_t channel = 0;  // 0: not started (see error)
    std::string tag;
    std::string error;
  };
  std::vector<Started> started;
};

namespace {
// Both used by the connector thread and by the loop. Throw amqp::AmqpError.
void open_confirm_channel(amqp::Connection& conn, amqp_channel_t ch) {
  conn.open_channel(ch);
  amqp_confirm_select(conn.get(), ch);
  amqp::check_reply(amqp_get_rpc_reply(conn.get()), "enabling publisher confirms");
}

// Opens `ch`, sets its prefetch (a per-consumer basic.qos applies only to
// consumers started after it) and consumes `queue`. Returns the consumer tag.
std::string start_consumer(amqp::Connection& conn, amqp_channel_t ch, const std::string& queue, uint16_t prefetch,
                           bool channel_wide) {
  amqp_connection_state_t c = conn.get();
  conn.open_channel(ch);
  amqp_basic_qos(c, ch, 0, prefetch, channel_wide ? 1 : 0);
  amqp::check_reply(amqp_get_rpc_reply(c), "setting prefetch on queue '" + queue + "'");
  auto* ok = amqp_basic_consume(c, ch, amqp::bytes(queue), amqp_empty_bytes, 0, /*no_ack*/ 0, 0, amqp_empty_table);
  amqp::check_reply(amqp_get_rpc_reply(c), "consuming queue '" + queue + "'");
  return std::string(amqp::view(ok->consumer_tag));
}

// Connects, declares the exchange and every queue, and starts the wanted
// consumers. A queue the broker cannot declare now (NOT_FOUND: its home node
// is down) is left to its consumer's recovery; only refusals a retry cannot
// fix are permanent. Runs on the connector thread; every wait is bounded by
// the connect and rpc timeouts.
template <class O>
void open_connection(O& o) {
  const config::Config& cfg = *o.cfg;
  try {
    o.conn.emplace(amqp::Connection::open(amqp::connect_options(cfg.broker, o.url_index)));
  } catch (const amqp::AmqpError& e) {
    o.error = e.what();
    return;
  }
  amqp::Connection& conn = *o.conn;
  amqp_connection_state_t c = conn.get();
  auto next = [&]() -> amqp_channel_t {
    if (o.next_channel > conn.channel_max()) throw amqp::AmqpError("out of channel numbers; reconnecting");
    return o.next_channel++;
  };
  auto open_publish = [&] {
    amqp_channel_t ch = next();
    open_confirm_channel(conn, ch);
    o.publish_channel = ch;
  };
  try {
    open_publish();
    amqp::declare_exchange(conn, o.publish_channel, cfg);
    for (const auto& q : cfg.queues) {
      try {
        amqp::declare_queue(conn, o.publish_channel, cfg, q);
      } catch (const amqp::AmqpError& e) {
        if (e.permanent() || !e.channel_closed()) throw;
        log::error("cannot declare a queue now; its consumer retries", {{"queue", q.name}, {"reason", e.what()}});
        amqp::reply_channel_close_ok(c, o.publish_channel);
        open_publish();
      }
    }
    for (const auto& w : o.queues) {
      typename O::Started s;
      amqp_channel_t ch = next();
      try {
        s.tag = start_consumer(conn, ch, w.name, w.prefetch, w.channel_wide);
        s.channel = ch;
      } catch (const amqp::AmqpError& e) {
        if (e.permanent() || !e.channel_closed()) throw;
        amqp::reply_channel_close_ok(c, ch);
        s.error = e.what();
      }
      o.started.push_back(std::move(s));
    }
  } catch (const amqp::AmqpError& e) {
    o.error = e.what();
    o.permanent = e.permanent();
    o.conn->close();  // bounded by rpc_timeout, on this thread
    o.conn.reset();
  }
}
}  // namespace

void BrokerLink::connect() {
  if (closing_ || connecting_ || conn_) return;
  if (connector_.joinable()) connector_.join();  // it has handed over already
  connecting_ = true;
  auto o = std::make_shared<Opening>();
  o->cfg = cfg_;
  o->url_index = url_index_;
  opening_ = events_.wanted_queues();
  for (const auto& qc : opening_) o->queues.push_back({qc->name, qc->prefetch, qc->channel_wide});
  std::weak_ptr<bool> alive = alive_;
  connector_ = std::thread([this, o, alive] {
    open_connection(*o);
    asio::post(io_, [this, o, alive] {
      if (!alive.expired()) connected(o);
    });
  });
}

void BrokerLink::connected(std::shared_ptr<Opening> o) {
  connecting_ = false;
  auto wanted = std::move(opening_);
  opening_.clear();
  if (closing_) {
    if (o->conn) o->conn->abandon();
    return;
  }
  if (!o->conn) {
    if (o->permanent) {
      closing_ = true;
      events_.link_failed(o->error);
    } else {
      schedule_reconnect(o->error);
    }
    return;
  }
  conn_ = std::move(o->conn);
  ++connection_id_;
  node_ = log::mask_url(cfg_->broker.urls[url_index_ % cfg_->broker.urls.size()]);
  log::info("connected", {{"broker", node_}, {"server_version", conn_->server_version()}});
  by_channel_.assign(static_cast<size_t>(conn_->channel_max()) + 1, nullptr);
  next_channel_ = o->next_channel;
  publish_channel_ = o->publish_channel;
  next_seq_ = 1;
  pending_.clear();
  blocked_ = false;
  reader_ = FrameReader{};
  if (connected_once_) ++reconnects_;
  connected_once_ = true;
  backoff_ = milliseconds(0);
  socket_.emplace(io_, conn_->fd());
  socket_armed_ = false;
  const uint64_t id = connection_id_;
  for (size_t i = 0; i < wanted.size() && i < o->started.size(); ++i) {
    const auto& qc = wanted[i];
    const auto& s = o->started[i];
    if (s.channel == 0) {
      recover_later(qc, s.error);
      continue;
    }
    qc->channel = s.channel;
    qc->acks.clear();
    qc->consuming = true;
    qc->consumer_tag = s.tag;
    qc->backoff = milliseconds(0);
    qc->unavailable.clear();
    by_channel_[s.channel] = qc;
    log::info("consuming", {{"queue", qc->name}, {"prefetch", std::to_string(qc->prefetch)},
                            {"channel", std::to_string(s.channel)}});
    if (qc->retired) close_queue(*qc);  // a reload retired it meanwhile
    if (id != connection_id_) return;
  }
  events_.link_up();
  if (id != connection_id_ || !conn_) return;
  arm_heartbeat();
  pump();  // frames that arrived during the handshake are buffered
}

// A fresh confirm channel. Copies pending on the old one are never confirmed.
void BrokerLink::open_publish_channel() {
  amqp_channel_t ch = next_channel();
  if (ch == 0) throw amqp::AmqpError("out of channel numbers; reconnecting");
  open_confirm_channel(*conn_, ch);
  publish_channel_ = ch;
  next_seq_ = 1;
}

void BrokerLink::schedule_reconnect(const std::string& why) {
  if (closing_) return;
  // Try each URL in turn; back off only after a whole round failed, so one
  // dead node of a cluster costs no waiting.
  const config::Config& cfg = *cfg_;
  milliseconds wait{100};
  ++url_index_;
  if (url_index_ % cfg.broker.urls.size() == 0) {
    backoff_ = next_backoff(backoff_, cfg.broker.reconnect_initial, cfg.broker.reconnect_max);
    // Jitter spreads the reconnects of many daemons after a broker restart.
    std::uniform_int_distribution<long> jitter(0, backoff_.count() / 4);
    wait = std::min(backoff_ + milliseconds(jitter(rng_)), cfg.broker.reconnect_max);
  }
  const std::string& next = cfg.broker.urls[url_index_ % cfg.broker.urls.size()];
  log::error("broker unavailable, retrying",
             {{"reason", why}, {"next_broker", log::mask_url(next)}, {"retry_in_ms", std::to_string(wait.count())}});
  reconnect_timer_.expires_after(wait);
  reconnect_timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) connect();
  });
}

void BrokerLink::open_queue(const std::shared_ptr<QueueChannel>& qc) {
  if (!conn_ || qc->retired || draining_) return;
  const uint64_t id = connection_id_;
  amqp_connection_state_t c = conn_->get();
  amqp_channel_t ch = next_channel();
  if (ch == 0) {
    lost("out of channel numbers; reconnecting");
    return;
  }
  try {
    qc->consumer_tag = start_consumer(*conn_, ch, qc->name, qc->prefetch, qc->channel_wide);
  } catch (const amqp::AmqpError& e) {
    if (id != connection_id_ || !conn_) return;
    if (!e.channel_closed()) {
      lost(e.what());
      return;
    }
    amqp::reply_channel_close_ok(c, ch);
    recover_later(qc, e.what());
    return;
  }
  qc->channel = ch;
  qc->acks.clear();
  qc->consuming = true;
  qc->unavailable.clear();
  by_channel_[ch] = qc;
  log::info("consuming", {{"queue", qc->name}, {"prefetch", std::to_string(qc->prefetch)},
                          {"channel", std::to_string(ch)}});
  kick();
}

void BrokerLink::cancel_consumer(QueueChannel& qc) {
  if (!conn_ || qc.channel == 0 || !qc.consuming) return;
  qc.consuming = false;
  amqp_basic_cancel_t req{};
  req.consumer_tag = amqp::bytes(qc.consumer_tag);
  // Asynchronous: the cancel-ok arrives with the frames; deliveries already
  // on the wire still come and are handed back by the caller.
  int rc = amqp_send_method(conn_->get(), qc.channel, AMQP_BASIC_CANCEL_METHOD, &req);
  if (rc != AMQP_STATUS_OK) lost(std::string("cancelling a consumer: ") + amqp_error_string2(rc));
}

void BrokerLink::set_prefetch(QueueChannel& qc, uint16_t prefetch) {
  qc.prefetch = prefetch;
  if (!conn_ || qc.channel == 0 || !qc.channel_wide) return;
  amqp_basic_qos(conn_->get(), qc.channel, 0, prefetch, /*global*/ 1);
  amqp_rpc_reply_t r = amqp_get_rpc_reply(conn_->get());
  if (r.reply_type != AMQP_RESPONSE_NORMAL) {
    lost(amqp::describe_reply(r, "setting prefetch on queue '" + qc.name + "'"));
    return;
  }
  log::info("prefetch changed in place", {{"queue", qc.name}, {"prefetch", std::to_string(prefetch)}});
  kick();
}

void BrokerLink::close_queue(QueueChannel& qc) {
  if (qc.channel == 0) return;
  amqp_channel_t ch = qc.channel;
  // Settled events are acked before the close would hand them back.
  if (conn_ && !flush_acks(qc, true)) {
    lost("acknowledging before closing a channel");
    return;
  }
  drop_channel(qc);
  if (!conn_) return;
  amqp_rpc_reply_t r = amqp_channel_close(conn_->get(), ch, AMQP_REPLY_SUCCESS);
  if (r.reply_type != AMQP_RESPONSE_NORMAL) {
    lost(amqp::describe_reply(r, "closing channel " + std::to_string(ch)));
    return;
  }
  kick();
}

// Forget the channel: results of its deliveries are stale from now on.
void BrokerLink::drop_channel(QueueChannel& qc) {
  if (qc.channel != 0 && qc.channel < by_channel_.size()) {
    by_channel_[qc.channel] = nullptr;
    reader_.forget(qc.channel);
  }
  qc.channel = 0;
  qc.consuming = false;
  qc.acks.clear();
  ++qc.incarnation;
}

// The broker closed one queue's channel or cancelled its consumer: the other
// queues keep flowing while this one is declared again and re-consumed, with backoff.
void BrokerLink::recover_later(const std::shared_ptr<QueueChannel>& qc, const std::string& why) {
  if (qc->retired || closing_ || draining_) return;
  const auto& b = cfg_->broker;
  qc->backoff = next_backoff(qc->backoff, b.reconnect_initial, b.reconnect_max);
  qc->unavailable = why;  // for /readyz; the other queues go on
  log::error("queue channel lost, recovering",
             {{"queue", qc->name}, {"reason", why}, {"retry_in_ms", std::to_string(qc->backoff.count())}});
  const uint64_t id = connection_id_;
  std::weak_ptr<QueueChannel> weak = qc;
  qc->recovering = true;
  qc->recover_timer.expires_after(qc->backoff);
  qc->recover_timer.async_wait([this, weak, id](boost::system::error_code ec) {
    auto q = weak.lock();
    if (q) q->recovering = false;
    if (ec || !q || id != connection_id_ || !conn_ || q->retired || q->channel != 0) return;
    const config::QueueConfig* qcfg = nullptr;
    for (const auto& c : cfg_->queues)
      if (c.name == q->name) qcfg = &c;
    if (!qcfg) return;
    try {
      declare_queue(*qcfg);
    } catch (const amqp::AmqpError& e) {
      if (id != connection_id_ || !conn_) return;
      if (e.permanent()) {
        close();
        events_.link_failed(e.what());
        return;
      }
      if (!e.channel_closed()) {
        lost(e.what());
        return;
      }
      recover_later(q, e.what());
      return;
    }
    open_queue(q);
    if (q->channel != 0) {
      q->backoff = milliseconds(0);
      pump();
    }
  });
}

// On a channel of its own: a refusal (NOT_FOUND for a queue whose node is
// down) closes that channel only, never the confirm channel and its copies.
void BrokerLink::declare_queue(const config::QueueConfig& q) {
  amqp_channel_t ch = next_channel();
  if (ch == 0) throw amqp::AmqpError("out of channel numbers; reconnecting");
  conn_->open_channel(ch);
  try {
    amqp::declare_queue(*conn_, ch, *cfg_, q);
  } catch (const amqp::AmqpError& e) {
    if (e.channel_closed() && conn_) {
      amqp::reply_channel_close_ok(conn_->get(), ch);
    }
    kick();
    throw;
  }
  amqp::check_reply(amqp_channel_close(conn_->get(), ch, AMQP_REPLY_SUCCESS), "closing a declare channel");
  kick();
}

// RPCs outside pump() may have queued frames inside rabbitmq-c, which do not
// make the socket readable again: read them on the next turn.
void BrokerLink::kick() {
  if (kicked_ || !conn_) return;
  kicked_ = true;
  later([this](bool same_connection) {
    kicked_ = false;
    if (same_connection) pump();
  });
}

// Runs `f` on a later turn of the loop unless the link is gone; it is told
// whether the connection is still the one of now.
template <class F>
void BrokerLink::later(F f) {
  std::weak_ptr<bool> alive = alive_;
  const uint64_t id = connection_id_;
  asio::post(io_, [this, alive, id, f = std::move(f)]() mutable {
    if (!alive.expired()) f(id == connection_id_);
  });
}

bool BrokerLink::ack(amqp_channel_t ch, uint64_t tag) {
  if (!conn_) return false;
  QueueChannel* qc = ch < by_channel_.size() ? by_channel_[ch].get() : nullptr;
  if (qc && cfg_->broker.ack_window.count() > 0 && qc->acks.settled(tag)) {
    // Half the prefetch ready: send now, so the broker can refill the
    // window while the rest of this turn runs.
    if (qc->acks.ready() >= std::max<size_t>(1, qc->prefetch / 2)) {
      if (!flush_acks(*qc, false)) {
        lost("acknowledging");
        return false;
      }
    }
    if (qc->acks.pending() > 0) flush_acks_later(*qc);
    return true;
  }
  if (qc) qc->acks.forget(tag);  // acked alone: a later multiple ack may pass over it
  int rc = amqp_basic_ack(conn_->get(), ch, tag, 0);
  if (rc == AMQP_STATUS_OK) {
    ++ack_frames_;
    return true;
  }
  lost(std::string("acknowledging: ") + amqp_error_string2(rc));
  return false;
}

// Sends what `qc`'s tracker lets go now; false if the socket failed (the
// caller drops the connection, outside the tracker).
bool BrokerLink::flush_acks(QueueChannel& qc, bool all) {
  if (!conn_ || qc.channel == 0) return true;
  amqp_connection_state_t c = conn_->get();
  int rc = AMQP_STATUS_OK;
  qc.acks.flush(all, [&](AckTracker::Ack a) {
    if (rc != AMQP_STATUS_OK) return;
    rc = amqp_basic_ack(c, qc.channel, a.tag, a.multiple ? 1 : 0);
    if (rc == AMQP_STATUS_OK) ++ack_frames_;
  });
  if (rc == AMQP_STATUS_OK) return true;
  log::error("acknowledging failed", {{"reason", amqp_error_string2(rc)}});
  return false;
}

// At the end of this turn of the loop: the acks the turn settled go out
// together, with no added wait when the daemon is idle.
void BrokerLink::flush_acks_later(QueueChannel& qc) {
  if (std::find(ack_dirty_.begin(), ack_dirty_.end(), qc.channel) == ack_dirty_.end())
    ack_dirty_.push_back(qc.channel);
  if (ack_flush_posted_) return;
  ack_flush_posted_ = true;
  later([this](bool same_connection) {
    ack_flush_posted_ = false;
    auto dirty = std::move(ack_dirty_);
    ack_dirty_.clear();
    if (!same_connection || !conn_) return;
    bool blocked = false;
    for (amqp_channel_t ch : dirty) {
      QueueChannel* qc = ch < by_channel_.size() ? by_channel_[ch].get() : nullptr;
      if (!qc) continue;
      if (!flush_acks(*qc, false)) {
        lost("acknowledging");
        return;
      }
      blocked = blocked || qc->acks.pending() > 0;
    }
    if (blocked) arm_ack_window();
  });
}

// Settled tags behind a running one wait at most broker.ack_window for it,
// then go out one by one: the broker counts them against the prefetch.
void BrokerLink::arm_ack_window() {
  if (ack_timer_armed_) return;
  ack_timer_armed_ = true;
  const uint64_t id = connection_id_;
  ack_timer_.expires_after(cfg_->broker.ack_window);
  ack_timer_.async_wait([this, id](boost::system::error_code ec) {
    if (ec) return;  // cancelled: whoever cancelled it cleared the flag
    ack_timer_armed_ = false;
    if (id != connection_id_ || !conn_) return;
    for (size_t ch = 0; ch < by_channel_.size(); ++ch) {
      QueueChannel* qc = by_channel_[ch].get();
      if (!qc || qc->acks.pending() == 0) continue;
      if (!flush_acks(*qc, true)) {
        lost("acknowledging");
        return;
      }
    }
  });
}

bool BrokerLink::nack(amqp_channel_t ch, uint64_t tag, bool requeue) {
  if (!conn_) return false;
  // Handed back, it blocks no coalescing: a multiple ack passes over it.
  // (A nack of one tag touches no other, so waiting acks need not go first.)
  QueueChannel* qc = ch < by_channel_.size() ? by_channel_[ch].get() : nullptr;
  if (qc) {
    qc->acks.forget(tag);
    if (qc->acks.pending() > 0) flush_acks_later(*qc);
  }
  int rc = amqp_basic_nack(conn_->get(), ch, tag, 0, requeue ? 1 : 0);
  if (rc == AMQP_STATUS_OK) return true;
  lost(std::string("handing back a delivery: ") + amqp_error_string2(rc));
  return false;
}

void BrokerLink::publish_to(std::string exchange, std::string routing_key, const amqp_basic_properties_t* props,
                            amqp_bytes_t body, CopyDone done) {
  if (!conn_) {
    done(CopyResult::Lost);
    return;
  }
  Held h{std::move(exchange), std::move(routing_key), props, body, std::move(done)};
  if (blocked_) {
    held_.push_back(std::move(h));
    return;
  }
  send_now(std::move(h));
}

void BrokerLink::send_now(Held h) {
  int rc = amqp_basic_publish(conn_->get(), publish_channel_, amqp::bytes(h.exchange), amqp::bytes(h.routing_key),
                              /*mandatory*/ 1, 0, h.props, h.body);
  if (rc != AMQP_STATUS_OK) {
    // The socket failed or a frame is half written: the connection is unusable.
    h.done(CopyResult::Lost);
    lost(std::string("publishing a copy: ") + amqp_error_string2(rc));
    return;
  }
  pending_.emplace(next_seq_++, Pending{std::move(h.exchange), std::move(h.routing_key), std::move(h.done), false});
}

void BrokerLink::on_confirm(uint64_t tag, bool multiple, bool acked) {
  std::vector<Pending> done;
  if (multiple) {
    auto end = pending_.upper_bound(tag);
    for (auto it = pending_.begin(); it != end; ++it) done.push_back(std::move(it->second));
    pending_.erase(pending_.begin(), end);
  } else if (auto it = pending_.find(tag); it != pending_.end()) {
    done.push_back(std::move(it->second));
    pending_.erase(it);
  }
  for (auto& p : done)
    p.done(!acked ? CopyResult::Refused : p.returned ? CopyResult::Returned : CopyResult::Confirmed);
}

void BrokerLink::fail_pending(CopyResult result) {
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& kv : pending) kv.second.done(result);
}

void BrokerLink::close() {
  closing_ = true;
  heartbeat_timer_.cancel();
  reconnect_timer_.cancel();
  ack_timer_.cancel();
  ack_timer_armed_ = false;
  // Settled events are acked before the connection goes (a failure here
  // only means the broker redelivers them).
  for (auto& qc : by_channel_)
    if (qc && conn_ && !flush_acks(*qc, true)) break;
  if (socket_) {
    socket_->release();
    socket_.reset();
  }
  if (conn_) {
    conn_->close();
    conn_.reset();
  }
  ++connection_id_;
  for (auto& qc : by_channel_)
    if (qc) {
      qc->channel = 0;
      qc->acks.clear();
      ++qc->incarnation;
    }
  by_channel_.clear();
}

void BrokerLink::lost(const std::string& why) {
  if (!conn_) return;
  log::error("connection lost", {{"reason", why}, {"broker", node_}});
  ++connection_id_;  // every result still out belongs to the dead connection now
  if (socket_) {
    socket_->release();
    socket_.reset();
  }
  socket_armed_ = false;
  heartbeat_timer_.cancel();
  ack_timer_.cancel();
  ack_timer_armed_ = false;
  conn_->abandon();  // it is dead or stalled: a close would wait for it
  conn_.reset();
  reader_ = FrameReader{};
  auto channels = std::move(by_channel_);
  by_channel_.clear();
  for (auto& qc : channels) {
    if (!qc) continue;
    qc->channel = 0;
    qc->consuming = false;
    qc->acks.clear();
    ++qc->incarnation;
    qc->recover_timer.cancel();
    qc->recovering = false;
  }
  fail_pending(CopyResult::Lost);
  auto held = std::move(held_);
  held_.clear();
  for (auto& h : held) h.done(CopyResult::Lost);
  blocked_ = false;
  events_.link_down();
  schedule_reconnect(why);
}

void BrokerLink::arm_socket() {
  if (!socket_ || socket_armed_) return;
  socket_armed_ = true;
  const uint64_t id = connection_id_;
  socket_->async_wait(asio::posix::stream_descriptor::wait_read, [this, id](boost::system::error_code ec) {
    if (id != connection_id_) return;
    socket_armed_ = false;
    if (ec) return;  // cancelled: the connection is being torn down
    pump();
  });
}

// rabbitmq-c sends heartbeats and notices a silent peer only inside its read
// calls, so turn the crank at least twice per interval when idle; the same
// tick bounds how long a delivery's frames may take to arrive.
void BrokerLink::arm_heartbeat() {
  const auto& b = cfg_->broker;
  auto period = b.rpc_timeout / 2;
  if (b.heartbeat.count() > 0) period = std::min(period, std::chrono::duration_cast<milliseconds>(b.heartbeat / 2));
  period = std::max(milliseconds(200), std::chrono::duration_cast<milliseconds>(period));
  const uint64_t id = connection_id_;
  heartbeat_timer_.expires_after(period);
  heartbeat_timer_.async_wait([this, id](boost::system::error_code ec) {
    if (ec || id != connection_id_ || !conn_) return;
    pump();  // what has arrived counts as progress
    if (id != connection_id_ || !conn_) return;
    if (reader_.stalled(cfg_->broker.rpc_timeout)) {
      lost("a message's frames stopped arriving for longer than rpc_timeout");
      return;
    }
    arm_heartbeat();
  });
}

void BrokerLink::pump() {
  if (!conn_) return;
  const uint64_t id = connection_id_;
  amqp_connection_state_t c = conn_->get();
  for (int n = 0; n < kFramesPerTurn; ++n) {
    amqp_maybe_release_buffers(c);
    timeval zero{0, 0};
    amqp_frame_t frame;
    int rc = amqp_simple_wait_frame_noblock(c, &frame, &zero);
    if (rc == AMQP_STATUS_TIMEOUT) {
      arm_socket();
      return;
    }
    if (rc != AMQP_STATUS_OK) {
      lost(std::string("reading from the broker: ") + amqp_error_string2(rc));
      return;
    }
    on_frame(frame);
    if (id != connection_id_ || !conn_) return;
  }
  // More is waiting: let the loop's other work run first.
  later([this](bool same_connection) {
    if (same_connection) pump();
  });
}

void BrokerLink::on_frame(const amqp_frame_t& frame) {
  if (frame.frame_type != AMQP_FRAME_METHOD) {
    // Content of a message being assembled (deliveries and returns).
    FrameReader::Done done;
    if (!reader_.content(frame, done)) {
      // The rest of a message on a channel we closed meanwhile: nothing to read.
      bool ours = frame.channel == publish_channel_ ||
                  (frame.channel < by_channel_.size() && by_channel_[frame.channel]);
      if (ours) lost("the broker sent content that does not follow a message");
      return;
    }
    if (done.kind == FrameReader::Kind::Delivery) {
      auto qc = frame.channel < by_channel_.size() ? by_channel_[frame.channel] : nullptr;
      if (qc) {
        qc->acks.delivered(done.env.delivery_tag);
        events_.delivery(*qc, done.env, done.body_size);
      } else {
        amqp_destroy_envelope(&done.env);
      }
    } else if (done.kind == FrameReader::Kind::Return) {
      on_return(done);
    }
    return;
  }
  amqp_connection_state_t c = conn_->get();
  const amqp_channel_t ch = frame.channel;
  std::shared_ptr<QueueChannel> qc = ch < by_channel_.size() ? by_channel_[ch] : nullptr;
  switch (frame.payload.method.id) {
    case AMQP_BASIC_DELIVER_METHOD: {
      auto* m = static_cast<amqp_basic_deliver_t*>(frame.payload.method.decoded);
      // Bodies are kept up to the queue's max_message_bytes; beyond that only
      // the size is counted, so a huge message costs a bounded amount of memory.
      size_t keep = 0;
      if (qc && !qc->retired && qc->index < cfg_->queues.size()) keep = cfg_->queues[qc->index].max_message_bytes;
      reader_.start_delivery(ch, *m, keep);
      break;
    }
    case AMQP_BASIC_RETURN_METHOD: {
      auto* m = static_cast<amqp_basic_return_t*>(frame.payload.method.decoded);
      reader_.start_return(ch, *m);
      break;
    }
    case AMQP_BASIC_ACK_METHOD: {
      auto* m = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
      if (ch == publish_channel_) on_confirm(m->delivery_tag, m->multiple, true);
      break;
    }
    case AMQP_BASIC_NACK_METHOD: {
      auto* m = static_cast<amqp_basic_nack_t*>(frame.payload.method.decoded);
      if (ch == publish_channel_) on_confirm(m->delivery_tag, m->multiple, false);
      break;
    }
    case AMQP_BASIC_CANCEL_OK_METHOD:
      break;
    case AMQP_BASIC_CANCEL_METHOD: {
      // The broker cancelled a consumer (its queue was deleted, or its node
      // went down). Close that channel and consume again on a fresh one.
      if (!qc) break;
      if (!flush_acks(*qc, true)) {  // what is settled is done: ack it first
        lost("acknowledging before closing a cancelled consumer's channel");
        return;
      }
      drop_channel(*qc);
      events_.queue_channel_lost(*qc);
      amqp_rpc_reply_t r = amqp_channel_close(c, ch, AMQP_REPLY_SUCCESS);  // other frames are queued meanwhile
      if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        lost(amqp::describe_reply(r, "closing a cancelled consumer's channel"));
        return;
      }
      recover_later(qc, "the broker cancelled the consumer (queue deleted?)");
      break;
    }
    case AMQP_CHANNEL_CLOSE_METHOD: {
      auto* m = static_cast<amqp_channel_close_t*>(frame.payload.method.decoded);
      std::string why = "the broker closed channel " + std::to_string(ch) + ": " + std::string(amqp::view(m->reply_text));
      amqp::reply_channel_close_ok(c, ch);
      reader_.forget(ch);
      if (qc) {
        drop_channel(*qc);
        events_.queue_channel_lost(*qc);
        recover_later(qc, why);
      } else if (ch == publish_channel_) {
        // A copy the broker refused (406 and such) closed the confirm
        // channel: every copy on it is refused; the link carries on.
        log::error("the broker closed the publish channel", {{"reason", why}});
        // A new confirm channel first: the refused copies' callbacks may
        // publish again (a plain copy) and must not use the closed one.
        auto refused = std::move(pending_);
        pending_.clear();
        try {
          open_publish_channel();
        } catch (const amqp::AmqpError& e) {
          for (auto& kv : refused) kv.second.done(CopyResult::Lost);
          lost(e.what());
          return;
        }
        const uint64_t id = connection_id_;
        for (auto& kv : refused) kv.second.done(id == connection_id_ ? CopyResult::Refused : CopyResult::Lost);
        kick();
      }
      break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      auto* m = static_cast<amqp_connection_close_t*>(frame.payload.method.decoded);
      std::string why = "the broker closed the connection: " + std::string(amqp::view(m->reply_text));
      amqp::reply_connection_close_ok(c);
      lost(why);
      break;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
      auto* m = static_cast<amqp_connection_blocked_t*>(frame.payload.method.decoded);
      blocked_ = true;
      log::warn("the broker blocked publishing (resource alarm); copies wait, consuming goes on",
                {{"reason", amqp::view(m->reason)}});
      break;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD: {
      blocked_ = false;
      log::info("the broker unblocked publishing", {{"waiting", std::to_string(held_.size())}});
      const uint64_t id = connection_id_;
      auto held = std::move(held_);
      held_.clear();
      for (auto& h : held) {
        if (id != connection_id_ || !conn_) {
          h.done(CopyResult::Lost);
          continue;
        }
        send_now(std::move(h));
      }
      break;
    }
    default:
      log::debug("ignored frame", {{"method", std::to_string(frame.payload.method.id)}});
  }
}

// A copy could not be routed (its queue was deleted). Copies are published
// mandatory, so the broker says so before it confirms them: every pending
// copy to that queue counts as returned (the original goes back to the
// broker: never lost, at worst copied twice), and the queues are declared again.
void BrokerLink::on_return(const FrameReader::Done& done) {
  const std::string& target = done.routing_key;
  for (auto& kv : pending_)
    if (kv.second.routing_key == target && kv.second.exchange == done.exchange) kv.second.returned = true;
  if (!done.exchange.empty()) {
    // An emitted event no binding takes: the settler dead-letters its trigger.
    log::error("the broker could not route an emitted event", {{"exchange", done.exchange}, {"routing_key", target}});
    return;
  }
  // The queue that owns the target (its DLQ or a delay queue) is declared
  // again once, after this turn, not once per returned copy.
  std::string owner;
  for (const auto& q : cfg_->queues) {
    if (q.dead_letter_queue == target || target.rfind(q.name + ".retry.", 0) == 0) owner = q.name;
  }
  log::error("the broker could not route a copy; declaring its queue again", {{"target", target}, {"queue", owner}});
  if (owner.empty() || !redeclare_.insert(owner).second) return;
  std::weak_ptr<bool> alive = alive_;
  const uint64_t id = connection_id_;
  asio::post(io_, [this, alive, id, owner] {
    if (alive.expired()) return;
    redeclare_.erase(owner);
    if (id != connection_id_ || !conn_) return;
    for (const auto& q : cfg_->queues) {
      if (q.name != owner) continue;
      try {
        declare_queue(q);
      } catch (const amqp::AmqpError& e) {
        if (id != connection_id_ || !conn_) return;
        if (!e.channel_closed()) {
          lost(e.what());
          return;
        }
        log::error("cannot declare a queue now", {{"queue", q.name}, {"reason", e.what()}});
      }
    }
  });
}

}  // namespace er::consume
