#include "consume/session.hpp"

#include <boost/asio/post.hpp>

#include <algorithm>
#include <charconv>

#include "amqp/topology.hpp"
#include "event/envelope.hpp"
#include "util/log.hpp"

namespace er::consume {

namespace asio = boost::asio;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

namespace {
constexpr amqp_channel_t kPublishChannel = 1;
constexpr amqp_channel_t kFirstConsumerChannel = 2;
constexpr auto kHandBackPause = std::chrono::seconds(5);

std::string_view sv(amqp_bytes_t b) { return amqp::view(b); }

milliseconds next_backoff(milliseconds current, milliseconds initial, milliseconds max) {
  return current.count() == 0 ? initial : std::min(current * 2, max);
}
}  // namespace

// One in-flight event. Owns the rabbitmq-c envelope (body and properties stay
// where the library put them: no copy) until it is acked, handed back, or
// dropped as stale.
struct Delivery final : dispatch::Job {
  Session* session = nullptr;
  uint64_t epoch = 0;     // connection it came on
  uint64_t gen = 0;       // incarnation of its queue's channel
  amqp_channel_t channel = 0;
  size_t queue = 0;       // index in its generation's queues
  std::shared_ptr<Session::Generation> g;  // config and handlers it runs with
  Session::QueueChannel* qc = nullptr;
  amqp_envelope_t env{};
  bool has_env = false;
  bool returned = false;  // the broker could not route its copy
  std::string_view copy_target;
  event::Envelope envelope;
  dispatch::EventView view_;
  dispatch::HandlerSlot* slot = nullptr;
  steady_clock::time_point started;
  steady_clock::time_point published;  // its copy, for the confirm latency

  const dispatch::EventView& view() const override { return view_; }
  void finish(dispatch::Outcome outcome) override { session->on_finished(this, std::move(outcome)); }
  bool stale() const override {
    return session->epoch_.load(std::memory_order_relaxed) != epoch ||
           qc->gen.load(std::memory_order_relaxed) != gen;
  }
};

Session::Session(asio::io_context& io, std::unique_ptr<dispatch::Runtime> runtime, metrics::Registry& registry,
                 dedupe::Store* dedupe)
    : io_(io),
      registry_(registry),
      heartbeat_timer_(io),
      reconnect_timer_(io),
      deadline_timer_(io),
      dedupe_(dedupe),
      dedupe_timer_(io) {
  current_ = make_generation(std::move(runtime));
  for (size_t i = 0; i < current_->channels.size(); ++i) current_->channels[i]->index = i;
  registry.add_collector([this] {
    std::string reason;
    current_->m->connected->set(ready(reason) ? 1 : 0);
    current_->m->in_flight->set(static_cast<double>(in_flight_));
  });
}

// Binds a runtime to the per-queue channel state, which is kept by queue name
// across reloads.
std::shared_ptr<Session::Generation> Session::make_generation(std::unique_ptr<dispatch::Runtime> rt) {
  auto g = std::make_shared<Generation>();
  g->cfg = rt->config.get();
  g->m = std::make_unique<SessionMetrics>(registry_, *rt);
  for (const auto& q : g->cfg->queues) {
    std::vector<RetryStep> steps;
    for (auto d : q.retry_steps()) steps.push_back({d, amqp::retry_queue_name(q.name, d)});
    g->steps.push_back(std::move(steps));
    QueueChannel* qc = nullptr;
    for (auto& c : qch_)
      if (c->name == q.name) qc = c.get();
    if (!qc) {
      qch_.push_back(std::make_unique<QueueChannel>());
      qc = qch_.back().get();
      qc->name = q.name;
      qc->retry_timer = std::make_unique<asio::steady_timer>(io_);
    }
    g->channels.push_back(qc);
  }
  g->rt = std::move(rt);
  generations_.push_back(g);
  return g;
}

Session::~Session() {
  if (socket_) socket_->release();  // the fd belongs to rabbitmq-c
}

void Session::start(std::function<void()> on_ready, std::function<void()> on_stopped) {
  on_ready_ = std::move(on_ready);
  on_stopped_ = std::move(on_stopped);
  if (dedupe_) arm_dedupe_flush();
  connect();
}

// Commits the dedupe store's batch every 100 ms and prunes expired ids every
// ~10 s, from the loop: no thread, no per-event fsync.
void Session::arm_dedupe_flush() {
  dedupe_timer_.expires_after(milliseconds(100));
  dedupe_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || !dedupe_) return;
    try {
      dedupe_->flush();
      if (++dedupe_ticks_ % 100 == 0) dedupe_->prune();
    } catch (const std::exception& e) {
      log::error("dedupe store", {{"error", e.what()}});
    }
    if (state_ != State::Stopped) arm_dedupe_flush();
  });
}

bool Session::is_duplicate(const Delivery* d) {
  const auto& q = d->g->cfg->queues[d->queue];
  if (!dedupe_ || q.dedupe_ttl.count() == 0 || d->envelope.event_id.empty()) return false;
  try {
    return dedupe_->seen(q.name, d->envelope.event_id);
  } catch (const std::exception& e) {
    // Without the store the event runs again: at-least-once, never lost.
    log::error("dedupe store lookup failed; handling the event", {{"error", e.what()}});
    return false;
  }
}

// Recorded before the ack: if the ack is lost, the redelivery is skipped.
void Session::remember_success(const Delivery* d) {
  const auto& q = d->g->cfg->queues[d->queue];
  if (!dedupe_ || q.dedupe_ttl.count() == 0 || d->envelope.event_id.empty()) return;
  try {
    dedupe_->record(q.name, d->envelope.event_id,
                    std::chrono::duration_cast<std::chrono::seconds>(q.dedupe_ttl));
  } catch (const std::exception& e) {
    log::error("dedupe store write failed", {{"error", e.what()}});
  }
}

bool Session::ready(std::string& reason) const {
  if (state_ != State::Running || !conn_) {
    reason = state_ == State::Draining ? "shutting down" : "not connected to the broker";
    return false;
  }
  for (const auto* qc : current_->channels) {
    if (qc->channel == 0) {
      reason = "not consuming queue '" + qc->name + "'";
      return false;
    }
  }
  return true;
}

void Session::connect() {
  if (state_ == State::Draining || state_ == State::Stopped) return;
  state_ = State::Connecting;
  const config::Config& cfg_ = cfg();
  const std::string& url = cfg_.broker.urls[url_index_ % cfg_.broker.urls.size()];
  const std::string masked = log::mask_url(url);
  try {
    amqp::ConnectOptions opts = amqp::connect_options(cfg_.broker, url_index_);
    conn_.emplace(amqp::Connection::open(opts));
    amqp_connection_state_t c = conn_->get();
    node_ = masked;
    log::info("connected", {{"broker", masked}, {"server_version", conn_->server_version()}});

    conn_->open_channel(kPublishChannel);
    try {
      amqp::declare_topology(*conn_, kPublishChannel, cfg_);
    } catch (const amqp::AmqpError& e) {
      // A topology the broker refuses will not fix itself by retrying.
      log::error(e.what());
      exit_code_ = 1;
      conn_.reset();
      state_ = State::Draining;
      finish_stop();
      return;
    }
    amqp_confirm_select(c, kPublishChannel);
    amqp::check_reply(amqp_get_rpc_reply(c), "enabling publisher confirms");
    confirms_.reset();
    blocked_ = false;
    channel_map_.assign(65536, nullptr);
    next_channel_ = kFirstConsumerChannel;
    // Queues removed by a reload and still draining died with the old connection.
    // (In-flight events still point at them until they settle.)
    qch_.erase(std::remove_if(qch_.begin(), qch_.end(),
                              [](const auto& q) { return q->removed && q->in_flight == 0; }),
               qch_.end());
    for (auto& q : qch_) {
      q->channel = 0;
      q->backoff = milliseconds(0);
      q->retry_timer->cancel();
    }
    for (auto* qc : current_->channels) open_queue_channel(*qc);
  } catch (const amqp::AmqpError& e) {
    conn_.reset();
    schedule_reconnect(e.what());
    return;
  }

  ++epoch_;
  if (connected_once_) {
    ++stats_.reconnects;
    current_->m->reconnects->inc();
  }
  connected_once_ = true;
  backoff_ = milliseconds(0);
  socket_.emplace(io_, conn_->fd());
  socket_armed_ = false;
  state_ = State::Running;
  log::info("ready", {{"queues", std::to_string(cfg_.queues.size())}, {"broker", masked}});
  if (on_ready_) on_ready_();
  arm_heartbeat();
  pump();  // the RPCs above may have buffered deliveries
}

void Session::schedule_reconnect(const std::string& why) {
  if (state_ == State::Draining || state_ == State::Stopped) {
    finish_stop();
    return;
  }
  // Try each URL in turn; back off only after a whole round failed, so one
  // dead node of a cluster costs no waiting.
  const config::Config& cfg_ = cfg();
  milliseconds wait{100};
  ++url_index_;
  if (url_index_ % cfg_.broker.urls.size() == 0) {
    backoff_ = next_backoff(backoff_, cfg_.broker.reconnect_initial, cfg_.broker.reconnect_max);
    // Jitter spreads the reconnects of many daemons after a broker restart.
    std::uniform_int_distribution<long> jitter(0, backoff_.count() / 4);
    wait = std::min(backoff_ + milliseconds(jitter(rng_)), cfg_.broker.reconnect_max);
  }
  const std::string& next = cfg_.broker.urls[url_index_ % cfg_.broker.urls.size()];
  log::error("broker unavailable, retrying",
             {{"reason", why}, {"next_broker", log::mask_url(next)}, {"retry_in_ms", std::to_string(wait.count())}});
  state_ = State::Connecting;
  reconnect_timer_.expires_after(wait);
  reconnect_timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) connect();
  });
}

// Opens a fresh channel for a queue of the current generation and starts
// consuming. Throws amqp::AmqpError.
void Session::open_queue_channel(QueueChannel& qc) {
  const auto& q = cfg().queues[qc.index];
  amqp_connection_state_t c = conn_->get();
  if (next_channel_ == 65535) throw amqp::AmqpError("out of channel numbers; reconnecting");
  amqp_channel_t ch = next_channel_++;
  conn_->open_channel(ch);
  amqp_basic_qos(c, ch, 0, q.prefetch, 0);
  amqp::check_reply(amqp_get_rpc_reply(c), "setting prefetch on queue '" + q.name + "'");
  auto* ok = amqp_basic_consume(c, ch, amqp::bytes(q.name), amqp_empty_bytes, 0, /*no_ack*/ 0, 0, amqp_empty_table);
  amqp::check_reply(amqp_get_rpc_reply(c), "consuming queue '" + q.name + "'");
  qc.channel = ch;
  qc.consuming = true;
  qc.consumer_tag = std::string(sv(ok->consumer_tag));
  channel_map_[ch] = &qc;
  log::info("consuming", {{"queue", q.name}, {"prefetch", std::to_string(q.prefetch)},
                          {"channel", std::to_string(ch)}});
}

// The broker closed one queue's channel or cancelled its consumer: results
// for its deliveries are stale now (the broker redelivers them). The other
// queues keep flowing while this one is recovered with backoff.
void Session::queue_channel_lost(QueueChannel& qc, const std::string& why) {
  if (qc.channel != 0) channel_map_[qc.channel] = nullptr;
  qc.channel = 0;
  qc.consuming = false;
  ++qc.gen;
  drop_waiting(qc);
  if (state_ != State::Running || qc.removed) return;
  const auto& b = cfg().broker;
  qc.backoff = next_backoff(qc.backoff, b.reconnect_initial, b.reconnect_max);
  log::error("queue channel lost, recovering",
             {{"queue", qc.name}, {"reason", why}, {"retry_in_ms", std::to_string(qc.backoff.count())}});
  uint64_t epoch = epoch_;
  QueueChannel* p = &qc;
  qc.retry_timer->expires_after(qc.backoff);
  qc.retry_timer->async_wait([this, p, epoch](boost::system::error_code ec) {
    if (ec || epoch != epoch_ || !conn_ || state_ != State::Running || p->removed) return;
    reopen_queue(*p);
  });
}

void Session::reopen_queue(QueueChannel& qc) {
  const uint64_t epoch = epoch_;
  try {
    // Declare on the publish channel: if the broker refuses, it closes that
    // channel, which is handled as a lost connection (and retried).
    amqp::declare_queue(*conn_, kPublishChannel, cfg(), cfg().queues[qc.index]);
    open_queue_channel(qc);
    qc.backoff = milliseconds(0);
  } catch (const amqp::AmqpError& e) {
    if (epoch != epoch_ || !conn_) return;
    connection_lost(e.what());
    return;
  }
  if (epoch == epoch_ && conn_) pump();
}

// A queue a reload removed: once its last in-flight event is settled, close
// its channel (what it still had prefetched goes back to the queue).
void Session::close_removed(QueueChannel& qc) {
  if (!qc.removed || qc.in_flight != 0 || qc.channel == 0) return;
  if (conn_) {
    channel_map_[qc.channel] = nullptr;
    amqp_channel_close(conn_->get(), qc.channel, AMQP_REPLY_SUCCESS);
  }
  qc.channel = 0;
  qc.consuming = false;
  ++qc.gen;
  log::info("stopped consuming a queue removed from the config", {{"queue", qc.name}});
}

void Session::reload(std::unique_ptr<dispatch::Runtime> runtime, dedupe::Store* dedupe) {
  auto g = make_generation(std::move(runtime));
  const config::Config& next = *g->cfg;
  const config::Config& prev = cfg();
  if (conn_ && state_ == State::Running) {
    // Declare first, on a channel of its own: if the broker refuses the new
    // topology it closes that channel, and nothing else has changed.
    amqp_channel_t tmp = next_channel_++;
    conn_->open_channel(tmp);
    try {
      declare_changes(tmp, prev, next, *g);
    } catch (const amqp::AmqpError&) {
      amqp_channel_close_ok_t ok{};
      amqp_send_method(conn_->get(), tmp, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
      throw;
    }
    amqp_channel_close(conn_->get(), tmp, AMQP_REPLY_SUCCESS);
  }
  finish_reload(std::move(g), prev, dedupe);
}

void Session::declare_changes(amqp_channel_t ch, const config::Config& prev, const config::Config& next,
                              const Generation& g) {
  {
    amqp::declare_topology(*conn_, ch, next);
    for (size_t i = 0; i < next.queues.size(); ++i) {
      const auto& nq = next.queues[i];
      for (const auto& oq : prev.queues) {
        if (oq.name != nq.name) continue;
        for (const auto& key : oq.bindings) {
          bool still = std::find(nq.bindings.begin(), nq.bindings.end(), key) != nq.bindings.end() &&
                       prev.exchange.name == next.exchange.name;
          if (still) continue;
          amqp_queue_unbind(conn_->get(), ch, amqp::bytes(oq.name), amqp::bytes(prev.exchange.name),
                            amqp::bytes(key), amqp_empty_table);
          amqp::check_reply(amqp_get_rpc_reply(conn_->get()), "unbinding queue '" + oq.name + "' key '" + key + "'");
        }
        QueueChannel* qc = g.channels[i];
        if (qc->channel != 0 && oq.prefetch != nq.prefetch) {
          amqp_basic_qos(conn_->get(), qc->channel, 0, nq.prefetch, 0);
          amqp::check_reply(amqp_get_rpc_reply(conn_->get()), "setting prefetch on queue '" + nq.name + "'");
        }
      }
    }
  }
}

void Session::finish_reload(std::shared_ptr<Generation> g, const config::Config& prev, dedupe::Store* dedupe) {
  const config::Config& next = *g->cfg;
  if (prev.broker.urls != next.broker.urls) log::warn("broker URLs changed; they apply at the next reconnect");
  // Switch. Queues that are gone stop being consumed; their queues stay.
  for (auto& qc : qch_) {
    bool kept = std::find(g->channels.begin(), g->channels.end(), qc.get()) != g->channels.end();
    if (kept || qc->removed) continue;
    qc->removed = true;
    qc->retry_timer->cancel();
    if (conn_ && qc->channel != 0 && qc->consuming) {
      amqp_basic_cancel_t req{};
      req.consumer_tag = amqp::bytes(qc->consumer_tag);
      amqp_send_method(conn_->get(), qc->channel, AMQP_BASIC_CANCEL_METHOD, &req);
      qc->consuming = false;
    }
  }
  for (size_t i = 0; i < g->channels.size(); ++i) {
    g->channels[i]->index = i;
    g->channels[i]->removed = false;
  }
  current_ = std::move(g);
  bool had_dedupe = dedupe_ != nullptr;
  dedupe_ = dedupe;
  if (dedupe_ && !had_dedupe && state_ != State::Stopped) arm_dedupe_flush();
  if (conn_ && state_ == State::Running) {
    for (auto* qc : current_->channels) {
      if (qc->channel == 0) {
        open_queue_channel(*qc);  // a new queue
      } else if (!qc->consuming) {
        // Added back while its old consumer still drains: consume again on the same channel.
        const auto& q = current_->cfg->queues[qc->index];
        auto* ok = amqp_basic_consume(conn_->get(), qc->channel, amqp::bytes(q.name), amqp_empty_bytes, 0, 0, 0,
                                      amqp_empty_table);
        amqp::check_reply(amqp_get_rpc_reply(conn_->get()), "consuming queue '" + q.name + "'");
        qc->consumer_tag = std::string(sv(ok->consumer_tag));
        qc->consuming = true;
        log::info("consuming", {{"queue", q.name}, {"channel", std::to_string(qc->channel)}});
      }
    }
  }
  for (auto& qc : qch_) close_removed(*qc);
  log::info("reloaded", {{"queues", std::to_string(current_->cfg->queues.size())}});
  if (conn_) pump();
}

void Session::arm_socket() {
  if (!socket_ || socket_armed_) return;
  socket_armed_ = true;
  uint64_t epoch = epoch_;
  socket_->async_wait(asio::posix::stream_descriptor::wait_read, [this, epoch](boost::system::error_code ec) {
    if (epoch != epoch_) return;
    socket_armed_ = false;
    if (ec) return;  // cancelled: the connection is being torn down
    pump();
  });
}

void Session::arm_heartbeat() {
  const config::Config& cfg_ = cfg();
  if (cfg_.broker.heartbeat.count() == 0) return;
  // rabbitmq-c sends heartbeats and detects a silent peer only inside its
  // wait calls, so turn the crank at least twice per interval when idle.
  auto period = std::max(milliseconds(200), cfg_.broker.heartbeat / 2);
  uint64_t epoch = epoch_;
  heartbeat_timer_.expires_after(period);
  heartbeat_timer_.async_wait([this, epoch](boost::system::error_code ec) {
    if (ec || epoch != epoch_ || !conn_) return;
    pump();
    if (epoch == epoch_ && conn_) arm_heartbeat();
  });
}

void Session::pump() {
  if (!conn_) return;
  const uint64_t epoch = epoch_;
  amqp_connection_state_t c = conn_->get();
  for (;;) {
    amqp_maybe_release_buffers(c);
    timeval zero{0, 0};
    amqp_envelope_t env;
    amqp_rpc_reply_t r = amqp_consume_message(c, &env, &zero, 0);
    if (r.reply_type == AMQP_RESPONSE_NORMAL) {
      on_delivery(env);
      if (epoch != epoch_ || !conn_) return;
      continue;
    }
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) break;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
      amqp_frame_t frame;
      int rc = amqp_simple_wait_frame_noblock(c, &frame, &zero);
      if (rc == AMQP_STATUS_TIMEOUT) break;
      if (rc != AMQP_STATUS_OK) {
        connection_lost(std::string("reading from the broker: ") + amqp_error_string2(rc));
        return;
      }
      on_frame(frame);
      if (epoch != epoch_ || !conn_) return;
      continue;
    }
    connection_lost(amqp::describe_reply(r, "reading from the broker"));
    return;
  }
  arm_socket();
}

void Session::on_frame(const amqp_frame_t& frame) {
  if (frame.frame_type != AMQP_FRAME_METHOD) return;  // content of a message on a channel we closed
  amqp_connection_state_t c = conn_->get();
  QueueChannel* qc = channel_map_.empty() ? nullptr : channel_map_[frame.channel];
  switch (frame.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
      auto* m = static_cast<amqp_basic_ack_t*>(frame.payload.method.decoded);
      if (frame.channel == kPublishChannel) on_confirm(m->delivery_tag, m->multiple, true);
      break;
    }
    case AMQP_BASIC_NACK_METHOD: {
      auto* m = static_cast<amqp_basic_nack_t*>(frame.payload.method.decoded);
      if (frame.channel == kPublishChannel) on_confirm(m->delivery_tag, m->multiple, false);
      break;
    }
    case AMQP_BASIC_CANCEL_OK_METHOD:
      break;
    case AMQP_BASIC_CANCEL_METHOD: {
      // The broker cancelled a consumer (its queue was deleted, or its node
      // went down). Close that channel and consume again on a fresh one.
      if (!qc) break;
      auto ch = frame.channel;
      if (qc->removed) break;  // our own cancel after a reload
      std::string why = "the broker cancelled the consumer (queue deleted?)";
      queue_channel_lost(*qc, why);
      amqp_channel_close(c, ch, AMQP_REPLY_SUCCESS);  // sync; other frames are queued meanwhile
      break;
    }
    case AMQP_BASIC_RETURN_METHOD:
      on_return(frame);
      break;
    case AMQP_CHANNEL_CLOSE_METHOD: {
      auto* m = static_cast<amqp_channel_close_t*>(frame.payload.method.decoded);
      std::string why = "the broker closed channel " + std::to_string(frame.channel) + ": " +
                        std::string(sv(m->reply_text));
      amqp_channel_close_ok_t ok{};
      amqp_send_method(c, frame.channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
      if (qc) {
        queue_channel_lost(*qc, why);
      } else {
        connection_lost(why);  // the publish channel: start over cleanly
      }
      break;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      auto* m = static_cast<amqp_connection_close_t*>(frame.payload.method.decoded);
      std::string why = "the broker closed the connection: " + std::string(sv(m->reply_text));
      amqp_connection_close_ok_t ok{};
      amqp_send_method(c, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
      connection_lost(why);
      break;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD: {
      auto* m = static_cast<amqp_connection_blocked_t*>(frame.payload.method.decoded);
      blocked_ = true;
      log::warn("the broker blocked publishing (resource alarm); copies wait, consuming goes on",
                {{"reason", sv(m->reason)}});
      break;
    }
    case AMQP_CONNECTION_UNBLOCKED_METHOD: {
      blocked_ = false;
      log::info("the broker unblocked publishing", {{"waiting", std::to_string(blocked_publishes_.size())}});
      auto waiting = std::move(blocked_publishes_);
      blocked_publishes_.clear();
      for (auto& p : waiting) publish_copy(p.d, p.routing_key, std::move(p.props), "publishing a held copy");
      break;
    }
    default:
      log::debug("ignored frame", {{"method", std::to_string(frame.payload.method.id)}});
  }
}

// A copy we published could not be routed (its queue was deleted). Copies are
// published mandatory, so the broker says so before it confirms them. Every
// pending copy to that queue is treated as failed (the original goes back to
// the broker: never lost, at worst copied twice), and the queue is re-declared.
void Session::on_return(const amqp_frame_t& frame) {
  auto* m = static_cast<amqp_basic_return_t*>(frame.payload.method.decoded);
  std::string target(sv(m->routing_key));
  amqp_message_t msg;
  amqp_rpc_reply_t r = amqp_read_message(conn_->get(), frame.channel, &msg, 0);
  if (r.reply_type == AMQP_RESPONSE_NORMAL) amqp_destroy_message(&msg);
  confirms_.for_each([&](Delivery* d) {
    if (d->copy_target == target) d->returned = true;
  });
  log::error("the broker could not route a copy; re-declaring the queues",
             {{"target", target}, {"reply", sv(m->reply_text)}});
  const uint64_t epoch = epoch_;
  try {
    amqp::declare_topology(*conn_, kPublishChannel, cfg());
  } catch (const amqp::AmqpError& e) {
    if (epoch == epoch_ && conn_) connection_lost(e.what());
  }
}

Delivery* Session::acquire() {
  if (pool_.empty()) {
    auto d = std::make_unique<Delivery>();
    d->session = this;
    return d.release();
  }
  Delivery* d = pool_.back().release();
  pool_.pop_back();
  return d;
}

template <class F>
void Session::for_each_generation(F&& f) {
  generations_.erase(std::remove_if(generations_.begin(), generations_.end(),
                                    [](const auto& w) { return w.expired(); }),
                     generations_.end());
  for (auto& w : generations_) {
    if (auto g = w.lock()) f(*g);
  }
}

void Session::release(Delivery* d) {
  if (d->has_env) amqp_destroy_envelope(&d->env);
  d->has_env = false;
  d->slot = nullptr;
  d->returned = false;
  QueueChannel* qc = d->qc;
  d->qc = nullptr;
  d->g.reset();  // the last event of an old generation unloads its handlers
  --in_flight_;
  --qc->in_flight;
  pool_.emplace_back(d);
  close_removed(*qc);
  maybe_finish_stop();
}

bool Session::live(const Delivery* d) const {
  return conn_ && d->epoch == epoch_ && d->gen == d->qc->gen && d->qc->channel == d->channel;
}

void Session::on_delivery(amqp_envelope_t& env) {
  QueueChannel* qc = channel_map_[env.channel];
  if (state_ != State::Running || !qc || qc->removed) {
    // Draining, or a channel we closed: leave it unacked; the channel's close
    // hands it back to the broker.
    amqp_destroy_envelope(&env);
    return;
  }
  const size_t qi = qc->index;
  Generation& g = *current_;
  ++stats_.received;
  auto& qm = g.m->queue(qi);
  qm.received->inc();
  if (env.redelivered) qm.redelivered->inc();
  Delivery* d = acquire();
  ++in_flight_;
  d->env = env;
  d->has_env = true;
  d->epoch = epoch_;
  d->gen = qc->gen;
  d->qc = qc;
  ++qc->in_flight;
  d->g = current_;
  d->channel = env.channel;
  d->queue = qi;
  d->slot = nullptr;
  const auto& qcfg = g.cfg->queues[qi];
  const auto& body = d->env.message.body;
  // A retry copy comes back through the default exchange: its headers say
  // which attempt it is and where it was first published.
  settle::DeliveryHistory history = settle::read_history(d->env.message.properties);
  std::string_view rk = history.has_original ? history.original_routing_key : sv(d->env.routing_key);

  auto& v = d->view_;
  v.body = sv(body);
  v.routing_key = rk;
  v.exchange = history.has_original ? history.original_exchange : sv(d->env.exchange);
  v.queue = qcfg.name;
  v.envelope = &d->envelope;
  v.attempt = history.attempt;
  v.redelivered = d->env.redelivered != 0;

  if (body.len > qcfg.max_message_bytes) {
    d->envelope.clear();
    dead_letter(d, "too_large",
                "body of " + std::to_string(body.len) + " bytes exceeds max_message_bytes " +
                    std::to_string(qcfg.max_message_bytes),
                {});
    return;
  }
  auto status = event::decode(static_cast<const char*>(body.bytes), body.len, rk, d->envelope, detail_);
  if (status != event::DecodeStatus::Ok) {
    dead_letter(d, event::reason_code(status), detail_, {});
    return;
  }
  if (g.rt->schemas &&
      !g.rt->schemas->validate(static_cast<const char*>(body.bytes), body.len, d->envelope.event_type, detail_)) {
    dead_letter(d, "schema_violation", detail_, {});
    return;
  }
  if (is_duplicate(d)) {
    log::debug("duplicate skipped: this event_id already succeeded",
               {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id}});
    qm.duplicates->inc();
    ack(d);
    return;
  }
  dispatch::HandlerSlot* slot = g.rt->queues[qi].route(d->envelope.event_type);
  if (!slot) {
    if (qcfg.unhandled == config::Unhandled::Ack) {
      log::info("unhandled event acked (unhandled: ack)",
                {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id}});
      ++stats_.acked;
      qm.unhandled_acked->inc();
      ack(d);
    } else {
      dead_letter(d, "unhandled", "no handler of queue '" + qcfg.name + "' takes event type '" +
                                      d->envelope.event_type + "'", {});
    }
    return;
  }
  d->slot = slot;
  if (slot->active < slot->limit) {
    start_job(d);
  } else {
    slot->waiting.push_back(d);
  }
}

void Session::start_job(Delivery* d) {
  ++d->slot->active;
  d->started = steady_clock::now();
  d->slot->handler->start(*d);
}

void Session::start_waiting(dispatch::HandlerSlot* slot) {
  while (slot->active < slot->limit && !slot->waiting.empty()) {
    auto* d = static_cast<Delivery*>(slot->waiting.front());
    slot->waiting.pop_front();
    if (!live(d) || state_ != State::Running) {
      release(d);
      continue;
    }
    start_job(d);
  }
}

void Session::on_finished(Delivery* d, dispatch::Outcome outcome) {
  dispatch::HandlerSlot* slot = d->slot;
  --slot->active;
  const std::string& handler = slot->handler->name();
  Generation& g = *d->g;
  auto& sm = g.m->queue(d->queue).slots[static_cast<size_t>(slot - g.rt->queues[d->queue].slots().data())];
  const auto elapsed = steady_clock::now() - d->started;
  sm.duration->observe(std::chrono::duration<double>(elapsed).count());
  (outcome.verdict == dispatch::Verdict::Ack     ? sm.ack
   : outcome.verdict == dispatch::Verdict::Retry ? sm.retry
                                                 : sm.dead_letter)
      ->inc();
  if (log::enabled(log::Level::Info)) {
    auto ms = std::chrono::duration<double, std::milli>(elapsed).count();
    char dur[32];
    auto res = std::to_chars(dur, dur + sizeof dur, static_cast<long long>(ms + 0.5));
    log::write(outcome.verdict == dispatch::Verdict::Ack ? log::Level::Info : log::Level::Warn, "handled",
               {{"queue", d->view_.queue},
                {"event_type", d->envelope.event_type},
                {"event_id", d->envelope.event_id},
                {"correlation_id", d->envelope.correlation_id},
                {"handler", handler},
                {"outcome", dispatch::verdict_name(outcome.verdict)},
                {"duration_ms", std::string_view(dur, static_cast<size_t>(res.ptr - dur))},
                {"detail", outcome.detail}});
  }
  if (!live(d)) {
    // Its channel is gone; the broker redelivers the event. A success is still
    // recorded, so that with dedupe the redelivery does not run it again.
    if (outcome.verdict == dispatch::Verdict::Ack) remember_success(d);
    log::debug("dropping a result from a closed channel", {{"event_id", d->envelope.event_id}});
    release(d);
  } else if (outcome.verdict == dispatch::Verdict::Ack) {
    ++stats_.acked;
    remember_success(d);
    ack(d);
  } else if (outcome.verdict == dispatch::Verdict::Retry) {
    retry(d, outcome, handler, slot->cfg->retry);
  } else {
    dead_letter(d, outcome.reason.empty() ? "handler_failed" : outcome.reason, outcome.detail, handler);
  }
  start_waiting(slot);
}

void Session::ack(Delivery* d) {
  int rc = amqp_basic_ack(conn_->get(), d->channel, d->env.delivery_tag, 0);
  release(d);
  if (rc != AMQP_STATUS_OK) connection_lost(std::string("acknowledging: ") + amqp_error_string2(rc));
}

// The original stays unacked, so the broker still owns it; give it back after
// a pause so that a copy the broker keeps refusing (a full DLQ with
// reject-publish, say) does not become a hot redelivery loop.
void Session::hand_back_later(Delivery* d, const char* why) {
  log::error(why, {{"queue", d->qc->name}, {"event_id", d->envelope.event_id},
                   {"retry_in_ms", std::to_string(milliseconds(kHandBackPause).count())}});
  auto timer = std::make_shared<asio::steady_timer>(io_, kHandBackPause);
  timer->async_wait([this, d, timer](boost::system::error_code) {
    if (live(d)) amqp_basic_nack(conn_->get(), d->channel, d->env.delivery_tag, 0, /*requeue*/ 1);
    release(d);
  });
}

void Session::dead_letter(Delivery* d, std::string_view reason, std::string_view detail, std::string_view handler) {
  const auto& qcfg = d->g->cfg->queues[d->queue];
  settle::DeadLetterInfo info;
  info.reason = reason;
  info.detail = detail;
  info.handler = handler;
  info.queue = qcfg.name;
  info.exchange = d->view_.exchange;
  info.routing_key = d->view_.routing_key;
  info.attempts = d->view_.attempt;
  ++stats_.dead_lettered;
  d->g->m->dead_letters(qcfg.name, reason).inc();
  log::warn("dead-lettering",
            {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id},
             {"handler", handler}, {"reason", reason}, {"detail", detail}, {"dlq", qcfg.dead_letter_queue}});
  d->copy_target = qcfg.dead_letter_queue;
  publish_copy(d, qcfg.dead_letter_queue, std::make_unique<settle::CopyProperties>(d->env.message.properties, info),
               "publishing to the dead-letter queue");
}

void Session::retry(Delivery* d, const dispatch::Outcome& outcome, const std::string& handler,
                    const config::RetryConfig& policy) {
  const auto& qcfg = d->g->cfg->queues[d->queue];
  const std::string reason = outcome.reason.empty() ? "handler_failed" : outcome.reason;
  const uint32_t attempt = d->view_.attempt;
  const auto& steps = d->g->steps[d->queue];
  if (attempt >= policy.max_attempts || steps.empty()) {
    dead_letter(d, "max_attempts",
                "gave up after " + std::to_string(attempt) + " attempt" + (attempt == 1 ? "" : "s") +
                    "; last error: " + reason + (outcome.detail.empty() ? "" : ": " + outcome.detail),
                handler);
    return;
  }
  // The policy's wait, or the handler's own request if that is longer; both
  // land on a declared step, so no queue is ever created on the hot path.
  config::Duration want = std::max(policy.delay_before(attempt + 1), outcome.retry_delay);
  const RetryStep* step = &steps.back();
  for (const auto& s : steps) {
    if (s.delay >= want) {
      step = &s;
      break;
    }
  }
  // A little jitter (up to 10%, at most 1 s) spreads a burst of failures.
  long long base = step->delay.count();
  std::uniform_int_distribution<long long> jitter(0, std::min(base / 10, 1000LL));
  uint64_t expiration = static_cast<uint64_t>(base + jitter(rng_));

  settle::DeadLetterInfo info;
  info.reason = reason;
  info.detail = outcome.detail;
  info.handler = handler;
  info.queue = qcfg.name;
  info.exchange = d->view_.exchange;
  info.routing_key = d->view_.routing_key;
  info.attempts = attempt;
  ++stats_.retried;
  d->g->m->retries(qcfg.name, reason).inc();
  log::warn("retrying later",
            {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id},
             {"handler", handler}, {"attempt", std::to_string(attempt)},
             {"next_attempt_in_ms", std::to_string(expiration)}, {"detail", outcome.detail}});
  d->copy_target = step->queue;
  publish_copy(d, step->queue,
               std::make_unique<settle::CopyProperties>(d->env.message.properties, info, attempt + 1, expiration),
               "publishing a retry copy");
}

void Session::publish_copy(Delivery* d, const std::string& routing_key, std::unique_ptr<settle::CopyProperties> props,
                           const char* what) {
  if (!live(d)) {
    release(d);
    return;
  }
  if (blocked_) {
    blocked_publishes_.push_back({d, routing_key, std::move(props)});
    return;
  }
  int rc = amqp_basic_publish(conn_->get(), kPublishChannel, amqp_empty_bytes, amqp::bytes(routing_key),
                              /*mandatory*/ 1, 0, props->get(), d->env.message.body);
  if (rc != AMQP_STATUS_OK) {
    release(d);
    connection_lost(std::string(what) + ": " + amqp_error_string2(rc));
    return;
  }
  // The original is acked only once the broker confirms the copy (on_confirm).
  d->published = steady_clock::now();
  confirms_.add(d);
}

void Session::on_confirm(uint64_t tag, bool multiple, bool acked) {
  const auto now = steady_clock::now();
  confirms_.confirm(tag, multiple, acked, [this, now](Delivery* d, bool ok) {
    auto& m = *current_->m;
    m.confirm_latency->observe(std::chrono::duration<double>(now - d->published).count());
    (!ok ? m.confirms_nack : d->returned ? m.confirms_returned : m.confirms_ack)->inc();
    if (!live(d)) {
      release(d);
    } else if (ok && !d->returned) {
      ack(d);
    } else {
      hand_back_later(d, d->returned ? "the copy could not be routed; the event goes back to its queue"
                                     : "the broker refused the copy; the event goes back to its queue");
    }
  });
}

void Session::connection_lost(const std::string& why) {
  if (!conn_) return;
  log::error("connection lost", {{"reason", why}, {"broker", node_}});
  ++epoch_;  // every result still out belongs to the dead connection now
  if (socket_) {
    socket_->release();
    socket_.reset();
  }
  socket_armed_ = false;
  heartbeat_timer_.cancel();
  conn_.reset();
  for (auto& q : qch_) {
    q->channel = 0;
    ++q->gen;
    q->retry_timer->cancel();
  }
  confirms_.fail_all([this](Delivery* d, bool) { release(d); });
  auto held = std::move(blocked_publishes_);
  blocked_publishes_.clear();
  for (auto& p : held) release(p.d);
  for (auto& qc : qch_) drop_waiting(*qc);
  if (state_ == State::Draining) {
    // Nothing can be acked any more; what is unacked is redelivered.
    maybe_finish_stop();
    return;
  }
  schedule_reconnect(why);
}

// Events of this queue still waiting for a handler slot, in every generation
// that is alive: they have not started, so they are simply not acked.
void Session::drop_waiting(const QueueChannel& qc) {
  for_each_generation([&](Generation& g) {
    for (size_t i = 0; i < g.channels.size(); ++i) {
      if (g.channels[i] != &qc) continue;
      for (auto& slot : g.rt->queues[i].slots()) {
        auto waiting = std::move(slot.waiting);
        slot.waiting.clear();
        for (auto* j : waiting) release(static_cast<Delivery*>(j));
      }
    }
  });
}

void Session::stop() {
  if (state_ == State::Draining || state_ == State::Stopped) return;
  log::info("stopping", {{"in_flight", std::to_string(in_flight_)},
                         {"shutdown_timeout_ms", std::to_string(cfg().shutdown_timeout.count())}});
  reconnect_timer_.cancel();
  state_ = State::Draining;
  if (conn_) {
    for (auto& qc : qch_) {
      qc->retry_timer->cancel();
      if (qc->channel == 0 || qc->removed) continue;
      amqp_basic_cancel_t req{};
      req.consumer_tag = amqp::bytes(qc->consumer_tag);
      req.nowait = 0;
      amqp_send_method(conn_->get(), qc->channel, AMQP_BASIC_CANCEL_METHOD, &req);
    }
  }
  // Events waiting for a handler slot have not started: hand them back.
  for (auto& qc : qch_) drop_waiting(*qc);
  deadline_timer_.expires_after(cfg().shutdown_timeout);
  deadline_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || state_ == State::Stopped) return;
    log::warn("shutdown_timeout passed; abandoning in-flight events, the broker will redeliver them",
              {{"in_flight", std::to_string(in_flight_)}});
    aborted_ = true;
    for_each_generation([](Generation& g) {
      for (auto& q : g.rt->queues)
        for (auto& slot : q.slots()) slot.handler->abort_all();
    });
    finish_stop();
  });
  maybe_finish_stop();
}

void Session::maybe_finish_stop() {
  if (state_ == State::Draining && in_flight_ == 0) finish_stop();
}

void Session::finish_stop() {
  if (state_ == State::Stopped) return;
  state_ = State::Stopped;
  dedupe_timer_.cancel();
  if (dedupe_) {
    try {
      dedupe_->flush(true);
    } catch (const std::exception& e) {
      log::error("dedupe store", {{"error", e.what()}});
    }
  }
  heartbeat_timer_.cancel();
  reconnect_timer_.cancel();
  deadline_timer_.cancel();
  for (auto& q : qch_) q->retry_timer->cancel();
  if (socket_) {
    socket_->release();
    socket_.reset();
  }
  if (conn_) {
    conn_->close();
    conn_.reset();
  }
  ++epoch_;
  log::info("stopped", {{"unsettled", std::to_string(in_flight_)}});
  if (on_stopped_) asio::post(io_, std::move(on_stopped_));
}

}  // namespace er::consume
