#include "dispatch/process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <mutex>
#include <unordered_set>

#include "util/log.hpp"

namespace er::dispatch {

namespace {

using boost::system::error_code;

constexpr size_t kTailLines = 10;
constexpr size_t kTailBytes = 2048;
constexpr const char* kDefaultPath = "/usr/local/bin:/usr/bin:/bin";

// Handler children not yet reaped by their handler: reap_orphans() leaves
// them alone. The lock spans spawn + insert and reap + erase, so the orphan
// reaper never sees one of them as untracked.
struct Children {
  std::mutex mu;
  std::unordered_set<pid_t> pids;
  bool reaper = false;  // an OrphanReaper exists
};
Children& children() {
  static Children c;
  return c;
}

}  // namespace

namespace process {

std::string describe_signal(int sig) {
  std::string s = "signal " + std::to_string(sig);
  if (const char* abbrev = sigabbrev_np(sig)) {
    s += " (SIG";
    s += abbrev;
    s += ')';
  }
  return s;
}

std::string format_duration(std::chrono::milliseconds d) {
  auto ms = d.count();
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

std::string describe_status(int st) {
  if (WIFEXITED(st)) return "exit code " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st)) {
    std::string s = "killed by " + describe_signal(WTERMSIG(st));
    if (WCOREDUMP(st)) s += " (core dumped)";
    return s;
  }
  return "unexpected wait status " + std::to_string(st);
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

int make_pipe(int p[2], int min_fd) {
  if (::pipe2(p, O_CLOEXEC) != 0) return errno;
  for (int i = 0; i < 2; ++i) {
    if (p[i] >= min_fd) continue;
    int moved = ::fcntl(p[i], F_DUPFD_CLOEXEC, min_fd);
    int err = errno;
    ::close(p[i]);
    p[i] = moved;
    if (moved < 0) {
      close_fd(p[0]);
      close_fd(p[1]);
      return err;
    }
  }
  return 0;
}

// Once a handler's child is gone, orphans that were waiting behind it (see
// reap_orphans) can be reaped.
pid_t reap_child(pid_t pid, int* status, int flags) {
  pid_t r;
  bool reaper;
  {
    std::lock_guard<std::mutex> lock(children().mu);
    do r = ::waitpid(pid, status, flags);
    while (r < 0 && errno == EINTR);
    if (r != 0) children().pids.erase(pid);  // reaped, or not ours (ECHILD)
    reaper = children().reaper;
  }
  if (reaper && r > 0) reap_orphans();
  return r;
}

void signal_group(pid_t pid, int sig) {
  if (pid <= 0) return;
  if (::kill(-pid, sig) != 0) ::kill(pid, sig);  // it may have left its group
}

void Tail::add(std::string_view line) {
  if (line.empty()) return;
  if (!text_.empty()) text_ += '\n';
  text_ += line;
  ++lines_;
  if (text_.size() > kTailBytes) {  // keep the last bytes, even mid-line
    size_t cut = text_.size() - kTailBytes;
    size_t removed = static_cast<size_t>(std::count(text_.data(), text_.data() + cut, '\n'));
    if (text_[cut] == '\n') {
      ++cut;
      ++removed;
    }
    text_.erase(0, cut);
    lines_ -= removed;
  }
  while (lines_ > kTailLines) {
    text_.erase(0, text_.find('\n') + 1);
    --lines_;
  }
}

Spawner::Spawner(const config::HandlerConfig& cfg) : argv_(cfg.argv) {
  for (auto& a : argv_) argv_ptrs_.push_back(a.data());
  argv_ptrs_.push_back(nullptr);

  // The daemon blocks signals and ignores SIGPIPE; the child must start clean,
  // in its own process group (no terminal Ctrl-C, and a timeout kills the group).
  posix_spawnattr_init(&attr_);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigmask(&attr_, &empty);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int s : {SIGPIPE, SIGINT, SIGTERM, SIGHUP, SIGCHLD, SIGQUIT}) sigaddset(&defaults, s);
#ifdef __GLIBC__
  // glibc's posix_spawn sets its internal signals (32, 33) to SIG_IGN in the
  // child, which survives exec, unless they are in sigdefault; sigaddset
  // refuses them, so set the bits directly.
  constexpr int kBits = 8 * sizeof(defaults.__val[0]);
  for (int s = 32; s < SIGRTMIN; ++s) defaults.__val[(s - 1) / kBits] |= 1UL << ((s - 1) % kBits);
#endif
  posix_spawnattr_setsigdefault(&attr_, &defaults);
  posix_spawnattr_setpgroup(&attr_, 0);
  posix_spawnattr_setflags(&attr_, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);

  const char* path = std::getenv("PATH");
  set("PATH", path ? path : kDefaultPath);
}

Spawner::~Spawner() { posix_spawnattr_destroy(&attr_); }

const std::string& Spawner::program() const {
  static const std::string none = "(no argv)";
  return argv_.empty() ? none : argv_[0];
}

void Spawner::set(const std::string& key, std::string value, Dynamic dyn) {
  std::string text = key + "=";
  for (auto& s : env_slots_) {
    if (s.text.compare(0, text.size(), text) == 0) {  // later sources override earlier ones
      s.text = text + value;
      s.dyn = dyn;
      return;
    }
  }
  env_slots_.push_back({text + value, dyn});
}

void Spawner::set_configured(const config::HandlerConfig& cfg) {
  for (const auto& name : cfg.inherit_env) {
    if (const char* v = std::getenv(name.c_str())) set(name, v);
  }
  for (const auto& [k, v] : cfg.env) set(k, v);
}

void Spawner::build_env(const EventView* v) {
  env_buf_.clear();
  env_offsets_.clear();
  const event::Envelope* e = v ? v->envelope : nullptr;
  char attempt[16];
  char* attempt_end = attempt;
  if (v) attempt_end = std::to_chars(attempt, attempt + sizeof attempt, v->attempt).ptr;
  for (const auto& slot : env_slots_) {
    env_offsets_.push_back(env_buf_.size());
    env_buf_ += slot.text;
    switch (v ? slot.dyn : kNone) {
      case kEventType: if (e) env_buf_ += e->event_type; break;
      case kEventId: if (e) env_buf_ += e->event_id; break;
      case kCorrelationId: if (e) env_buf_ += e->correlation_id; break;
      case kAggregateId: if (e) env_buf_ += e->aggregate_id; break;
      case kRoutingKey: env_buf_ += v->routing_key; break;
      case kQueue: env_buf_ += v->queue; break;
      case kAttempt: env_buf_.append(attempt, attempt_end); break;
      case kRedelivered: env_buf_ += v->redelivered ? '1' : '0'; break;
      case kNone: break;
    }
    env_buf_ += '\0';
  }
  envp_.clear();
  for (size_t off : env_offsets_) envp_.push_back(env_buf_.data() + off);
  envp_.push_back(nullptr);
}

int Spawner::spawn(pid_t& pid, const std::vector<std::pair<int, int>>& fds, const EventView* v) {
  if (argv_.empty()) return EINVAL;
  build_env(v);
  posix_spawn_file_actions_t fa;
  int rc = posix_spawn_file_actions_init(&fa);
  if (rc != 0) return rc;
  int top = 2;
  bool stdin_mapped = false;
  for (const auto& [src, dst] : fds) {
    top = std::max(top, dst);
    stdin_mapped = stdin_mapped || dst == 0;
  }
  if (!stdin_mapped) rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  // dup2 clears FD_CLOEXEC on the targets; closefrom drops anything else still open.
  for (const auto& [src, dst] : fds)
    if (rc == 0) rc = posix_spawn_file_actions_adddup2(&fa, src, dst);
  if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, top + 1);
  if (rc == 0) {
    std::lock_guard<std::mutex> lock(children().mu);
    rc = posix_spawn(&pid, argv_ptrs_[0], &fa, &attr_, argv_ptrs_.data(), envp_.data());
    if (rc == 0) children().pids.insert(pid);
  }
  posix_spawn_file_actions_destroy(&fa);
  return rc;
}

}  // namespace process

size_t reap_orphans() {
  std::lock_guard<std::mutex> lock(children().mu);
  size_t n = 0;
  for (;;) {
    // Peek at one exited child; reap it only if no handler waits for it. A
    // handler's own zombie stops the loop (P_ALL would return it again): its
    // handler reaps it soon and then calls us again (reap_child).
    siginfo_t info{};
    int w = ::waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 || info.si_pid == 0) break;  // no children, or none exited
    pid_t pid = info.si_pid;
    if (children().pids.count(pid)) break;
    int st;
    pid_t r;
    do r = ::waitpid(pid, &st, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r <= 0) break;
    ++n;
    std::string p = std::to_string(pid);
    std::string how = process::describe_status(st);
    log::debug("reaped an orphaned process", {{"pid", p}, {"status", how}});
  }
  return n;
}

OrphanReaper::OrphanReaper(boost::asio::io_context& io) : sigchld_(io, SIGCHLD) {
  // asio installs its handler without SA_RESTART: SIGCHLD comes with every
  // handler exit and must not make other threads' blocking calls fail with EINTR.
  struct sigaction sa;
  if (::sigaction(SIGCHLD, nullptr, &sa) == 0) {
    sa.sa_flags |= SA_RESTART | SA_NOCLDSTOP;
    ::sigaction(SIGCHLD, &sa, nullptr);
  }
  {
    std::lock_guard<std::mutex> lock(children().mu);
    children().reaper = true;
  }
  reap_orphans();  // any from before the handler was installed
  wait();
}

void OrphanReaper::stop() {
  stopped_ = true;  // a SIGCHLD already queued must not wait again
  std::lock_guard<std::mutex> lock(children().mu);
  children().reaper = false;
  error_code ignored;
  sigchld_.cancel(ignored);
}

void OrphanReaper::wait() {
  sigchld_.async_wait([this](const error_code& ec, int) {
    if (ec || stopped_) return;
    reap_orphans();
    wait();
  });
}

}  // namespace er::dispatch
