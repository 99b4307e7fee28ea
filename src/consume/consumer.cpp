#include "consume/consumer.hpp"

#include <boost/asio/post.hpp>

#include <algorithm>
#include <charconv>
#include <csignal>
#include <optional>

#include "consume/intake.hpp"
#include "util/log.hpp"

namespace er::consume {

namespace asio = boost::asio;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

namespace {
constexpr auto kHandBackPause = std::chrono::seconds(5);

// Quorum and stream queues refuse a channel-wide (global) prefetch.
bool channel_wide_prefetch(const config::QueueConfig& q) {
  if (!q.single_active_consumer) return false;
  // Quorum queues refuse a channel-wide prefetch (a connection error).
  if (q.type == config::QueueType::Quorum) return false;
  for (const auto& a : q.arguments)
    if (a.key == "x-queue-type") return a.kind != config::QueueArgument::Kind::String || a.s == "classic";
  return true;
}
}  // namespace

// One in-flight event. Owns the envelope the link assembled (body and
// properties are not copied again) until it is settled or dropped. Holds its
// generation and its queue channel, so whatever a callback reaches through it
// stays alive until it is released.
struct Delivery final : dispatch::Job, settle::Settling, InLine {
  Consumer* consumer = nullptr;
  std::shared_ptr<Generation> g;
  std::shared_ptr<QueueChannel> qc;
  uint64_t connection = 0;  // the link's connection it came on
  uint64_t incarnation = 0; // of its queue channel
  amqp_channel_t channel = 0;
  size_t queue = 0;         // index in its generation's queues
  amqp_envelope_t env{};
  bool has_env = false;
  uint64_t body_size = 0;
  event::Envelope envelope;
  dispatch::EventView view_;
  dispatch::HandlerSlot* slot = nullptr;  // valid while `g` is held
  std::string running_key;                // set while registered in running_ids_
  std::vector<Delivery*> twins;           // copies of this event waiting for its outcome
  steady_clock::time_point started;
  steady_clock::time_point published;     // its copy, for the confirm latency
  std::optional<asio::steady_timer> hold_timer;  // ordered retries wait in place on it
  bool held = false;
  bool claimed = false;  // holds a claim in a shared dedupe store: release() frees it unless recorded

  const dispatch::EventView& view() const override { return view_; }
  void finish(dispatch::Outcome outcome) override { consumer->on_finished(this, std::move(outcome)); }
  bool stale() const override {
    return consumer->link_.connection_id() != connection ||
           qc->incarnation.load(std::memory_order_relaxed) != incarnation;
  }
};

Consumer::Consumer(asio::io_context& io, std::unique_ptr<dispatch::Runtime> runtime, metrics::Registry& registry,
                   Extras extras)
    : io_(io),
      registry_(registry),
      link_(io, *this),
      settler_(*this, registry),
      deadline_timer_(io),
      dedupe_timer_(io) {
  current_ = make_generation(std::move(runtime), std::move(extras));
  link_.set_config(current_->rt->config);
  registry.add_collector([this] {
    std::string reason;
    current_->m->connected->set(ready(reason) ? 1 : 0);
    current_->m->in_flight->set(static_cast<double>(in_flight_));
    current_->m->ack_frames->inc(link_.ack_frames() - ack_frames_counted_);
    ack_frames_counted_ = link_.ack_frames();
  });
  auto& waiting = registry.gauge("event_router_ordering_waiting_events",
                                 "Events waiting behind an earlier event of their aggregate (ordering: aggregate).",
                                 {"queue"});
  auto& longest = registry.gauge("event_router_ordering_longest_wait_seconds",
                                 "How long the longest-waiting of those events has waited so far.", {"queue"});
  auto& held = registry.gauge("event_router_ordering_held_events",
                              "Ordered events holding their delivery unacked while they wait in place for a retry.",
                              {"queue"});
  auto& consumed = registry.gauge("event_router_queue_consumed",
                                  "1 while the queue is consumed, 0 while its consumer is being recovered "
                                  "(e.g. its home node is down).",
                                  {"queue"});
  registry.add_collector([this, &consumed] {
    for (const auto& qc : current_->channels) consumed.with({qc->name}).set(qc->channel != 0 ? 1 : 0);
  });
  registry.add_collector([this, &waiting, &longest, &held] {
    const auto now = steady_clock::now();
    for (const auto& [queue, lines] : lines_) {
      waiting.with({queue}).set(static_cast<double>(lines.waiting()));
      longest.with({queue}).set(lines.longest_wait(now).count());
      held.with({queue}).set(static_cast<double>(lines.held));
    }
  });
}

Consumer::~Consumer() { *alive_ = false; }

// Binds a runtime to queue channels: a queue kept as it was keeps its
// channel; a new queue, or one whose prefetch changed, gets a new one, except
// a single-active-consumer queue: its prefetch changes on the kept consumer
// (switch_to), since a new one would queue behind other instances' standbys.
std::shared_ptr<Generation> Consumer::make_generation(std::unique_ptr<dispatch::Runtime> rt, Extras extras) {
  auto g = std::make_shared<Generation>();
  g->cfg = rt->config.get();
  g->m = std::make_unique<ConsumerMetrics>(registry_, *rt);
  g->dedupe = std::move(extras.dedupe);
  g->signer = std::move(extras.signer);
  for (size_t i = 0; i < g->cfg->queues.size(); ++i) {
    const auto& q = g->cfg->queues[i];
    g->steps.push_back(settle::retry_steps(q));
    for (const auto& h : q.handlers)
      if (h.ordering == config::Ordering::Aggregate) lines_.try_emplace(q.name);  // its gauges show from the start
    std::shared_ptr<QueueChannel> qc;
    if (current_) {
      for (auto& c : current_->channels)
        if (c->name == q.name && (c->prefetch == q.prefetch || c->single_active) && !c->retired) qc = c;
    }
    if (!qc)
      qc = std::make_shared<QueueChannel>(io_, q.name, q.prefetch, q.single_active_consumer, channel_wide_prefetch(q));
    g->channels.push_back(std::move(qc));
  }
  g->rt = std::move(rt);
  // Worker handlers start watching their processes (a kept one: again, harmlessly).
  for (auto& q : g->rt->queues)
    for (auto& slot : q.slots()) slot.handler->activate(registry_);
  generations_.push_back(g);
  return g;
}

// Over a snapshot: `f` may release the last delivery of a generation (or,
// through another call, prune the list) while this loop runs.
template <class F>
void Consumer::for_each_generation(F&& f) {
  generations_.erase(std::remove_if(generations_.begin(), generations_.end(),
                                    [](const auto& w) { return w.expired(); }),
                     generations_.end());
  std::vector<std::shared_ptr<Generation>> alive;
  alive.reserve(generations_.size());
  for (auto& w : generations_)
    if (auto g = w.lock()) alive.push_back(std::move(g));
  for (auto& g : alive) f(*g);
}

void Consumer::start(std::function<void()> on_ready, std::function<void()> on_stopped) {
  on_ready_ = std::move(on_ready);
  on_stopped_ = std::move(on_stopped);
  state_ = State::Running;
  for (size_t i = 0; i < current_->channels.size(); ++i) current_->channels[i]->index = i;
  if (current_->dedupe) arm_dedupe_flush();
  link_.start();
}

Consumer::Stats Consumer::stats() const {
  Stats s;
  s.received = received_;
  s.acked = settler_.stats().acked;
  s.retried = settler_.stats().retried;
  s.dead_lettered = settler_.stats().dead_lettered;
  s.reconnects = link_.reconnects();
  return s;
}

bool Consumer::ready(std::string& reason) const {
  if (state_ != State::Running || !link_.connected()) {
    reason = state_ == State::Draining ? "shutting down" : "not connected to the broker";
    return false;
  }
  // A queue the broker cannot serve now (its home node down) does not make
  // the daemon unready while it consumes others: restarting it would not
  // help, and the body names the queue (docs/scaling.md).
  std::string missing;
  size_t consumed = 0;
  for (const auto& qc : current_->channels) {
    if (qc->channel != 0) {
      ++consumed;
      continue;
    }
    missing += (missing.empty() ? "" : "; ") + std::string("not consuming queue '") + qc->name + "'";
    if (!qc->unavailable.empty()) missing += " (" + qc->unavailable + ")";
  }
  if (consumed == 0 && !current_->channels.empty()) {
    reason = missing;
    return false;
  }
  for (auto& q : current_->rt->queues)
    for (const auto& slot : q.slots())
      if (!slot.handler->ready(reason)) return false;
  if (current_->dedupe && !current_->dedupe->ready(reason)) return false;
  reason = missing.empty() ? std::string() : "degraded: " + missing;
  return true;
}

// The dedupe store's tick every 100 ms (SQLite: commit the batch, prune
// every ~10 s; PostgreSQL: time bounds, reconnect, prune), from the loop.
void Consumer::arm_dedupe_flush() {
  dedupe_timer_.expires_after(milliseconds(100));
  dedupe_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    auto store = current_->dedupe;
    if (!store) return;  // armed again by the reload that brings one
    try {
      store->tick();
    } catch (const std::exception& e) {
      log::error("dedupe store", {{"error", e.what()}});
    }
    if (state_ != State::Stopped) arm_dedupe_flush();
  });
}

// Recorded before the ack: if the ack is lost, the redelivery is skipped.
void Consumer::remember_success(Delivery* d) {
  const auto& q = d->g->cfg->queues[d->queue];
  const auto& store = d->g->dedupe;
  if (!store || q.dedupe_ttl.count() == 0 || d->envelope.event_id.empty()) return;
  d->claimed = false;  // the record replaces the claim
  try {
    store->record(q.name, d->envelope.event_id, std::chrono::duration_cast<std::chrono::seconds>(q.dedupe_ttl));
  } catch (const std::exception& e) {
    log::error("dedupe store write failed", {{"error", e.what()}});
  }
}

void Consumer::link_up() {
  // Consumers retired by a reload died with the old connection.
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(), [](const auto& q) { return q->in_flight == 0; }),
                 retired_.end());
  if (link_.reconnects() > reconnects_counted_) {
    current_->m->reconnects->inc(link_.reconnects() - reconnects_counted_);
    reconnects_counted_ = link_.reconnects();
  }
  if (state_ != State::Running) return;
  const uint64_t id = link_.connection_id();
  for (auto& qc : current_->channels) {
    if (qc->channel != 0 || qc->recovering) continue;  // started by the connector, or being recovered
    link_.open_queue(qc);  // new since the connection was opened
    if (id != link_.connection_id()) return;
  }
  log::info("ready", {{"queues", std::to_string(current_->channels.size())}, {"broker", link_.node()}});
  if (on_ready_) on_ready_();
}

void Consumer::delivery(QueueChannel& qc, amqp_envelope_t& env, uint64_t body_size) {
  if (state_ != State::Running || qc.retired || !qc.consuming) {
    // Draining, or a consumer we cancelled: hand it back at once rather than
    // leave it unacked until the channel closes (unless parking, see give_back).
    if (!parking(qc)) link_.nack(env.channel, env.delivery_tag, /*requeue*/ true);
    amqp_destroy_envelope(&env);
    return;
  }
  Generation& g = *current_;
  const size_t qi = qc.index;
  const auto& qcfg = g.cfg->queues[qi];
  ++received_;
  auto& qm = g.m->queue(qi);
  qm.received->inc();
  if (env.redelivered) qm.redelivered->inc();

  Delivery* d = acquire();
  ++in_flight_;
  d->env = env;
  d->has_env = true;
  d->body_size = body_size;
  d->connection = link_.connection_id();
  d->qc = g.channels[qi];
  d->incarnation = qc.incarnation.load(std::memory_order_relaxed);
  d->channel = env.channel;
  ++qc.in_flight;
  d->g = current_;
  d->queue = qi;
  d->slot = nullptr;

  const auto& props = d->env.message.properties;
  // A retry copy comes back through the default exchange: its headers say
  // which attempt it is and where it was first published, and are believed
  // only when our signature over them and the body verifies.
  settle::DeliveryHistory history = settle::read_history(props, amqp::view(d->env.message.body), *g.signer);
  std::string_view rk = history.has_original ? history.original_routing_key : amqp::view(d->env.routing_key);
  auto& v = d->view_;
  v.body = amqp::view(d->env.message.body);
  v.routing_key = rk;
  v.exchange = history.has_original ? history.original_exchange : amqp::view(d->env.exchange);
  v.queue = qcfg.name;
  v.envelope = &d->envelope;
  v.attempt = history.attempt;
  v.redelivered = d->env.redelivered != 0;
  d->properties = &props;
  d->body = d->env.message.body;
  d->queue_cfg = &qcfg;
  d->steps = &g.steps[qi];
  d->exchange = v.exchange;
  d->routing_key = v.routing_key;
  d->attempt = v.attempt;
  d->signer = g.signer.get();
  d->frame_max = link_.frame_max();

  const auto& store = g.dedupe;
  std::function<bool(std::string_view)> seen;
  if (store && qcfg.dedupe_ttl.count() > 0 && !store->asynchronous()) {
    // Answered at once. A failed lookup (logged by the store) runs the event
    // again: at-least-once, never lost.
    seen = [&](std::string_view id) {
      bool dup = false;
      store->check(qcfg.name, id, [&](dedupe::Check c) { dup = c == dedupe::Check::Seen; });
      return dup;
    };
  }
  v.crash_slot = -1;
  Decision dec;
  if (guard_ && qcfg.crash_max > 0 && crash_looped(d, qcfg)) {
    d->envelope.clear();
    dec.kind = Decision::Kind::DeadLetter;
    dec.reason = "crash_loop";
  } else {
    IntakeInput in{d->env.message.body, body_size, rk};
    CrashMark mark(v.crash_slot);  // a crash while parsing counts against this event
    dec = decide(in, qcfg, g.rt->queues[qi], g.rt->schemas.get(), seen, d->envelope, detail_);
  }
  if (v.crash_slot >= 0) {
    guard_->set_id(v.crash_slot, d->envelope.event_id);
    guard_->set_active(v.crash_slot, false);  // until an in-process handler runs it
  }
  d->event_id = d->envelope.event_id;
  d->event_type = d->envelope.event_type;
  d->correlation_id = d->envelope.correlation_id;
  d->emit_exchange = g.cfg->exchange.name;
  d->schemas = g.rt->schemas.get();
  switch (dec.kind) {
    case Decision::Kind::DeadLetter:
      settler_.dead_letter(*d, dec.reason, detail_, {});
      return;
    case Decision::Kind::Duplicate:
      log::debug("duplicate skipped: this event_id already succeeded",
                 {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id}});
      qm.duplicates->inc();
      ack(*d);
      return;
    case Decision::Kind::UnhandledAck:
      log::info("unhandled event acked (unhandled: ack)",
                {{"queue", qcfg.name}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id}});
      qm.unhandled_acked->inc();
      settler_.ack(*d);
      return;
    case Decision::Kind::Handle:
      break;
  }
  d->slot = dec.slot;
  if (qcfg.dedupe_ttl.count() > 0 && store && !d->envelope.event_id.empty()) {
    // Another copy of this event is running now (a retry copy and a
    // redelivery, say): wait for its outcome instead of running beside it.
    std::string key;
    key.reserve(qcfg.name.size() + 1 + d->envelope.event_id.size());
    key.append(qcfg.name).push_back('\0');
    key.append(d->envelope.event_id);
    auto [it, fresh] = running_ids_.try_emplace(std::move(key), d);
    if (!fresh) {
      it->second->twins.push_back(d);
      return;
    }
    d->running_key = it->first;
    if (store->asynchronous()) {
      claim(d);
      return;
    }
  }
  schedule(d);
}

// Journals the delivery; true when it is a redelivery of an event the daemon
// died on crash_max times (detail_ says so). Checked before the body is
// parsed: the parser may be what dies.
bool Consumer::crash_looped(Delivery* d, const config::QueueConfig& q) {
  const uint64_t key = guard_->key(q.name, amqp::view(d->env.message.body));
  d->view_.crash_slot = guard_->enter(key);
  if (!d->env.redelivered || guard_->empty()) return false;
  const CrashGuard::Entry* e = guard_->find(key);
  if (!e || e->crashes < q.crash_max) return false;
  const char* sig = e->signal == SIGSEGV ? "SIGSEGV" : e->signal == SIGABRT ? "SIGABRT" : e->signal == SIGBUS ? "SIGBUS"
                    : e->signal == SIGFPE ? "SIGFPE" : e->signal == SIGILL ? "SIGILL" : nullptr;
  detail_ = "the daemon ended uncleanly " + (e->crashes == 1 ? std::string("once") : std::to_string(e->crashes) + " times") +
            " while handling this event (" +
            (sig ? std::string("last: ") + sig + " in its handler" : std::string("last: killed, no signal of its own")) +
            "); crash_loop max_crashes is " + std::to_string(q.crash_max);
  log::warn("dead-lettering an event the daemon keeps dying on (crash_loop)",
            {{"queue", q.name}, {"event_id", e->event_id}, {"crashes", std::to_string(e->crashes)},
             {"max_crashes", std::to_string(q.crash_max)}});
  return true;
}

void Consumer::claim(Delivery* d) {
  std::weak_ptr<bool> alive = alive_;
  d->g->dedupe->check(d->view_.queue, d->envelope.event_id, [this, d, alive](dedupe::Check c) {
    if (!alive.expired()) claimed(d, c);
  });
}

// The shared store's answer (docs/reliability.md#shared-dedupe-store-postgresql).
void Consumer::claimed(Delivery* d, dedupe::Check c) {
  if (c == dedupe::Check::New) d->claimed = true;
  if (c == dedupe::Check::Unavailable &&
      d->g->cfg->dedupe_store.on_unavailable == config::DedupeUnavailable::Run) {
    log::warn("dedupe store unavailable; handling the event without dedupe (on_unavailable: run)",
              {{"queue", d->view_.queue}, {"event_id", d->envelope.event_id}});
    c = dedupe::Check::New;
  }
  if (!is_live(d) || state_ != State::Running) {
    finish_twins(d, RunEnd::NotRun);
    if (is_live(d)) link_.nack(d->channel, d->env.delivery_tag, /*requeue*/ true);
    release(d);
    return;
  }
  switch (c) {
    case dedupe::Check::New:
      schedule(d);
      return;
    case dedupe::Check::Seen:
      log::debug("duplicate skipped: this event_id already succeeded",
                 {{"queue", d->view_.queue}, {"event_type", d->envelope.event_type}, {"event_id", d->envelope.event_id}});
      d->g->m->queue(d->queue).duplicates->inc();
      finish_twins(d, RunEnd::Succeeded);
      ack(*d);
      return;
    case dedupe::Check::Busy:
      finish_twins(d, RunEnd::NotRun);
      hand_back_later(*d, "event in flight on another instance (dedupe claim); handing it back");
      return;
    case dedupe::Check::Unavailable:
      finish_twins(d, RunEnd::NotRun);
      hand_back_later(*d, "dedupe store unavailable; handing the event back");
      return;
  }
}

// ordering: aggregate: an event runs only when it is first in its aggregate's
// line; without an aggregate id it runs unordered.
void Consumer::schedule(Delivery* d) {
  if (d->slot->cfg->ordering == config::Ordering::Aggregate && !d->envelope.aggregate_id.empty()) {
    auto it = lines_.find(d->view_.queue);
    if (it == lines_.end()) it = lines_.try_emplace(std::string(d->view_.queue)).first;
    if (!it->second.join(*d, d->envelope.aggregate_id, steady_clock::now())) return;  // waits behind its aggregate
  }
  start_or_wait(d);
}

void Consumer::start_or_wait(Delivery* d) {
  if (d->slot->active < d->slot->limit) {
    start_job(d);
  } else {
    d->slot->waiting.push_back(d);
  }
}

void Consumer::start_job(Delivery* d) {
  ++d->slot->active;
  d->started = steady_clock::now();
  // Exec and worker handlers run in processes of their own: they cannot take the daemon down.
  if (d->view_.crash_slot >= 0 && d->slot->cfg->kind == config::HandlerKind::Plugin)
    guard_->set_active(d->view_.crash_slot, true);
  d->slot->handler->start(*d);
}

void Consumer::start_waiting(dispatch::HandlerSlot& slot) {
  while (slot.active < slot.limit && !slot.waiting.empty()) {
    auto* d = static_cast<Delivery*>(slot.waiting.front());
    slot.waiting.pop_front();
    if (!is_live(d) || state_ != State::Running) {
      give_back(d);
      continue;
    }
    start_job(d);
  }
}

void Consumer::on_finished(Delivery* d, dispatch::Outcome outcome) {
  // Settling may release the delivery, and with it the last reference to a
  // replaced generation: keep it (and the slot inside it) until we are done.
  std::shared_ptr<Generation> g = d->g;
  dispatch::HandlerSlot& slot = *d->slot;
  --slot.active;
  if (d->view_.crash_slot >= 0) guard_->set_active(d->view_.crash_slot, false);
  const std::string& handler = slot.handler->name();
  auto& sm = g->m->queue(d->queue).slots[static_cast<size_t>(&slot - g->rt->queues[d->queue].slots().data())];
  const auto elapsed = steady_clock::now() - d->started;
  sm.duration->observe(std::chrono::duration<double>(elapsed).count());
  const bool ok = outcome.verdict == dispatch::Verdict::Ack;
  (ok ? sm.ack : outcome.verdict == dispatch::Verdict::Retry ? sm.retry : sm.dead_letter)->inc();
  if (event_line(g->cfg->log, ok)) {
    auto ms = std::chrono::duration<double, std::milli>(elapsed).count();
    char dur[32];
    auto res = std::to_chars(dur, dur + sizeof dur, static_cast<long long>(ms + 0.5));
    log::write(!ok ? log::Level::Warn : g->cfg->log.events == config::EventLog::Debug ? log::Level::Debug : log::Level::Info,
               "handled",
               {{"queue", d->view_.queue},
                {"event_type", d->envelope.event_type},
                {"event_id", d->envelope.event_id},
                {"correlation_id", d->envelope.correlation_id},
                {"handler", handler},
                {"outcome", dispatch::verdict_name(outcome.verdict)},
                {"duration_ms", std::string_view(dur, static_cast<size_t>(res.ptr - dur))},
                {"detail", outcome.detail}});
  }
  // With emits, the success counts once they are confirmed (succeeded()).
  if (ok && outcome.emits.empty()) remember_success(d);
  // An ordered retry may wait in place: its copies keep waiting for it (see
  // settle_or_hold). A success with emits is one only once they are
  // confirmed: its copies wait for succeeded() (or go back with it).
  if ((outcome.verdict != dispatch::Verdict::Retry || !d->in_line()) && !(ok && !outcome.emits.empty()))
    finish_twins(d, ok ? RunEnd::Succeeded : RunEnd::Failed);
  if (!is_live(d)) {
    // Its channel is gone; the broker redelivers the event. A success is still
    // recorded above, so that with dedupe the redelivery does not run it again.
    log::debug("dropping a result from a closed channel", {{"event_id", d->envelope.event_id}});
    release(d);
  } else {
    settle_or_hold(d, outcome, handler, *slot.cfg);
  }
  start_waiting(slot);
}

// Whether this event gets its "handled" line (log.events at or above
// log.level): every failure (at warn), one success in log.sample.
bool Consumer::event_line(const config::LogConfig& lc, bool ok) {
  if (lc.events == config::EventLog::Off) return false;
  if (!log::enabled(lc.events == config::EventLog::Debug ? log::Level::Debug : log::Level::Info)) return false;
  return !ok || lc.sample <= 1 || successes_seen_++ % lc.sample == 0;
}

// The copies that waited for `d`: after a success they are duplicates; after
// a failure the first of them runs (the others wait for it in turn); if `d`
// never ran (handed back or dropped), they go back to the broker with it.
void Consumer::finish_twins(Delivery* d, RunEnd end) {
  if (!d->running_key.empty()) {
    auto it = running_ids_.find(d->running_key);
    if (it != running_ids_.end() && it->second == d) running_ids_.erase(it);
    d->running_key.clear();
  }
  if (d->twins.empty()) return;
  auto twins = std::move(d->twins);
  d->twins.clear();
  if (end == RunEnd::Succeeded) {
    for (auto* t : twins) {
      t->g->m->queue(t->queue).duplicates->inc();
      ack(*t);
    }
    return;
  }
  Delivery* next = twins.front();
  if (end == RunEnd::NotRun || state_ != State::Running || !is_live(next)) {
    for (auto* t : twins) give_back(t);
    return;
  }
  next->twins.assign(twins.begin() + 1, twins.end());
  auto [it, fresh] = running_ids_.try_emplace(d->g->cfg->queues[d->queue].name + '\0' + next->envelope.event_id, next);
  if (fresh) next->running_key = it->first;
  if (d->in_line() && next->slot->cfg->ordering == config::Ordering::Aggregate &&
      next->envelope.aggregate_id == *d->key) {
    // A copy of the same event takes its place in the line, ahead of the
    // later events of its aggregate.
    d->lines->join_behind(*next, *d, steady_clock::now());
    return;
  }
  schedule(next);
}

bool Consumer::is_live(const Delivery* d) const {
  return link_.live(d->connection, *d->qc, d->incarnation, d->channel);
}

void Consumer::ack(settle::Settling& s) {
  auto* d = static_cast<Delivery*>(&s);
  if (is_live(d)) link_.ack(d->channel, d->env.delivery_tag);
  release(d);
}

// The original stays unacked, so the broker still owns it; give it back after
// a pause so that a copy the broker keeps refusing (a full DLQ with
// reject-publish, say) does not become a hot redelivery loop.
void Consumer::hand_back_later(settle::Settling& s, const char* why) {
  auto* d = static_cast<Delivery*>(&s);
  log::error(why, {{"queue", d->qc->name}, {"event_id", d->envelope.event_id},
                   {"retry_in_ms", std::to_string(milliseconds(kHandBackPause).count())}});
  auto timer = std::make_shared<asio::steady_timer>(io_, kHandBackPause);
  std::weak_ptr<bool> alive = alive_;
  timer->async_wait([this, d, timer, alive](boost::system::error_code) {
    if (!alive.expired()) give_back(d);
  });
}

void Consumer::drop(settle::Settling& s) { release(static_cast<Delivery*>(&s)); }

bool Consumer::live(const settle::Settling& s) const { return is_live(static_cast<const Delivery*>(&s)); }

void Consumer::publish(settle::Settling& s) {
  auto* d = static_cast<Delivery*>(&s);
  d->published = steady_clock::now();
  std::weak_ptr<bool> alive = alive_;
  link_.publish(d->copy_target, d->copy->get(), d->env.message.body, [this, d, alive](settle::CopyResult r) {
    if (alive.expired()) return;
    auto& m = *current_->m;
    m.confirm_latency->observe(std::chrono::duration<double>(steady_clock::now() - d->published).count());
    (r == settle::CopyResult::Confirmed  ? m.confirms_ack
     : r == settle::CopyResult::Returned ? m.confirms_returned
                                         : m.confirms_nack)
        ->inc();
    settler_.copy_result(*d, r);
  });
}

void Consumer::publish_emit(settle::Settling& s, size_t index) {
  auto* d = static_cast<Delivery*>(&s);
  const settle::EmittedEvent& e = d->emits->events[index];
  std::weak_ptr<bool> alive = alive_;
  link_.publish_to(std::string(d->emit_exchange), e.routing_key, &d->emits->props[index], amqp::bytes(e.body),
                   [this, d, index, alive](settle::CopyResult r) {
                     if (!alive.expired()) settler_.emit_result(*d, index, r);
                   });
}

void Consumer::succeeded(settle::Settling& s) {
  auto* d = static_cast<Delivery*>(&s);
  remember_success(d);
  finish_twins(d, RunEnd::Succeeded);
}

void Consumer::queue_channel_lost(QueueChannel& qc) {
  wake_held([&](const Delivery* d) { return d->qc.get() == &qc; });
  drop_waiting(qc);
  close_if_drained(qc);
}

void Consumer::link_down() {
  wake_held([](const Delivery*) { return true; });  // the broker has them back
  for_each_generation([&](Generation& g) {
    for (auto& qc : g.channels) drop_waiting(*qc);
  });
  auto retired = retired_;  // drop_waiting may close and erase some
  for (auto& qc : retired) drop_waiting(*qc);
  if (state_ == State::Draining) {
    // Nothing can be acked any more; what is unacked is redelivered.
    link_.close();
    maybe_finish_stop();
  }
}

void Consumer::hand_back_lines() {
  wake_held([](const Delivery*) { return true; });
  drop_waiting_in_lines(nullptr);
}

void Consumer::link_failed(const std::string& why) {
  // A topology the broker refuses will not fix itself by retrying.
  log::error(why);
  exit_code_ = 1;
  state_ = State::Draining;
  // Held retries' timers would keep io.run() going for up to ordering_hold_max.
  hand_back_lines();
  finish_stop();
}

// Events of this queue channel still waiting for a handler slot, in every
// generation that is alive: they have not started; hand them back.
void Consumer::drop_waiting(const QueueChannel& qc) {
  // First: a line's first handed back below would otherwise start the events
  // of this channel waiting behind it.
  drop_waiting_in_lines(&qc);
  for_each_generation([&](Generation& g) {
    for (size_t i = 0; i < g.channels.size(); ++i) {
      for (auto& slot : g.rt->queues[i].slots()) {
        if (slot.waiting.empty()) continue;
        // Take them out first: releasing one may queue another (a twin).
        std::deque<dispatch::Job*> keep;
        std::vector<Delivery*> drop;
        for (auto* j : slot.waiting) {
          auto* d = static_cast<Delivery*>(j);
          (d->qc.get() == &qc ? drop.push_back(d) : keep.push_back(j));
        }
        slot.waiting = std::move(keep);
        for (auto* d : drop) give_back(d);
      }
    }
  });
}

// Whether a delivery that is not run goes back by staying unacked: a single
// active consumer being let go of would get a nacked one straight back.
bool Consumer::parking(const QueueChannel& qc) const {
  return state_ != State::Running && qc.single_active && qc.consuming;
}

// An event that did not start, or failed while stopping, goes back to the
// broker: a nack, or (parking) at the close of its channel, which requeues
// every unacked delivery in its place just before the next instance takes over.
void Consumer::give_back(Delivery* d) {
  if (is_live(d) && !parking(*d->qc)) link_.nack(d->channel, d->env.delivery_tag, /*requeue*/ true);
  release(d);
}

// Stopping: a single-active-consumer queue is let go of (its channel closed)
// once its last running event is settled, acks and copies confirmed.
void Consumer::let_go_if_settled(QueueChannel& qc) {
  if (state_ != State::Draining || !qc.single_active || qc.in_flight != 0 || qc.channel == 0 || qc.letting_go)
    return;
  std::shared_ptr<QueueChannel> keep;
  for (auto& c : current_->channels)
    if (c.get() == &qc) keep = c;
  if (!keep) return;
  keep->letting_go = true;
  // The close below, or the connection's when this was the last event in flight.
  log::info("letting go of a single-active-consumer queue, its events settled", {{"queue", keep->name}});
  std::weak_ptr<bool> alive = alive_;
  asio::post(io_, [this, keep, alive] {
    if (!alive.expired() && keep->channel != 0) link_.close_queue(*keep);
  });
}

// A retired consumer closes its channel once its last delivery is settled
// (what it still had prefetched goes back to the queue).
void Consumer::close_if_drained(QueueChannel& qc) {
  if (!qc.retired || qc.in_flight != 0) return;
  auto it = std::find_if(retired_.begin(), retired_.end(), [&](const auto& p) { return p.get() == &qc; });
  if (it == retired_.end()) return;
  std::shared_ptr<QueueChannel> keep = *it;
  retired_.erase(it);
  // Not from inside a settlement that the link may be in the middle of.
  std::weak_ptr<bool> alive = alive_;
  asio::post(io_, [this, keep, alive] {
    if (alive.expired() || keep->channel == 0) return;
    link_.close_queue(*keep);
    bool removed = std::none_of(current_->channels.begin(), current_->channels.end(),
                                [&](const auto& c) { return c->name == keep->name; });
    log::info(removed ? "stopped consuming a queue removed from the config" : "stopped a replaced consumer",
              {{"queue", keep->name}, {"prefetch", std::to_string(keep->prefetch)}});
  });
}

void Consumer::switch_to(std::unique_ptr<dispatch::Runtime> runtime, Extras extras) {
  const config::Config& prev = *current_->cfg;
  auto g = make_generation(std::move(runtime), std::move(extras));
  if (prev.broker.urls != g->cfg->broker.urls) log::warn("broker URLs changed; they apply at the next reconnect");
  // Consumers the new generation does not keep drain and close.
  for (auto& qc : current_->channels) {
    if (std::find(g->channels.begin(), g->channels.end(), qc) != g->channels.end()) continue;
    qc->retired = true;
    qc->recover_timer.cancel();
    link_.cancel_consumer(*qc);
    retired_.push_back(qc);
    // What it had prefetched and not started goes back to the queue now, for
    // the new consumer: not after the old handlers worked through it.
    drop_waiting(*qc);
  }
  for (size_t i = 0; i < g->channels.size(); ++i) g->channels[i]->index = i;
  const bool had_store = current_->dedupe != nullptr;
  current_ = std::move(g);
  link_.set_config(current_->rt->config);
  if (current_->dedupe && !had_store && state_ == State::Running) arm_dedupe_flush();
  if (state_ == State::Running && link_.connected()) {
    for (auto& qc : current_->channels)
      if (qc->channel == 0 && !qc->recovering) link_.open_queue(qc);  // new, or a new prefetch: a new consumer
  }
  auto retired = retired_;
  for (auto& qc : retired) close_if_drained(*qc);
  // Last: a failure here drops the connection.
  for (size_t i = 0; i < current_->channels.size(); ++i) {
    auto& qc = *current_->channels[i];
    const uint16_t want = current_->cfg->queues[i].prefetch;
    if (qc.prefetch == want) continue;
    if (!qc.channel_wide)
      log::warn("single-active-consumer queue: the new prefetch applies when its consumer next starts "
                "(a quorum queue's consumer prefetch cannot change in place)",
                {{"queue", qc.name}, {"prefetch", std::to_string(want)}});
    link_.set_prefetch(qc, want);
  }
  log::info("reloaded", {{"queues", std::to_string(current_->cfg->queues.size())}});
}

void Consumer::stop() {
  if (state_ == State::Draining || state_ == State::Stopped) return;
  log::info("stopping", {{"in_flight", std::to_string(in_flight_)},
                         {"shutdown_timeout_ms", std::to_string(config().shutdown_timeout.count())}});
  state_ = State::Draining;
  for (auto& qc : current_->channels) {
    qc->recover_timer.cancel();
    // A single active consumer stays until its events are settled: cancelled
    // now, the next instance would get the later events of an aggregate
    // whose earlier ones still run here (let_go_if_settled).
    if (!qc->single_active) link_.cancel_consumer(*qc);
  }
  // Held retries and events waiting behind their aggregate go back with the
  // rest, to their positions in the queue: the aggregate stays in order.
  hand_back_lines();
  // Events waiting for a handler slot have not started: hand them back.
  for_each_generation([&](Generation& g) {
    for (auto& qc : g.channels) drop_waiting(*qc);
  });
  auto retired = retired_;
  for (auto& qc : retired) {
    qc->recover_timer.cancel();
    drop_waiting(*qc);
  }
  link_.stop_recovering();  // a channel lost during the drain is not consumed again
  for (auto& qc : current_->channels) let_go_if_settled(*qc);
  deadline_timer_.expires_after(config().shutdown_timeout);
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
  if (!link_.connected()) link_.close();  // no reconnecting while draining
  maybe_finish_stop();
}

void Consumer::maybe_finish_stop() {
  if (state_ == State::Draining && in_flight_ == 0) finish_stop();
}

void Consumer::finish_stop() {
  if (state_ == State::Stopped) return;
  state_ = State::Stopped;
  dedupe_timer_.cancel();
  if (auto store = current_->dedupe) {
    try {
      store->close();
    } catch (const std::exception& e) {
      log::error("dedupe store", {{"error", e.what()}});
    }
  }
  deadline_timer_.cancel();
  for (auto& qc : current_->channels) qc->recover_timer.cancel();
  // Worker processes get end of input now that nothing is in flight (or it was abandoned).
  for_each_generation([](Generation& g) {
    for (auto& q : g.rt->queues)
      for (auto& slot : q.slots()) slot.handler->stop();
  });
  link_.close();
  log::info("stopped", {{"unsettled", std::to_string(in_flight_)}});
  if (on_stopped_) asio::post(io_, std::move(on_stopped_));
}

// ---- ordering: aggregate (docs/ordering.md) ----

void Consumer::settle_or_hold(Delivery* d, const dispatch::Outcome& outcome, std::string_view handler,
                              const config::HandlerConfig& h) {
  if (!d->in_line() || outcome.verdict != dispatch::Verdict::Retry) {
    settler_.settle(*d, outcome, handler, h.retry, h.emit_style);
    return;
  }
  if (state_ != State::Running) {
    // Stopping: back to its place in the queue, ahead of the later events of
    // its aggregate (handed back too), rather than into a delay queue.
    log::info("handing back a failed ordered event: shutting down",
              {{"queue", d->view_.queue}, {"event_id", d->envelope.event_id}, {"attempt", std::to_string(d->attempt)}});
    give_back(d);
    return;
  }
  const auto age = std::chrono::duration_cast<milliseconds>(steady_clock::now() - d->joined);
  if (auto wait = settler_.hold_or_settle(*d, outcome, handler, h.retry, age, d->queue_cfg->ordering_hold_max)) {
    hold(d, *wait);  // copies of it (dedupe) keep waiting for its outcome
    return;
  }
  // Dead-lettered: the next copy runs, behind it. (Not when the copy could
  // not go out and `d` went back to the pool already: it left its line.)
  if (d->in_line()) finish_twins(d, RunEnd::Failed);
}

// The delivery stays unacked and first in its line, so no later event of its
// aggregate overtakes it; it holds its generation (d->g) meanwhile.
void Consumer::hold(Delivery* d, config::Duration wait) {
  d->held = true;
  ++d->lines->held;
  held_.push_back(d);
  if (!d->hold_timer) d->hold_timer.emplace(io_);
  d->hold_timer->expires_after(wait);
  std::weak_ptr<bool> alive = alive_;
  // Also runs when wake_held() cancels the wait: the checks below decide.
  d->hold_timer->async_wait([this, d, alive](boost::system::error_code) {
    if (alive.expired()) return;
    end_hold(d);
    if (!is_live(d) || state_ != State::Running) {
      give_back(d);
      return;
    }
    // The number a retry copy's x-attempt would have carried.
    ++d->attempt;
    d->view_.attempt = d->attempt;
    start_or_wait(d);
  });
}

void Consumer::end_hold(Delivery* d) {
  if (!d->held) return;
  d->held = false;
  --d->lines->held;
  held_.erase(std::find(held_.begin(), held_.end(), d));
}

// Ends the waits of held events now (their channel is gone, or we stop):
// the handler of each then hands it back or lets it go.
template <class Pred>
void Consumer::wake_held(Pred&& pred) {
  for (auto* d : held_)
    if (pred(static_cast<const Delivery*>(d))) d->hold_timer->cancel();
}

// `d` is done and leaves its line; the next event of its aggregate starts
// from the loop, not inside this settlement (a line of inline plugin runs
// would otherwise recurse once per event).
void Consumer::leave_line(Delivery* d) {
  auto* next = static_cast<Delivery*>(d->lines->leave(*d));
  if (!next) return;
  std::weak_ptr<bool> alive = alive_;
  asio::post(io_, [this, next, alive] {
    if (alive.expired()) return;
    if (is_live(next) && state_ == State::Running) {
      start_or_wait(next);
      return;
    }
    // Its channel is gone, or we are stopping: the broker gets it back, and
    // its line moves on (release() posts the next).
    give_back(next);
  });
}

// Events behind the first of their line, of channel `qc` (all when null):
// they have not started; hand them back.
void Consumer::drop_waiting_in_lines(const QueueChannel* qc) {
  for (auto& [queue, lines] : lines_) {
    auto out = lines.take_waiting(
        [qc](const InLine& e) { return !qc || static_cast<const Delivery&>(e).qc.get() == qc; });
    for (auto* e : out) give_back(static_cast<Delivery*>(e));
  }
}

Delivery* Consumer::acquire() {
  if (pool_.empty()) {
    auto d = std::make_unique<Delivery>();
    d->consumer = this;
    return d.release();
  }
  Delivery* d = pool_.back().release();
  pool_.pop_back();
  return d;
}

void Consumer::release(Delivery* d) {
  // Copies waiting for this one must not be stranded with it.
  if (!d->twins.empty() || !d->running_key.empty()) finish_twins(d, RunEnd::NotRun);
  if (d->claimed) {
    // Failed, retried, handed back: another instance may take it at once.
    d->claimed = false;
    d->g->dedupe->release(d->view_.queue, d->envelope.event_id);
  }
  if (d->in_line()) leave_line(d);
  if (d->view_.crash_slot >= 0) guard_->leave(d->view_.crash_slot);
  d->view_.crash_slot = -1;
  if (d->has_env) amqp_destroy_envelope(&d->env);
  d->has_env = false;
  d->slot = nullptr;
  d->copy.reset();
  d->info.reset();
  d->emits.reset();
  std::shared_ptr<QueueChannel> qc = std::move(d->qc);
  d->qc.reset();
  d->g.reset();  // the last event of an old generation unloads its handlers
  --in_flight_;
  --qc->in_flight;
  pool_.emplace_back(d);
  close_if_drained(*qc);
  let_go_if_settled(*qc);
  maybe_finish_stop();
}

}  // namespace er::consume
