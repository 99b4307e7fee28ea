#pragma once
// What the exec and worker handler kinds share: spawning a program (no
// shell, a fixed environment, its own process group, only the descriptors it
// is given), reaping it without racing the orphan reaper, signalling its
// group, and cutting its output into lines for the log.
#include <spawn.h>
#include <sys/types.h>

#include <chrono>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "config/config.hpp"
#include "dispatch/handler.hpp"

namespace er::dispatch {

namespace process {

std::string describe_signal(int sig);             // "signal 9 (SIGKILL)"
std::string format_duration(std::chrono::milliseconds d);  // "30s", "250ms"
std::string describe_status(int wait_status);     // "exit code 3", "killed by signal 9 (SIGKILL)"
void close_fd(int& fd);

// pipe2(O_CLOEXEC); both ends moved to >= min_fd so that the child-side dup2
// onto [0, min_fd) can never clobber another pipe end. Returns 0 or an errno.
int make_pipe(int p[2], int min_fd = 3);

// waitpid() of a spawned child, then forgets it (see reap_orphans).
pid_t reap_child(pid_t pid, int* status, int flags);

// SIGs the child's process group (or the child alone if it left it). Only
// while the child is unreaped: then its pid, and so its group id, cannot
// have been reused.
void signal_group(pid_t pid, int sig);

// The last lines of a child's stderr (at most 10 lines, 2 KiB), for details.
class Tail {
 public:
  void add(std::string_view line);
  const std::string& text() const { return text_; }
  void clear() { text_.clear(); lines_ = 0; }

 private:
  std::string text_;  // '\n'-separated
  size_t lines_ = 0;
};

// Calls `line(text, nbytes)` for each complete line at the start of buf[0,
// have) (text without '\n'; nbytes with it), and for pieces of max_line bytes
// of a longer one (all that is left, at EOF); moves the rest to the front.
template <class F>
void split_lines(char* b, size_t& have, size_t max_line, bool at_eof, F&& line) {
  size_t start = 0;
  while (start < have) {
    auto* nl = static_cast<char*>(std::memchr(b + start, '\n', have - start));
    if (!nl) break;
    size_t end = static_cast<size_t>(nl - b);
    line(std::string_view(b + start, end - start), end - start + 1);
    start = end + 1;
  }
  while (have - start >= max_line || (at_eof && have > start)) {
    size_t len = std::min(max_line, have - start);
    line(std::string_view(b + start, len), len);
    start += len;
  }
  if (start > 0) {
    std::memmove(b, b + start, have - start);
    have -= start;
  }
}

// A handler's program: argv (no shell), the environment the docs promise
// (PATH, the event variables of exec handlers, inherit_env, env, set here in
// that order, later ones replacing earlier ones), default signal dispositions
// and its own process group.
class Spawner {
 public:
  // Variables filled per event from the EventView (exec handlers).
  enum Dynamic { kEventType, kEventId, kCorrelationId, kAggregateId, kRoutingKey, kQueue, kAttempt,
                 kRedelivered, kNone };

  explicit Spawner(const config::HandlerConfig& cfg);
  ~Spawner();
  Spawner(const Spawner&) = delete;
  Spawner& operator=(const Spawner&) = delete;

  void set(const std::string& key, std::string value, Dynamic dyn = kNone);
  // inherit_env, then env: call after the handler kind's own variables.
  void set_configured(const config::HandlerConfig& cfg);

  // Starts the program with `fds` (source, target) dup2'ed in the child and
  // every other descriptor closed; fd 0 is /dev/null unless mapped. Sources
  // must all be >= the highest target + 1 (make_pipe's min_fd). The child is
  // registered for reap_child(). `v` fills the dynamic variables. Returns 0 or
  // an errno.
  int spawn(pid_t& pid, const std::vector<std::pair<int, int>>& fds, const EventView* v);

  const std::string& program() const;  // argv[0], or "(no argv)"

 private:
  struct EnvSlot {
    std::string text;  // "KEY=VALUE" when static, "KEY=" when dynamic
    Dynamic dyn = kNone;
  };
  void build_env(const EventView* v);

  std::vector<std::string> argv_;
  std::vector<char*> argv_ptrs_;
  posix_spawnattr_t attr_;
  std::vector<EnvSlot> env_slots_;
  // Reused per spawn; the child has exec'd (or failed) before posix_spawn
  // returns, so these only need to live across the call.
  std::string env_buf_;
  std::vector<size_t> env_offsets_;
  std::vector<char*> envp_;
};

}  // namespace process

// Reaps every exited child of this process that no handler is waiting for:
// processes handlers left behind, reparented to us because we are a child
// subreaper (or PID 1). A handler's own child is never taken (its exit status
// is the handler's to read). Returns how many were reaped.
size_t reap_orphans();

// Runs reap_orphans() on SIGCHLD on `io`, and after every handler child is
// reaped, while it exists. One per process (the daemon makes it at startup).
class OrphanReaper {
 public:
  explicit OrphanReaper(boost::asio::io_context& io);
  ~OrphanReaper() { stop(); }
  // Stops waiting for SIGCHLD (its pending wait would keep io.run() going).
  void stop();
  OrphanReaper(const OrphanReaper&) = delete;
  OrphanReaper& operator=(const OrphanReaper&) = delete;

 private:
  void wait();
  boost::asio::signal_set sigchld_;
  bool stopped_ = false;
};

}  // namespace er::dispatch
