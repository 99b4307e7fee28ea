#pragma once
// What the consumer needs from a dedupe store, whichever it is: the SQLite
// file of one instance (store.hpp, answers at once) or PostgreSQL shared by
// instances (pg_store.hpp, answers later, from the event loop). Loop thread
// only.
//
// Per event:  check(q, id) -> New: run the handler; on success record(), then
// ack; on failure (retry, dead letter, handed back) release().
//             -> Seen: ack without running it.  -> Busy: another instance
// runs it now (shared store only): hand it back for later.
//             -> Unavailable: the store cannot say; the consumer applies
// `on_unavailable` (retry: hand back; run: handle without dedupe).
// tick() every ~100 ms commits, prunes and enforces time bounds.
#include <chrono>
#include <functional>
#include <string>
#include <string_view>

namespace er::dedupe {

enum class Check { New, Seen, Busy, Unavailable };

class Backend {
 public:
  using Done = std::function<void(Check)>;
  virtual ~Backend() = default;
  // False: check() always calls `done` before it returns.
  virtual bool asynchronous() const = 0;
  // `ttl` is the queue's dedupe ttl (a claim's lease is the store's own).
  virtual void check(std::string_view queue, std::string_view event_id, Done done) = 0;
  virtual void record(std::string_view queue, std::string_view event_id, std::chrono::seconds ttl) = 0;
  virtual void release(std::string_view /*queue*/, std::string_view /*event_id*/) {}
  virtual void tick() = 0;
  // Before the loop ends: commit what can be committed, stop I/O.
  virtual void close() = 0;
  // For /readyz: false with a reason while the store cannot answer.
  virtual bool ready(std::string& /*reason*/) const { return true; }
};

}  // namespace er::dedupe
