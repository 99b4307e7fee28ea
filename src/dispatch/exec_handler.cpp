#include "dispatch/exec_handler.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
// glibc 2.36's <sys/pidfd.h> lacks __BEGIN_DECLS (fixed in 2.37).
extern "C" {
#include <sys/pidfd.h>
}
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include "settle/emit.hpp"
#include "util/log.hpp"

namespace er::dispatch {

namespace {

namespace asio = boost::asio;
using boost::system::error_code;
using process::close_fd;
using process::describe_signal;
using process::format_duration;
using process::reap_child;

constexpr size_t kReadBuf = 8192;        // 2 * kMaxLine: a kept partial line always leaves room to read
constexpr size_t kMaxLine = 4096;        // longer lines are split
constexpr size_t kLogCap = 64 * 1024;    // logged bytes per stream per event
constexpr auto kDrainGrace = std::chrono::milliseconds(100);  // pipes held by grandchildren
constexpr size_t kMaxSpareBuffers = 16;
constexpr int kEmitFd = 3;  // the child writes emit objects here, one per line (docs/handlers.md#emit)

// `timeout_note` is appended after "timed out" (e.g. " after 30s (sent SIGTERM)").
Outcome exit_outcome(int status, bool timed_out, std::string_view timeout_note, std::string_view tail) {
  std::string detail;
  bool dead_letter = false;
  if (timed_out) {
    detail = "timed out";
    detail += timeout_note;
  } else if (WIFEXITED(status)) {
    int code = WEXITSTATUS(status);
    if (code == 0) return Outcome::ack();
    detail = "exit code " + std::to_string(code);
    if (code == 75) {
      detail += " (EX_TEMPFAIL)";
    } else if (code == 65) {
      detail += " (EX_DATAERR)";
      dead_letter = true;
    }
  } else if (WIFSIGNALED(status)) {
    detail = "killed by " + describe_signal(WTERMSIG(status));
    if (WCOREDUMP(status)) detail += " (core dumped)";
  } else {
    detail = "unexpected wait status " + std::to_string(status);
  }
  if (!tail.empty()) {
    detail += "; stderr: ";
    detail += tail;
  }
  if (dead_letter) return Outcome::dead_letter("handler_failed", std::move(detail));
  return Outcome::retry("handler_failed", std::move(detail));
}

// Read buffers, recycled across runs by the handler (returned once a run is
// done: its descriptors are closed by then, so nothing reads into them).
struct Buffers {
  std::array<char, kReadBuf> out;
  std::array<char, kReadBuf> err;
  std::array<char, kReadBuf> emit;
};

// fd 3: emit objects, one per line, kept only up to the caps; past them the
// rest is read and discarded (the program never blocks on a full pipe) and
// an exit 0 becomes emit_invalid.
struct EmitStream {
  explicit EmitStream(asio::io_context& io) : sd(io) {}
  asio::posix::stream_descriptor sd;
  std::string partial;  // an unfinished line
  std::vector<std::string> lines;
  size_t bytes = 0;
  std::string over;  // why the caps were exceeded; empty = within them
  bool eof = false;
};

struct Stream {
  explicit Stream(asio::io_context& io) : sd(io) {}
  asio::posix::stream_descriptor sd;
  char* buf = nullptr;  // kReadBuf bytes, from Run::buffers
  size_t have = 0;     // bytes of an unfinished line at the start of buf
  size_t logged = 0;
  size_t dropped = 0;
  bool capped = false;
  bool eof = false;
};

// One per running child; kept alive by the handler's list and by pending
// completion handlers. `done` is set once (finished or aborted); every
// completion handler checks it first.
struct Run {
  Run(asio::io_context& io, Job& j) : job(&j), in(io), out(io), err(io), emit(io), pidfd(io), timer(io) {}
  Job* job;
  size_t index = 0;  // position in ExecHandler::runs_
  pid_t pid = -1;
  int status = 0;
  bool status_known = false;
  bool reaped = false;
  bool timed_out = false;
  bool sent_kill = false;
  bool done = false;
  unsigned timer_gen = 0;  // distinguishes timeout / kill-grace / drain waits on the one timer
  asio::posix::stream_descriptor in;
  Stream out;
  Stream err;
  EmitStream emit;
  asio::posix::stream_descriptor pidfd;
  asio::steady_timer timer;
  process::Tail tail;  // last stderr lines
  std::unique_ptr<Buffers> buffers;
};

std::string_view event_id(const Run& run) {
  const event::Envelope* e = run.job->view().envelope;
  return e ? std::string_view(e->event_id) : std::string_view();
}

class ExecHandler final : public Handler {
 public:
  ExecHandler(const config::HandlerConfig& cfg, asio::io_context& io);
  ~ExecHandler() override;

  void start(Job& job) override;
  void abort_all() override;

 private:
  void fail(Job& job, const char* what, int err);
  void read_more(const std::shared_ptr<Run>& run, bool is_err);
  void on_read(const std::shared_ptr<Run>& run, bool is_err, const error_code& ec, size_t n);
  void read_emits(const std::shared_ptr<Run>& run);
  void emit_lines(Run& run, std::string_view data, bool at_eof);
  void wait_exit(const std::shared_ptr<Run>& run);
  void on_exit(const std::shared_ptr<Run>& run, const error_code& ec);
  void arm_timer(const std::shared_ptr<Run>& run, std::chrono::milliseconds after);
  void on_timer(const std::shared_ptr<Run>& run, unsigned gen, const error_code& ec);
  void signal_group(Run& run, int sig);
  void consume(Run& run, bool is_err, bool at_eof);
  void line(Run& run, bool is_err, std::string_view text, size_t nbytes);
  void end_stream(Run& run, bool is_err);
  void maybe_complete(const std::shared_ptr<Run>& run);
  void complete(const std::shared_ptr<Run>& run);
  void close_all(Run& run);  // also recycles the buffers
  void remove(Run& run);

  asio::io_context& io_;
  process::Spawner spawner_;
  std::chrono::milliseconds timeout_;
  std::chrono::milliseconds kill_grace_;
  std::vector<std::shared_ptr<Run>> runs_;
  std::vector<std::unique_ptr<Buffers>> spare_buffers_;
  // Cancelled operations still call back after ~ExecHandler (a reload frees
  // a handler with its last event): their callbacks check this first.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

ExecHandler::ExecHandler(const config::HandlerConfig& cfg, asio::io_context& io)
    : Handler(cfg.name), io_(io), spawner_(cfg), timeout_(cfg.timeout), kill_grace_(cfg.kill_grace) {
  using S = process::Spawner;
  spawner_.set("EVENT_TYPE", "", S::kEventType);
  spawner_.set("EVENT_ID", "", S::kEventId);
  spawner_.set("CORRELATION_ID", "", S::kCorrelationId);
  spawner_.set("AGGREGATE_ID", "", S::kAggregateId);
  spawner_.set("ROUTING_KEY", "", S::kRoutingKey);
  spawner_.set("QUEUE", "", S::kQueue);
  spawner_.set("ATTEMPT", "", S::kAttempt);
  spawner_.set("REDELIVERED", "", S::kRedelivered);
  spawner_.set_configured(cfg);
  spawner_.set("ER_EMIT_FD", std::to_string(kEmitFd));  // last: a handler's env cannot override it
}

ExecHandler::~ExecHandler() {
  abort_all();  // never leave children (or zombies) behind
  alive_.reset();
}

void ExecHandler::fail(Job& job, const char* what, int err) {
  std::string detail = "cannot start ";
  detail += spawner_.program();
  detail += ": ";
  if (what) {
    detail += what;
    detail += ": ";
  }
  detail += std::strerror(err);
  log::warn("exec handler failed to start", {{"handler", name()}, {"error", detail}});
  job.finish(Outcome::retry("handler_failed", std::move(detail)));
}

void ExecHandler::start(Job& job) {
  const EventView& v = job.view();
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, em[2] = {-1, -1};
  // Every end above fd 3, so the child's dup2 onto 0..3 never clobbers one.
  int rc = process::make_pipe(in, kEmitFd + 1);
  if (rc == 0) rc = process::make_pipe(out, kEmitFd + 1);
  if (rc == 0) rc = process::make_pipe(err, kEmitFd + 1);
  if (rc == 0) rc = process::make_pipe(em, kEmitFd + 1);
  if (rc != 0) {
    for (int* p : {in, out, err, em}) { close_fd(p[0]); close_fd(p[1]); }
    fail(job, "pipe", rc);
    return;
  }

  pid_t pid = -1;
  rc = spawner_.spawn(pid, {{in[0], 0}, {out[1], 1}, {err[1], 2}, {em[1], kEmitFd}}, &v);
  close_fd(in[0]);
  close_fd(out[1]);
  close_fd(err[1]);
  close_fd(em[1]);
  if (rc != 0) {
    close_fd(in[1]);
    close_fd(out[0]);
    close_fd(err[0]);
    close_fd(em[0]);
    fail(job, nullptr, rc);
    return;
  }

  auto run = std::make_shared<Run>(io_, job);
  run->pid = pid;
  if (spare_buffers_.empty()) {
    run->buffers = std::make_unique<Buffers>();
  } else {
    run->buffers = std::move(spare_buffers_.back());
    spare_buffers_.pop_back();
  }
  run->out.buf = run->buffers->out.data();
  run->err.buf = run->buffers->err.data();
  error_code ec;
  int pfd = ::pidfd_open(pid, 0);
  int watch_err = pfd < 0 ? errno : 0;
  // assign() takes ownership only on success; close what was not taken.
  if (!watch_err) { run->pidfd.assign(pfd, ec); if (ec) { close_fd(pfd); watch_err = ec.value(); } else pfd = -1; }
  if (!watch_err) { run->in.assign(in[1], ec); if (ec) { close_fd(in[1]); watch_err = ec.value(); } else in[1] = -1; }
  if (!watch_err) { run->out.sd.assign(out[0], ec); if (ec) { close_fd(out[0]); watch_err = ec.value(); } else out[0] = -1; }
  if (!watch_err) { run->err.sd.assign(err[0], ec); if (ec) { close_fd(err[0]); watch_err = ec.value(); } else err[0] = -1; }
  if (!watch_err) { run->emit.sd.assign(em[0], ec); if (ec) { close_fd(em[0]); watch_err = ec.value(); } else em[0] = -1; }
  if (watch_err) {
    // Cannot supervise it: kill it now rather than leave it unwatched.
    close_fd(pfd);
    close_fd(in[1]);
    close_fd(out[0]);
    close_fd(err[0]);
    close_fd(em[0]);
    close_all(*run);
    signal_group(*run, SIGKILL);
    int st;
    reap_child(pid, &st, 0);
    fail(job, "cannot watch child", watch_err);
    return;
  }

  run->index = runs_.size();
  runs_.push_back(run);

  if (v.body.empty()) {
    run->in.close(ec);
  } else {
    // EPIPE (child did not read stdin) is fine; either way the write end is closed.
    asio::async_write(run->in, asio::buffer(v.body.data(), v.body.size()),
                      [run](const error_code&, size_t) {
                        error_code ignored;
                        run->in.close(ignored);
                      });
  }
  read_more(run, false);
  read_more(run, true);
  read_emits(run);
  wait_exit(run);
  if (timeout_.count() > 0) arm_timer(run, timeout_);
}

void ExecHandler::read_more(const std::shared_ptr<Run>& run, bool is_err) {
  Stream& s = is_err ? run->err : run->out;
  s.sd.async_read_some(asio::buffer(s.buf + s.have, kReadBuf - s.have),
                       [this, run, is_err, alive = std::weak_ptr<bool>(alive_)](const error_code& ec, size_t n) {
                         if (!alive.expired()) on_read(run, is_err, ec, n);
                       });
}

void ExecHandler::on_read(const std::shared_ptr<Run>& run, bool is_err, const error_code& ec, size_t n) {
  if (run->done) return;
  Stream& s = is_err ? run->err : run->out;
  if (!ec) {
    s.have += n;
    consume(*run, is_err, false);
    read_more(run, is_err);
    return;
  }
  end_stream(*run, is_err);  // EOF, or a read error: treat alike
  maybe_complete(run);
}

void ExecHandler::read_emits(const std::shared_ptr<Run>& run) {
  run->emit.sd.async_read_some(
      asio::buffer(run->buffers->emit), [this, run, alive = std::weak_ptr<bool>(alive_)](const error_code& ec, size_t n) {
        if (alive.expired() || run->done) return;
        EmitStream& e = run->emit;
        if (!ec) {
          emit_lines(*run, std::string_view(run->buffers->emit.data(), n), false);
          read_emits(run);
          return;
        }
        emit_lines(*run, {}, true);  // EOF, or a read error: treat alike
        e.eof = true;
        error_code ignored;
        e.sd.close(ignored);
        maybe_complete(run);
      });
}

void ExecHandler::emit_lines(Run& run, std::string_view data, bool at_eof) {
  EmitStream& e = run.emit;
  if (!e.over.empty()) return;  // past the caps: discard
  auto take = [&](std::string_view line) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == std::string_view::npos) return;  // blank
    e.bytes += line.size();
    if (e.lines.size() == settle::kMaxEmits) {
      e.over = "more than " + std::to_string(settle::kMaxEmits) + " emitted events on fd 3";
    } else {
      e.lines.emplace_back(line);
    }
  };
  size_t start = 0;
  while (e.over.empty()) {
    size_t nl = data.find('\n', start);
    if (nl == std::string_view::npos) break;
    if (e.partial.empty()) {
      take(data.substr(start, nl - start));
    } else {
      e.partial.append(data, start, nl - start);
      take(e.partial);
      e.partial.clear();
    }
    start = nl + 1;
  }
  if (e.over.empty() && start < data.size()) e.partial.append(data, start, data.size() - start);
  if (e.over.empty() && at_eof && !e.partial.empty()) {
    take(e.partial);
    e.partial.clear();
  }
  if (e.over.empty() && e.bytes + e.partial.size() > settle::kMaxEmitTotalBytes)
    e.over = "more than " + std::to_string(settle::kMaxEmitTotalBytes) + " bytes of emitted events on fd 3";
  if (!e.over.empty()) {
    e.lines.clear();
    e.lines.shrink_to_fit();
    std::string().swap(e.partial);
  }
}

void ExecHandler::consume(Run& run, bool is_err, bool at_eof) {
  Stream& s = is_err ? run.err : run.out;
  process::split_lines(s.buf, s.have, kMaxLine, at_eof,
                       [&](std::string_view text, size_t nbytes) { line(run, is_err, text, nbytes); });
}

void ExecHandler::line(Run& run, bool is_err, std::string_view text, size_t nbytes) {
  Stream& s = is_err ? run.err : run.out;
  if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
  // The tail keeps going past the log cap: the last lines are the useful ones.
  if (is_err) run.tail.add(text);
  if (s.capped || s.logged + nbytes > kLogCap) {
    s.capped = true;  // once truncating, drop everything after so the log has no gaps
    s.dropped += nbytes;
    return;
  }
  s.logged += nbytes;
  if (text.empty()) return;
  std::string_view id = event_id(run);
  if (is_err)
    log::warn(text, {{"handler", name()}, {"event_id", id}, {"stream", "stderr"}});
  else
    log::info(text, {{"handler", name()}, {"event_id", id}, {"stream", "stdout"}});
}

void ExecHandler::end_stream(Run& run, bool is_err) {
  Stream& s = is_err ? run.err : run.out;
  if (s.eof) return;
  consume(run, is_err, true);
  if (s.dropped > 0) {
    char msg[64];
    std::snprintf(msg, sizeof msg, "output truncated: %zu bytes dropped", s.dropped);
    std::string_view id = event_id(run);
    const char* stream = is_err ? "stderr" : "stdout";
    if (is_err)
      log::warn(msg, {{"handler", name()}, {"event_id", id}, {"stream", stream}});
    else
      log::info(msg, {{"handler", name()}, {"event_id", id}, {"stream", stream}});
  }
  s.eof = true;
  error_code ec;
  s.sd.close(ec);
}

void ExecHandler::wait_exit(const std::shared_ptr<Run>& run) {
  run->pidfd.async_wait(asio::posix::descriptor_base::wait_read,
                        [this, run, alive = std::weak_ptr<bool>(alive_)](const error_code& ec) {
                          if (!alive.expired()) on_exit(run, ec);
                        });
}

void ExecHandler::on_exit(const std::shared_ptr<Run>& run, const error_code& ec) {
  if (run->done || ec == asio::error::operation_aborted) return;
  // Peek first (WNOWAIT): while the child is an unreaped zombie its pid, and
  // so its process group id, cannot be reused, and the group can be killed.
  siginfo_t info{};
  int w;
  do w = ::waitid(P_PID, static_cast<id_t>(run->pid), &info, WEXITED | WNOHANG | WNOWAIT);
  while (w < 0 && errno == EINTR);
  if (w == 0 && info.si_pid == 0) {
    if (!ec) {
      wait_exit(run);  // not exited yet (spurious wakeup)
      return;
    }
    // The pidfd wait itself failed: do not lose the child.
    log::error("exec handler: waiting on child failed", {{"handler", name()}, {"error", ec.message()}});
  }
  int st = 0;
  pid_t r;
  if (w == 0) {
    // The handler is done: whatever it left running in its group (background
    // jobs) is killed now, not left behind. SIGKILL, not TERM + grace: the
    // group is only safe to signal while the zombie pins its id.
    signal_group(*run, SIGKILL);
    r = reap_child(run->pid, &st, 0);  // exited (or just killed): does not block for long
  } else {
    r = reap_child(run->pid, &st, WNOHANG);  // not ours any more (reaped elsewhere): just forget it
  }
  run->reaped = true;
  run->status_known = r > 0;
  run->status = st;
  error_code ignored;
  run->pidfd.close(ignored);
  if (run->out.eof && run->err.eof && run->emit.eof) {
    complete(run);
    return;
  }
  // A grandchild may still hold the pipes; give them a moment, not forever.
  arm_timer(run, kDrainGrace);
}

void ExecHandler::arm_timer(const std::shared_ptr<Run>& run, std::chrono::milliseconds after) {
  unsigned gen = ++run->timer_gen;
  run->timer.expires_after(after);
  run->timer.async_wait([this, run, gen, alive = std::weak_ptr<bool>(alive_)](const error_code& ec) {
    if (!alive.expired()) on_timer(run, gen, ec);
  });
}

void ExecHandler::signal_group(Run& run, int sig) {
  if (!run.reaped) process::signal_group(run.pid, sig);
}

void ExecHandler::on_timer(const std::shared_ptr<Run>& run, unsigned gen, const error_code& ec) {
  if (run->done || ec || gen != run->timer_gen) return;
  if (run->reaped) {  // drain grace over
    std::string_view id = event_id(*run);
    log::warn("exec handler exited but its output is still open (background process?); not waiting",
              {{"handler", name()}, {"event_id", id}});
    complete(run);
    return;
  }
  std::string_view id = event_id(*run);
  if (!run->timed_out) {
    run->timed_out = true;
    log::warn("exec handler timed out, sending SIGTERM",
              {{"handler", name()}, {"event_id", id}, {"timeout", format_duration(timeout_)}});
    signal_group(*run, SIGTERM);
    if (kill_grace_.count() > 0) {
      arm_timer(run, kill_grace_);
      return;
    }
  }
  if (!run->sent_kill) {
    run->sent_kill = true;
    log::warn("exec handler ignored SIGTERM, sending SIGKILL", {{"handler", name()}, {"event_id", id}});
    signal_group(*run, SIGKILL);
  }
}

void ExecHandler::maybe_complete(const std::shared_ptr<Run>& run) {
  if (run->reaped && run->out.eof && run->err.eof && run->emit.eof) complete(run);
}

void ExecHandler::close_all(Run& run) {
  error_code ec;
  run.in.close(ec);
  run.out.sd.close(ec);
  run.err.sd.close(ec);
  run.emit.sd.close(ec);
  run.pidfd.close(ec);
  run.timer.cancel();
  if (run.buffers && spare_buffers_.size() < kMaxSpareBuffers) spare_buffers_.push_back(std::move(run.buffers));
  run.buffers.reset();
  run.out.buf = run.err.buf = nullptr;
}

void ExecHandler::remove(Run& run) {
  size_t i = run.index;
  if (i >= runs_.size() || runs_[i].get() != &run) return;
  if (i + 1 != runs_.size()) {
    runs_[i] = std::move(runs_.back());
    runs_[i]->index = i;
  }
  runs_.pop_back();
}

void ExecHandler::complete(const std::shared_ptr<Run>& run_ref) {
  std::shared_ptr<Run> run = run_ref;  // outlives its removal from runs_
  if (run->done) return;
  end_stream(*run, false);  // no-op for streams already at EOF
  end_stream(*run, true);
  run->done = true;
  close_all(*run);  // also stops the stdin write: the body is only valid until finish()
  remove(*run);
  Outcome outcome;
  if (!run->status_known) {
    std::string detail = "exit status unavailable (child reaped elsewhere)";
    if (!run->tail.text().empty()) detail += "; stderr: " + run->tail.text();
    outcome = Outcome::retry("handler_failed", std::move(detail));
  } else {
    std::string note;
    if (run->timed_out) {
      note = " after " + format_duration(timeout_) + (run->sent_kill ? " (sent SIGTERM, then SIGKILL)" : " (sent SIGTERM)");
    }
    outcome = exit_outcome(run->status, run->timed_out, note, run->tail.text());
  }
  // Emits count only with exit 0. A line left unfinished (fd 3 still held
  // by a background process) is not one.
  if (outcome.verdict == Verdict::Ack) {
    if (!run->emit.partial.empty())
      log::warn("exec handler left an unfinished line on fd 3; ignored", {{"handler", name()}, {"event_id", event_id(*run)}});
    if (!run->emit.over.empty()) {
      outcome = Outcome::dead_letter("emit_invalid", std::move(run->emit.over));
    } else {
      outcome.emits = std::move(run->emit.lines);
    }
  }
  run->job->finish(std::move(outcome));
}

void ExecHandler::abort_all() {
  if (runs_.empty()) return;
  auto runs = std::move(runs_);
  runs_.clear();
  for (auto& run : runs) {
    if (run->done) continue;
    run->done = true;
    if (!run->reaped) {
      signal_group(*run, SIGKILL);
      // Blocking is acceptable here: shutdown, after the deadline, and SIGKILL is quick.
      int st;
      reap_child(run->pid, &st, 0);
      run->reaped = true;
    }
    close_all(*run);
  }
  std::string n = std::to_string(runs.size());
  log::warn("exec handler aborted running children", {{"handler", name()}, {"count", n}});
}

}  // namespace

Outcome outcome_for_exit(int wait_status, bool timed_out, std::string_view stderr_tail) {
  return exit_outcome(wait_status, timed_out, {}, stderr_tail);
}

std::unique_ptr<Handler> make_exec_handler(const config::HandlerConfig& cfg, boost::asio::io_context& io) {
  return std::make_unique<ExecHandler>(cfg, io);
}

}  // namespace er::dispatch
