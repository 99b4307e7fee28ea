#pragma once
// The handler interface: every kind (plugin, exec, worker) ends an
// event with exactly one Outcome, delivered through Job::finish() on the
// event loop thread. Nothing on this path throws.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "event/envelope.hpp"

namespace er::metrics {
class Registry;
}

namespace er::dispatch {

enum class Verdict { Ack, Retry, DeadLetter };

const char* verdict_name(Verdict v);  // "ack", "retry", "dead-letter"

struct Outcome {
  Verdict verdict = Verdict::Ack;
  std::string reason;   // stable code for x-death-reason, e.g. "handler_failed"
  std::string detail;   // human message: exit code and stderr tail, plugin's reason...
  std::chrono::milliseconds retry_delay{0};  // plugin's requested minimum delay
  // Ack only: follow-up events to publish before the ack, each one JSON
  // object as the handler gave it ({"event_type", "payload", ...}; see
  // docs/worker-protocol.md, "Emit"). The consumer fills in the envelope.
  std::vector<std::string> emits;

  static Outcome ack() { return {}; }
  static Outcome retry(std::string reason, std::string detail, std::chrono::milliseconds delay = {}) {
    return {Verdict::Retry, std::move(reason), std::move(detail), delay, {}};
  }
  static Outcome dead_letter(std::string reason, std::string detail) {
    return {Verdict::DeadLetter, std::move(reason), std::move(detail), {}, {}};
  }
};

// A read-only view of one event; valid until Job::finish() is called.
struct EventView {
  std::string_view body;
  std::string_view routing_key;
  std::string_view exchange;
  std::string_view queue;
  const event::Envelope* envelope = nullptr;
  uint32_t attempt = 1;
  bool redelivered = false;
  int32_t crash_slot = -1;  // its crash-guard journal slot (consume/crash_guard.hpp), -1: none
};

// One in-flight event, owned by the consumer.
class Job {
 public:
  virtual ~Job() = default;
  virtual const EventView& view() const = 0;
  // Exactly once per start(), on the event loop thread.
  virtual void finish(Outcome outcome) = 0;
  // True once the event's channel is gone (the broker will redeliver it).
  // Safe from any thread. A handler that has not begun the work may skip it;
  // it must still call finish() (the outcome is then not settled).
  virtual bool stale() const { return false; }
};

class Handler {
 public:
  explicit Handler(std::string name) : name_(std::move(name)) {}
  virtual ~Handler() = default;
  Handler(const Handler&) = delete;
  Handler& operator=(const Handler&) = delete;

  const std::string& name() const { return name_; }

  // Begin handling. May call job.finish() before returning (inline plugins).
  // Called on the event loop thread; never blocks it.
  virtual void start(Job& job) = 0;

  // Upper bound the handler itself imposes (e.g. a plugin that is not
  // re-entrant says 1). The dispatcher uses min(this, configured concurrency).
  virtual unsigned max_concurrency() const { return ~0u; }

  // The shutdown deadline passed: stop in-flight work now (kill children).
  // finish() is not called for the aborted jobs; their events stay unacked.
  virtual void abort_all() {}

  // Long-lived handlers (workers) only; all on the event loop thread.
  // A generation that uses the handler was made: register metrics, start
  // watching processes. May be called again for the next generation.
  virtual void activate(metrics::Registry&) {}
  // The daemon stops: no more events; let processes end (bounded).
  virtual void stop() {}
  // False, with `reason`, while the handler cannot take events as configured.
  virtual bool ready(std::string& /*reason*/) const { return true; }

 private:
  std::string name_;
};

}  // namespace er::dispatch
