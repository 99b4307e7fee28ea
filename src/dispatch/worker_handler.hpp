#pragma once
// Worker handlers: long-running processes that take events as JSON lines on
// fd 3 and answer on fd 4 (docs/worker-protocol.md).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <boost/asio/io_context.hpp>

#include "config/config.hpp"
#include "dispatch/answer_rules.hpp"
#include "dispatch/handler.hpp"
#include "settle/emit.hpp"  // settle::kMaxEmits: one cap for every handler kind

namespace er::dispatch {

inline constexpr int kWorkerProtocol = 1;
inline constexpr size_t kMaxAnswerBytes = 16 * 1024 * 1024;     // one line from a worker
using answer::kMaxDetailBytes;
using answer::kMaxReasonBytes;

// One line from a worker, parsed.
struct WorkerAnswer {
  enum class Type { Ready, Result } type = Type::Result;
  int64_t protocol = 0;      // ready
  uint64_t id = 0;           // result
  Outcome outcome;           // result
  bool emit_ignored = false; // `emit` came with a verdict other than ack (ignored)
};

// Parses one line (without its '\n'). Returns false with `error` set when the
// line breaks the protocol (not JSON, not an object, unknown type or verdict,
// a field of the wrong type). A bad `emit` is not a protocol error: the
// answer becomes a dead letter with reason `emit_invalid` (the handler's code
// made it, and would make it again on every retry).
bool parse_worker_answer(std::string_view line, WorkerAnswer& out, std::string& error);

// Appends the event line for `v` (with its '\n'): metadata as JSON strings
// (invalid UTF-8 replaced), the body as it is but with raw CR/LF (JSON
// whitespace) turned into spaces.
void append_event_line(std::string& out, uint64_t id, const EventView& v);

// Starts cfg.processes processes and waits for each one's `ready` (blocking,
// up to start_timeout: called by build_runtime, off the loop for a reload).
// Throws std::runtime_error naming the handler (and both protocol versions
// on a mismatch). When `previous` is this handler in the runtime being
// replaced and nothing its processes depend on changed, its processes are
// taken over instead (nothing is started). Nothing touches `io` until
// activate() on the loop.
std::unique_ptr<Handler> make_worker_handler(const config::HandlerConfig& cfg, const config::QueueConfig& q,
                                             boost::asio::io_context& io, const Handler* previous);

}  // namespace er::dispatch
