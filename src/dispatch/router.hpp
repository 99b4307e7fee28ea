#pragma once
// The runtime built from a Config: loaded handlers and the routing table per
// queue. build_runtime() is the one function used by startup and --check (and
// later by reload), so what --check accepts is exactly what runs.
#include <deque>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include "config/config.hpp"
#include "dispatch/handler.hpp"
#include "event/schema.hpp"

namespace er::dispatch {

struct HandlerSlot {
  std::unique_ptr<Handler> handler;
  const config::HandlerConfig* cfg = nullptr;
  unsigned limit = 1;          // min(configured concurrency, handler's own bound)
  unsigned active = 0;
  std::deque<Job*> waiting;    // over the limit; bounded by the queue's prefetch
};

class QueueRouter {
 public:
  explicit QueueRouter(const config::QueueConfig& q) : cfg_(&q) {}
  QueueRouter(QueueRouter&&) = default;

  // The first handler whose `events` matches, or nullptr (unhandled).
  HandlerSlot* route(std::string_view event_type);

  const config::QueueConfig& cfg() const { return *cfg_; }
  std::vector<HandlerSlot>& slots() { return slots_; }

 private:
  const config::QueueConfig* cfg_;
  std::vector<HandlerSlot> slots_;
  // Event types are few; matching once per type keeps patterns off the hot path.
  std::map<std::string, int, std::less<>> cache_;
};

struct Runtime {
  std::shared_ptr<const config::Config> config;
  std::vector<QueueRouter> queues;  // same order as config->queues
  std::shared_ptr<const event::SchemaSet> schemas;  // null = no validation

  // The handler named `handler` of queue `queue`, or nullptr. Reads only what
  // never changes after the build (safe from the reload thread).
  const Handler* find_handler(std::string_view queue, std::string_view handler) const;
};

// Loads every handler (plugins are dlopened and initialised, worker processes
// started and handshaken). Throws std::runtime_error naming the handler on
// failure. `previous` (a reload: the running runtime, kept alive by the
// caller) lends worker handlers whose processes can be kept. Nothing here
// touches `io`: handlers start using it in Handler::activate(), on the loop.
std::unique_ptr<Runtime> build_runtime(std::shared_ptr<const config::Config> cfg,
                                       boost::asio::io_context& io, boost::asio::thread_pool& pool,
                                       const Runtime* previous = nullptr);

// Human-readable topology and routing plan, for --check.
void print_plan(const Runtime& rt, std::ostream& out);

// Problems that are not errors, e.g. a handler timeout that the broker's
// consumer acknowledgement timeout would cut short.
std::vector<std::string> plan_warnings(const config::Config& cfg);

}  // namespace er::dispatch
