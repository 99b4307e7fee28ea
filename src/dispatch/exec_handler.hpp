#pragma once
#include <cstddef>
#include <string_view>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "config/config.hpp"
#include "dispatch/handler.hpp"
#include "dispatch/process.hpp"  // OrphanReaper, reap_orphans

namespace er::dispatch {

// Runs argv per event (posix_spawn, no shell), body on stdin, a fixed
// environment; stdout/stderr logged line by line (capped); exit code mapped
// by outcome_for_exit. Children are reaped; no daemon fd leaks into them.
// Each child runs in its own process group; when it exits (or is killed
// after its timeout), whatever is still running in that group is SIGKILLed.
std::unique_ptr<Handler> make_exec_handler(const config::HandlerConfig& cfg,
                                           boost::asio::io_context& io);

// 0 -> ack; 75 (EX_TEMPFAIL) -> retry; 65 (EX_DATAERR) -> dead-letter;
// other codes, signals and timeouts -> retry. `wait_status` as from waitpid.
// `stderr_tail` (last lines) goes into the detail.
Outcome outcome_for_exit(int wait_status, bool timed_out, std::string_view stderr_tail);

}  // namespace er::dispatch
