#include "settle/settler.hpp"

#include <ctime>

#include "amqp/topology.hpp"
#include "util/log.hpp"

namespace er::settle {

std::vector<RetryStep> retry_steps(const config::QueueConfig& q) {
  std::vector<RetryStep> out;
  for (auto d : q.retry_steps()) out.push_back({d, amqp::retry_queue_name(q.name, d)});
  return out;
}

const RetryStep* choose_step(const std::vector<RetryStep>& steps, config::Duration want) {
  if (steps.empty()) return nullptr;
  for (const auto& s : steps)
    if (s.delay >= want) return &s;
  return &steps.back();
}

Settler::Settler(Outbox& out, metrics::Registry& r)
    : out_(out),
      retries_(&r.counter("event_router_retries_total", "Events republished to a delay queue for another attempt.",
                          {"queue", "reason"})),
      dead_letters_(&r.counter("event_router_dead_letters_total", "Events moved to a dead-letter queue, by reason.",
                               {"queue", "reason"})),
      retries_in_place_(&r.counter("event_router_retries_in_place_total",
                                   "Ordered events held unacked for another attempt (ordering: aggregate).",
                                   {"queue", "reason"})),
      emitted_(&r.counter("event_router_emitted_events_total",
                          "Events handlers emitted, by outcome: confirmed, returned (unroutable), refused, lost, "
                          "invalid (never published).",
                          {"queue", "outcome"})) {}

void Settler::settle(Settling& s, const dispatch::Outcome& outcome, std::string_view handler,
                     const config::RetryConfig& policy, config::EmitStyle style) {
  if (!outcome.emits.empty() && outcome.verdict != dispatch::Verdict::Ack) {
    log::warn("ignoring emitted events: they go out only with an ack",
              {{"queue", s.queue_cfg->name}, {"event_id", s.event_id}, {"handler", handler},
               {"verdict", dispatch::verdict_name(outcome.verdict)}, {"emits", std::to_string(outcome.emits.size())}});
  }
  switch (outcome.verdict) {
    case dispatch::Verdict::Ack:
      if (outcome.emits.empty()) {
        ack(s);
      } else {
        emit(s, outcome, handler, style);
      }
      break;
    case dispatch::Verdict::Retry:
      retry(s, outcome, handler, policy);
      break;
    case dispatch::Verdict::DeadLetter:
      dead_letter(s, outcome.reason.empty() ? "handler_failed" : outcome.reason, outcome.detail, handler);
      break;
  }
}

void Settler::ack(Settling& s) {
  ++stats_.acked;
  out_.ack(s);
}

void Settler::dead_letter(Settling& s, std::string_view reason, std::string_view detail, std::string_view handler) {
  const auto& q = *s.queue_cfg;
  DeadLetterInfo info;
  info.reason = reason;
  info.detail = detail;
  info.handler = handler;
  info.queue = q.name;
  info.exchange = s.exchange;
  info.routing_key = s.routing_key;
  info.attempts = s.attempt;
  ++stats_.dead_lettered;
  dead_letters_->with({q.name, std::string(reason)}).inc();
  log::warn("dead-lettering", {{"queue", q.name}, {"event_type", s.event_type}, {"event_id", s.event_id},
                               {"handler", handler}, {"reason", reason}, {"detail", detail},
                               {"dlq", q.dead_letter_queue}});
  s.copy_target = q.dead_letter_queue;
  s.next_attempt = 0;
  make_copy(s, info);
  send(s);
}

void Settler::retry(Settling& s, const dispatch::Outcome& outcome, std::string_view handler,
                    const config::RetryConfig& policy) {
  const auto& q = *s.queue_cfg;
  const std::string reason = outcome.reason.empty() ? "handler_failed" : outcome.reason;
  const uint32_t attempt = s.attempt;
  // The policy's wait, or the handler's own request if that is longer; both
  // land on a declared step, so no queue is ever created on the hot path.
  const RetryStep* step = choose_step(*s.steps, std::max(policy.delay_before(attempt + 1), outcome.retry_delay));
  if (attempt >= policy.max_attempts || !step) {
    dead_letter(s, "max_attempts",
                "gave up after " + std::to_string(attempt) + " attempt" + (attempt == 1 ? "" : "s") +
                    "; last error: " + reason + (outcome.detail.empty() ? "" : ": " + outcome.detail),
                handler);
    return;
  }
  // A little jitter (up to 10%, at most 1 s) spreads a burst of failures.
  long long base = step->delay.count();
  std::uniform_int_distribution<long long> jitter(0, std::min(base / 10, 1000LL));
  uint64_t expiration = static_cast<uint64_t>(base + jitter(rng_));

  DeadLetterInfo info;
  info.reason = reason;
  info.detail = outcome.detail;
  info.handler = handler;
  info.queue = q.name;
  info.exchange = s.exchange;
  info.routing_key = s.routing_key;
  info.attempts = attempt;
  ++stats_.retried;
  retries_->with({q.name, reason}).inc();
  log::warn("retrying later", {{"queue", q.name}, {"event_type", s.event_type}, {"event_id", s.event_id},
                               {"handler", handler}, {"attempt", std::to_string(attempt)},
                               {"next_attempt_in_ms", std::to_string(expiration)}, {"detail", outcome.detail}});
  s.copy_target = step->queue;
  s.next_attempt = attempt + 1;
  s.expiration_ms = expiration;
  make_copy(s, info);
  send(s);
}

std::optional<config::Duration> Settler::hold_or_settle(Settling& s, const dispatch::Outcome& outcome,
                                                        std::string_view handler, const config::RetryConfig& policy,
                                                        config::Duration age, config::Duration hold_max) {
  const uint32_t attempt = s.attempt;
  if (attempt >= policy.max_attempts) {
    retry(s, outcome, handler, policy);  // dead-letters it as max_attempts
    return std::nullopt;
  }
  const config::Duration wait = std::max(policy.delay_before(attempt + 1), outcome.retry_delay);
  const std::string reason = outcome.reason.empty() ? "handler_failed" : outcome.reason;
  if (age + wait > hold_max) {
    dead_letter(s, "ordering_hold_exceeded",
                "attempt " + std::to_string(attempt + 1) + " in " + std::to_string(wait.count()) +
                    " ms would hold the delivery past ordering_hold_max (" + std::to_string(hold_max.count()) +
                    " ms; held " + std::to_string(age.count()) + " ms); last error: " + reason +
                    (outcome.detail.empty() ? "" : ": " + outcome.detail),
                handler);
    return std::nullopt;
  }
  retries_in_place_->with({s.queue_cfg->name, reason}).inc();
  log::warn("retrying in place", {{"queue", s.queue_cfg->name}, {"event_type", s.event_type},
                                  {"event_id", s.event_id}, {"handler", handler},
                                  {"attempt", std::to_string(attempt)},
                                  {"next_attempt_in_ms", std::to_string(wait.count())}, {"detail", outcome.detail}});
  return wait;
}

void Settler::make_copy(Settling& s, const DeadLetterInfo& info) {
  s.copy = s.next_attempt == 0
               ? std::make_unique<CopyProperties>(*s.properties, amqp::view(s.body), info, *s.signer, s.frame_max)
               : std::make_unique<CopyProperties>(*s.properties, amqp::view(s.body), info, s.next_attempt,
                                                  s.expiration_ms, *s.signer, s.frame_max);
  // Kept for a plainer copy if the broker refuses this one; the views point
  // into the settling (queue config, routing) or into info_text.
  std::string text;  // `info` may point into the old text
  text.reserve(info.reason.size() + 1 + info.detail.size());
  text.append(info.reason).push_back('\0');
  text.append(info.detail);
  s.info = std::make_unique<DeadLetterInfo>(info);
  s.info_text = std::move(text);
  std::string_view t = s.info_text;
  s.info->reason = t.substr(0, info.reason.size());
  s.info->detail = t.substr(info.reason.size() + 1);
}

void Settler::send(Settling& s) {
  if (!out_.live(s)) {
    out_.drop(s);
    return;
  }
  // rabbitmq-c writes the method frame before it encodes the header frame:
  // a copy that does not encode must never reach the wire. (CopyProperties
  // falls back to fewer headers until it fits any frame_max a broker allows.)
  if (!s.copy->fitted()) {
    out_.hand_back_later(s, "the copy does not fit in a frame; the event goes back to its queue");
    return;
  }
  out_.publish(s);
}

void Settler::copy_result(Settling& s, CopyResult result) {
  if (result == CopyResult::Lost || !out_.live(s)) {
    out_.drop(s);
    return;
  }
  switch (result) {
    case CopyResult::Confirmed:
      out_.ack(s);
      break;
    case CopyResult::Returned:
      out_.hand_back_later(s, "the copy could not be routed; the event goes back to its queue");
      break;
    default:
      if (s.info && !s.info->plain) {
        // What the broker refuses in a copy comes from the original (a
        // property or header it acts on): a plain copy has none of it, so the
        // same event does not come back into the same refusal.
        log::warn("the broker refused a copy; publishing it without the original's headers and properties",
                  {{"queue", s.queue_cfg->name}, {"event_id", s.event_id}, {"target", s.copy_target}});
        s.info->plain = true;
        DeadLetterInfo info = *s.info;
        make_copy(s, info);
        send(s);
        return;
      }
      out_.hand_back_later(s, "the broker refused the copy; the event goes back to its queue");
      break;
  }
}

void Settler::emit(Settling& s, const dispatch::Outcome& outcome, std::string_view handler,
                   config::EmitStyle style) {
  const auto& q = *s.queue_cfg;
  auto batch = std::make_unique<EmitBatch>();
  EmitTrigger trigger{s.event_id, s.correlation_id, amqp::view(s.body), handler};
  EmitOptions opts;
  opts.style = style;
  opts.schemas = s.schemas;
  opts.max_event_bytes = q.max_message_bytes;
  std::string error;
  if (!build_emits(outcome.emits, trigger, opts, batch->events, error)) {
    // Nothing is published: a follow-up that is not what consumers accept
    // is the handler's bug, and the triggering event keeps it visible.
    emitted_->with({q.name, "invalid"}).inc(outcome.emits.size());
    dead_letter(s, "emit_invalid", error, handler);
    return;
  }
  if (!out_.live(s)) {
    out_.drop(s);
    return;
  }
  const uint64_t now = static_cast<uint64_t>(std::time(nullptr));
  batch->props.reserve(batch->events.size());
  for (const auto& e : batch->events) batch->props.push_back(e.properties(now));
  batch->handler = handler;
  s.emits = std::move(batch);
  EmitBatch& b = *s.emits;
  // A result may come back at once (the connection is gone): the batch ends
  // only after the loop, so `s` stays valid through it.
  for (size_t i = 0; i < b.events.size() && !b.lost; ++i) {
    ++b.outstanding;
    out_.publish_emit(s, i);
  }
  b.all_sent = true;
  if (b.outstanding == 0) emits_done(s);
}

void Settler::emit_result(Settling& s, size_t index, CopyResult result) {
  EmitBatch& b = *s.emits;
  --b.outstanding;
  const char* name = "confirmed";
  switch (result) {
    case CopyResult::Confirmed: break;
    case CopyResult::Returned:
      name = "returned";
      if (b.returned == SIZE_MAX) b.returned = index;
      break;
    case CopyResult::Refused:
      name = "refused";
      b.refused = true;
      break;
    case CopyResult::Lost:
      name = "lost";
      b.lost = true;
      break;
  }
  emitted_->with({s.queue_cfg->name, name}).inc();
  if (b.outstanding == 0 && b.all_sent) emits_done(s);
}

// Every emitted event has its answer: the original is acked only when all
// were confirmed. Otherwise it comes back and is handled again, and emits
// the same ids (consumers that dedupe see each follow-up once).
void Settler::emits_done(Settling& s) {
  EmitBatch& b = *s.emits;
  if (b.lost || !out_.live(s)) {
    out_.drop(s);  // the broker redelivers it
    return;
  }
  if (b.returned != SIZE_MAX) {
    // A binding is missing: a config error that waiting does not fix.
    const EmittedEvent& e = b.events[b.returned];
    dead_letter(s, "emit_unroutable",
                "emit[" + std::to_string(b.returned) + "] (" + e.event_type + ", id " + e.event_id +
                    "): no queue is bound for routing key '" + e.routing_key + "' on exchange '" +
                    std::string(s.emit_exchange) + "'",
                b.handler);
    return;
  }
  if (b.refused) {
    out_.hand_back_later(s, "the broker refused an emitted event; the event goes back to its queue");
    return;
  }
  out_.succeeded(s);
  ack(s);
}

}  // namespace er::settle
