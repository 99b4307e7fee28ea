#include "dispatch/worker_handler.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
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
#include <cstring>
#include <deque>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "dispatch/process.hpp"
#include "metrics/metrics.hpp"
#include "util/log.hpp"

namespace er::dispatch {

namespace {

namespace asio = boost::asio;
using boost::system::error_code;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

constexpr size_t kLogReadBuf = 8192;  // 2 * kMaxLogLine
constexpr size_t kMaxLogLine = 4096;  // longer stdout/stderr lines are split
constexpr size_t kAnswerChunk = 64 * 1024;
constexpr auto kDrainGrace = milliseconds(100);  // pipes held by grandchildren after the exit
constexpr int kChildFdBase = 5;                  // pipe ends above the child's 0..4
using answer::cut_utf8;
using answer::json_type_name;
using answer::kMaxDelayMs;
using answer::valid_reason;

// ---------------------------------------------------------------------------
// JSON text

void append_hex4(std::string& out, unsigned v) {
  static const char* kHex = "0123456789abcdef";
  out += "\\u00";
  out += kHex[(v >> 4) & 0xf];
  out += kHex[v & 0xf];
}

// Length of the valid UTF-8 sequence at s[i], or 0.
size_t utf8_len(std::string_view s, size_t i) {
  auto c = static_cast<unsigned char>(s[i]);
  size_t n;
  unsigned min;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) { n = 2; min = 0x80; }
  else if (c >= 0xe0 && c <= 0xef) { n = 3; min = 0x800; }
  else if (c >= 0xf0 && c <= 0xf4) { n = 4; min = 0x10000; }
  else return 0;
  if (i + n > s.size()) return 0;
  unsigned cp = c & (0x7f >> n);
  for (size_t k = 1; k < n; ++k) {
    auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x20) {
      append_hex4(out, c);
      ++i;
    } else if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
    } else if (size_t n = utf8_len(s, i)) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out += "\\ufffd";  // metadata from the publisher need not be UTF-8
      ++i;
    }
  }
  out += '"';
}

void append_opt_string(std::string& out, std::string_view s) {
  if (s.empty())
    out += "null";
  else
    append_json_string(out, s);
}

// A short, printable quote of untrusted text for an error message.
std::string quote(std::string_view s) {
  std::string out;
  append_json_string(out, cut_utf8(s, 40));
  if (s.size() > 40) out.insert(out.size() - 1, "...");
  return out;
}

// Checks `emit` and keeps each element's compact JSON. Empty result = fine.
std::string take_emits(const rapidjson::Value& emit, std::vector<std::string>& out) {
  if (!emit.IsArray()) return std::string("emit is ") + json_type_name(emit) + ", not an array";
  if (emit.Size() > settle::kMaxEmits)
    return "emit has " + std::to_string(emit.Size()) + " events, at most " + std::to_string(settle::kMaxEmits) + " allowed";
  out.reserve(emit.Size());
  for (rapidjson::SizeType i = 0; i < emit.Size(); ++i) {
    const auto& e = emit[i];
    std::string where = "emit[" + std::to_string(i) + "]";
    if (!e.IsObject()) return where + " is " + json_type_name(e) + ", not an object";
    auto t = e.FindMember("event_type");
    if (t == e.MemberEnd() || !t->value.IsString() || t->value.GetStringLength() == 0)
      return where + " has no event_type (a non-empty string)";
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    e.Accept(w);
    out.emplace_back(buf.GetString(), buf.GetSize());
  }
  return {};
}

}  // namespace

bool parse_worker_answer(std::string_view line, WorkerAnswer& out, std::string& error) {
  out = WorkerAnswer{};
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  // A line is untrusted: nested thousands deep it would exhaust the stack of
  // a recursive parse or of writing an emit back. An emit object sits two
  // levels down (answer, emit array) and may nest as deep as any emit.
  if (settle::json_too_deep(line, settle::kMaxEmitDepth + 2)) {
    error = "nested deeper than " + std::to_string(settle::kMaxEmitDepth + 2) + " levels";
    return false;
  }
  rapidjson::Document doc;
  doc.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseIterativeFlag>(line.data(), line.size());
  if (doc.HasParseError()) {
    error = std::string("not JSON (") + rapidjson::GetParseError_En(doc.GetParseError()) + " at byte " +
            std::to_string(doc.GetErrorOffset()) + "): " + quote(line);
    return false;
  }
  if (!doc.IsObject()) {
    error = std::string("not a JSON object but ") + json_type_name(doc);
    return false;
  }
  auto type = doc.FindMember("type");
  if (type == doc.MemberEnd() || !type->value.IsString()) {
    error = "no \"type\" (a string)";
    return false;
  }
  std::string_view t(type->value.GetString(), type->value.GetStringLength());
  if (t == "ready") {
    out.type = WorkerAnswer::Type::Ready;
    auto p = doc.FindMember("protocol");
    if (p == doc.MemberEnd() || !p->value.IsInt64()) {
      error = "ready without \"protocol\" (an integer)";
      return false;
    }
    out.protocol = p->value.GetInt64();
    return true;
  }
  if (t != "result") {
    error = "unknown type " + quote(t);
    return false;
  }
  out.type = WorkerAnswer::Type::Result;
  auto id = doc.FindMember("id");
  if (id == doc.MemberEnd() || !id->value.IsUint64() || id->value.GetUint64() == 0) {
    error = "result without \"id\" (a positive integer)";
    return false;
  }
  out.id = id->value.GetUint64();
  auto v = doc.FindMember("verdict");
  if (v == doc.MemberEnd() || !v->value.IsString()) {
    error = "result " + std::to_string(out.id) + " without \"verdict\" (a string)";
    return false;
  }
  std::string_view verdict(v->value.GetString(), v->value.GetStringLength());
  Outcome& o = out.outcome;
  if (verdict == "ack") {
    o.verdict = Verdict::Ack;
  } else if (verdict == "retry") {
    o.verdict = Verdict::Retry;
    o.reason = "handler_failed";
  } else if (verdict == "dead_letter") {
    o.verdict = Verdict::DeadLetter;
    o.reason = "handler_rejected";
  } else {
    error = "result " + std::to_string(out.id) + ": unknown verdict " + quote(verdict);
    return false;
  }
  auto present = [&](const char* key) {
    auto m = doc.FindMember(key);
    return m != doc.MemberEnd() && !m->value.IsNull() ? &m->value : nullptr;
  };
  if (const auto* r = present("reason")) {
    std::string_view rs = r->IsString() ? std::string_view(r->GetString(), r->GetStringLength()) : "";
    if (!valid_reason(rs)) {
      error = "result " + std::to_string(out.id) + ": \"reason\" must be 1 to 64 of [A-Za-z0-9_.-]";
      return false;
    }
    if (o.verdict != Verdict::Ack) o.reason = rs;
  }
  if (const auto* d = present("detail")) {
    if (!d->IsString()) {
      error = "result " + std::to_string(out.id) + ": \"detail\" is " + json_type_name(*d) + ", not a string";
      return false;
    }
    o.detail = cut_utf8(std::string_view(d->GetString(), d->GetStringLength()), kMaxDetailBytes);
  }
  if (const auto* d = present("delay_ms")) {
    if (!d->IsUint64()) {
      error = "result " + std::to_string(out.id) + ": \"delay_ms\" must be a non-negative integer";
      return false;
    }
    if (o.verdict == Verdict::Retry) o.retry_delay = milliseconds(std::min(d->GetUint64(), kMaxDelayMs));
  }
  if (const auto* e = present("emit")) {
    if (o.verdict != Verdict::Ack) {
      out.emit_ignored = true;
    } else if (std::string bad = take_emits(*e, o.emits); !bad.empty()) {
      o = Outcome::dead_letter("emit_invalid", std::move(bad));
    }
  }
  return true;
}

void append_event_line(std::string& out, uint64_t id, const EventView& v) {
  static const event::Envelope kNoEnvelope;
  const event::Envelope& e = v.envelope ? *v.envelope : kNoEnvelope;
  char num[24];
  out += "{\"type\":\"event\",\"id\":";
  out.append(num, std::to_chars(num, num + sizeof num, id).ptr);
  // Envelope fields the event lacks are null; the delivery's own are always there.
  const std::pair<const char*, std::string_view> fields[] = {
      {",\"event_type\":", e.event_type},         {",\"event_id\":", e.event_id},
      {",\"aggregate_id\":", e.aggregate_id},     {",\"aggregate_type\":", e.aggregate_type},
      {",\"correlation_id\":", e.correlation_id}, {",\"routing_key\":", v.routing_key},
      {",\"exchange\":", v.exchange},             {",\"queue\":", v.queue}};
  for (size_t i = 0; i < std::size(fields); ++i) {
    out += fields[i].first;
    if (i < 5)
      append_opt_string(out, fields[i].second);
    else
      append_json_string(out, fields[i].second);
  }
  out += ",\"attempt\":";
  out.append(num, std::to_chars(num, num + sizeof num, v.attempt).ptr);
  out += v.redelivered ? ",\"redelivered\":true,\"event\":" : ",\"redelivered\":false,\"event\":";
  if (v.body.empty()) {
    out += "null";
  } else {
    // The body passed intake: valid JSON, so CR and LF can only be whitespace.
    std::string_view b = v.body;
    size_t from = out.size();
    out += b;
    for (size_t i = from; i < out.size(); ++i)
      if (out[i] == '\n' || out[i] == '\r') out[i] = ' ';
  }
  out += "}\n";
}

namespace {

// ---------------------------------------------------------------------------
// The processes of one worker handler

enum RestartReason { kExited, kTimeout, kProtocol, kStartFailed, kReasons };
const char* const kReasonNames[kReasons] = {"worker_exited", "worker_timeout", "protocol_error", "start_failed"};

struct LogStream {
  explicit LogStream(asio::io_context& io) : sd(io) {}
  asio::posix::stream_descriptor sd;
  int raw = -1;  // before activation
  std::array<char, kLogReadBuf> buf;
  size_t have = 0;
  bool eof = false;
};

struct Proc {
  explicit Proc(asio::io_context& io) : in(io), ans(io), pidfd(io), out(io), err(io), life_timer(io), event_timer(io) {}
  enum class State { Starting, Up, Closing, Dead };
  unsigned slot = 0;
  pid_t pid = -1;
  State state = State::Starting;
  bool reaped = false;
  bool attached = false;     // descriptors handed to asio
  bool finished = false;     // reaped, streams closed
  int raw_in = -1, raw_ans = -1, raw_pidfd = -1;
  asio::posix::stream_descriptor in;     // fd 3 of the worker
  asio::posix::stream_descriptor ans;    // fd 4 of the worker
  asio::posix::stream_descriptor pidfd;
  LogStream out, err;
  asio::steady_timer life_timer;         // start_timeout, kill grace, drain
  unsigned life_gen = 0;
  asio::steady_timer event_timer;        // the oldest unanswered event's deadline
  bool event_timer_armed = false;
  std::string wpending, wbusy;
  bool writing = false;
  std::unique_ptr<char[]> abuf;          // answer bytes not yet cut into lines
  size_t acap = 0, alen = 0;
  size_t ascan = 0;                      // abuf[0, ascan) holds no '\n'
  bool term_sent = false;
  std::unordered_map<uint64_t, Job*> inflight;
  std::deque<std::pair<uint64_t, steady_clock::time_point>> order;  // send order = deadline order
  uint64_t next_id = 1;
  process::Tail tail;
  steady_clock::time_point up_since;
  std::string pid_text;
};

struct SlotState {
  explicit SlotState(asio::io_context& io) : restart_timer(io) {}
  std::shared_ptr<Proc> proc;             // current (null while waiting to restart)
  milliseconds backoff{0};
  asio::steady_timer restart_timer;
  bool restart_pending = false;
};

// Room for the next read of answer bytes (doubling: a long line is copied O(log n) times).
void reserve_answer(Proc& p) {
  if (p.acap - p.alen >= kAnswerChunk / 2) return;
  size_t cap = std::max(p.acap * 2, p.alen + kAnswerChunk);
  auto nb = std::make_unique<char[]>(cap);
  if (p.alen) std::memcpy(nb.get(), p.abuf.get(), p.alen);
  p.abuf = std::move(nb);
  p.acap = cap;
}

bool same_processes(const config::HandlerConfig& a, const config::HandlerConfig& b) {
  return a.name == b.name && a.argv == b.argv && a.env == b.env && a.inherit_env == b.inherit_env &&
         a.processes == b.processes && a.per_process == b.per_process && a.timeout == b.timeout &&
         a.kill_grace == b.kill_grace && a.start_timeout == b.start_timeout &&
         a.restart_initial == b.restart_initial && a.restart_max == b.restart_max;
}

class WorkerPool : public std::enable_shared_from_this<WorkerPool> {
 public:
  WorkerPool(const config::HandlerConfig& cfg, const config::QueueConfig& q, asio::io_context& io);
  ~WorkerPool();

  void start_blocking();  // throws
  void activate(metrics::Registry& r);
  void submit(Job& job);
  void stop();
  void abort_jobs();
  void retire();
  bool ready(std::string& reason) const;
  const config::HandlerConfig& cfg() const { return cfg_; }
  const std::string& queue() const { return queue_; }

 private:
  std::shared_ptr<Proc> spawn(unsigned slot, std::string& error);
  void handshake_blocking(Proc& p, steady_clock::time_point deadline);
  bool poll_once(Proc& p, int timeout_ms);  // false once the process exited
  void read_raw_log(Proc& p, LogStream& s, bool is_err);
  static void close_raw(Proc& p);
  void stop_blocking(Proc& p);
  void attach(const std::shared_ptr<Proc>& p);
  void send_hello(const std::shared_ptr<Proc>& p);
  void queue_write(const std::shared_ptr<Proc>& p, std::string_view text);
  void flush_writes(const std::shared_ptr<Proc>& p);
  void read_answers(const std::shared_ptr<Proc>& p);
  void on_answer_bytes(const std::shared_ptr<Proc>& p, size_t n);
  bool on_line(const std::shared_ptr<Proc>& p, std::string_view line);  // false: the process failed
  void read_log(const std::shared_ptr<Proc>& p, bool is_err);
  void log_bytes(Proc& p, bool is_err, bool at_eof);
  void log_line(Proc& p, bool is_err, std::string_view text);
  void wait_exit(const std::shared_ptr<Proc>& p);
  void on_exit(const std::shared_ptr<Proc>& p, const error_code& ec);
  void arm_life(const std::shared_ptr<Proc>& p, milliseconds after, void (WorkerPool::*fn)(const std::shared_ptr<Proc>&));
  void on_start_timeout(const std::shared_ptr<Proc>& p);
  void on_output_closed(const std::shared_ptr<Proc>& p);
  void on_grace_over(const std::shared_ptr<Proc>& p);
  void on_drain_over(const std::shared_ptr<Proc>& p);
  void arm_event_timer(const std::shared_ptr<Proc>& p);
  void on_event_timer(const std::shared_ptr<Proc>& p);
  void send(const std::shared_ptr<Proc>& p, Job& job);
  void dispatch_pending();
  void arm_pending_timer();
  void on_pending_timer();
  void fail(const std::shared_ptr<Proc>& p, RestartReason why, std::string detail);
  void close_input(const std::shared_ptr<Proc>& p);
  void schedule_restart(unsigned slot);
  void restart(unsigned slot);
  void maybe_finished(const std::shared_ptr<Proc>& p);
  void set_up(bool up);
  void in_flight_changed(double delta);

  config::HandlerConfig cfg_;  // a copy: the pool may outlive the config that made it
  std::string queue_;
  asio::io_context& io_;
  process::Spawner spawner_;
  std::string hello_;
  std::vector<std::unique_ptr<SlotState>> slots_;
  std::vector<std::shared_ptr<Proc>> closing_;  // replaced or failed, not yet reaped
  struct Pending {
    Job* job;
    steady_clock::time_point deadline;
  };
  std::deque<Pending> pending_;
  asio::steady_timer pending_timer_;
  bool pending_timer_armed_ = false;
  bool activated_ = false;
  bool stopping_ = false;
  metrics::Gauge* up_gauge_ = nullptr;
  metrics::Gauge* inflight_gauge_ = nullptr;
  std::array<metrics::Counter*, kReasons> restarts_{};
};

WorkerPool::WorkerPool(const config::HandlerConfig& cfg, const config::QueueConfig& q, asio::io_context& io)
    : cfg_(cfg), queue_(q.name), io_(io), spawner_(cfg), pending_timer_(io) {
  spawner_.set_configured(cfg);
  // Last: nothing in `env` may point the protocol elsewhere.
  spawner_.set("ER_WORKER_IN_FD", "3");
  spawner_.set("ER_WORKER_OUT_FD", "4");
  spawner_.set("ER_WORKER_PROTOCOL", std::to_string(kWorkerProtocol));
  hello_ = "{\"type\":\"hello\",\"protocol\":" + std::to_string(kWorkerProtocol) + ",\"handler\":";
  append_json_string(hello_, cfg.name);
  hello_ += ",\"queue\":";
  append_json_string(hello_, queue_);
  hello_ += ",\"concurrency\":" + std::to_string(cfg.per_process) + "}\n";
  for (unsigned i = 0; i < cfg.processes; ++i) {
    slots_.push_back(std::make_unique<SlotState>(io));
    slots_.back()->backoff = cfg.restart_initial;
  }
}

WorkerPool::~WorkerPool() {
  // Normally every process is gone by now (stop, retire); never leave one behind.
  auto kill_now = [](Proc& p) {
    if (!p.reaped && p.pid > 0) {
      process::signal_group(p.pid, SIGKILL);
      int st;
      process::reap_child(p.pid, &st, 0);
      p.reaped = true;
    }
    close_raw(p);
  };
  for (auto& s : slots_)
    if (s->proc) kill_now(*s->proc);
  for (auto& p : closing_) kill_now(*p);
}

void WorkerPool::close_raw(Proc& p) {
  process::close_fd(p.raw_in);
  process::close_fd(p.raw_ans);
  process::close_fd(p.raw_pidfd);
  process::close_fd(p.out.raw);
  process::close_fd(p.err.raw);
}

std::shared_ptr<Proc> WorkerPool::spawn(unsigned slot, std::string& error) {
  int in[2] = {-1, -1}, ans[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  int rc = process::make_pipe(in, kChildFdBase);
  if (rc == 0) rc = process::make_pipe(ans, kChildFdBase);
  if (rc == 0) rc = process::make_pipe(out, kChildFdBase);
  if (rc == 0) rc = process::make_pipe(err, kChildFdBase);
  pid_t pid = -1;
  if (rc == 0) rc = spawner_.spawn(pid, {{out[1], 1}, {err[1], 2}, {in[0], 3}, {ans[1], 4}}, nullptr);
  process::close_fd(in[0]);
  process::close_fd(ans[1]);
  process::close_fd(out[1]);
  process::close_fd(err[1]);
  if (rc != 0) {
    process::close_fd(in[1]);
    process::close_fd(ans[0]);
    process::close_fd(out[0]);
    process::close_fd(err[0]);
    error = "cannot start " + spawner_.program() + ": " + std::strerror(rc);
    return nullptr;
  }
  auto p = std::make_shared<Proc>(io_);
  p->slot = slot;
  p->pid = pid;
  p->pid_text = std::to_string(pid);
  p->raw_in = in[1];
  p->raw_ans = ans[0];
  p->out.raw = out[0];
  p->err.raw = err[0];
  p->raw_pidfd = ::pidfd_open(pid, 0);
  if (p->raw_pidfd < 0) {
    int e = errno;
    process::signal_group(pid, SIGKILL);
    int st;
    process::reap_child(pid, &st, 0);
    p->reaped = true;
    close_raw(*p);
    error = std::string("cannot watch the worker process: ") + std::strerror(e);
    return nullptr;
  }
  return p;
}

void WorkerPool::start_blocking() {
  // All start at once, so that N processes take start_timeout, not N times it.
  for (unsigned i = 0; i < slots_.size(); ++i) {
    std::string error;
    auto p = spawn(i, error);
    if (!p) throw std::runtime_error("worker handler '" + cfg_.name + "': " + error);
    slots_[i]->proc = p;
    // A hello is far below a pipe's buffer: this write does not wait for the worker.
    ssize_t w;
    do w = ::write(p->raw_in, hello_.data(), hello_.size());
    while (w < 0 && errno == EINTR);
  }
  auto deadline = steady_clock::now() + cfg_.start_timeout;
  for (auto& s : slots_) {
    handshake_blocking(*s->proc, deadline);
    s->proc->state = Proc::State::Up;
    s->proc->up_since = steady_clock::now();
  }
  log::info("worker handler started", {{"handler", cfg_.name}, {"processes", std::to_string(slots_.size())}});
}

void WorkerPool::read_raw_log(Proc& p, LogStream& s, bool is_err) {
  ssize_t n;
  do n = ::read(s.raw, s.buf.data() + s.have, s.buf.size() - s.have);
  while (n < 0 && errno == EINTR);
  if (n > 0) {
    s.have += static_cast<size_t>(n);
    log_bytes(p, is_err, false);
    return;
  }
  log_bytes(p, is_err, true);
  process::close_fd(s.raw);
}

// One poll over the answer pipe, the output pipes and the process.
bool WorkerPool::poll_once(Proc& p, int timeout_ms) {
  pollfd fds[4] = {{p.raw_ans, POLLIN, 0}, {p.out.raw, POLLIN, 0}, {p.err.raw, POLLIN, 0}, {p.raw_pidfd, POLLIN, 0}};
  int r = ::poll(fds, 4, timeout_ms);
  if (r <= 0) return true;
  if (fds[1].revents) read_raw_log(p, p.out, false);
  if (fds[2].revents) read_raw_log(p, p.err, true);
  if (fds[0].revents) {
    reserve_answer(p);
    ssize_t n;
    do n = ::read(p.raw_ans, p.abuf.get() + p.alen, p.acap - p.alen);
    while (n < 0 && errno == EINTR);
    if (n > 0) p.alen += static_cast<size_t>(n);
    else process::close_fd(p.raw_ans);
  }
  if (fds[3].revents) {
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(p.pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid != 0) {
      process::signal_group(p.pid, SIGKILL);
      int st = 0;
      process::reap_child(p.pid, &st, 0);
      p.reaped = true;
      while (p.out.raw >= 0) read_raw_log(p, p.out, false);  // what it wrote before it went
      while (p.err.raw >= 0) read_raw_log(p, p.err, true);
      p.tail.add(process::describe_status(st));
      return false;
    }
  }
  return true;
}

void WorkerPool::handshake_blocking(Proc& p, steady_clock::time_point deadline) {
  const std::string who = "worker handler '" + cfg_.name + "'";
  for (;;) {
    auto* nl = p.alen ? static_cast<char*>(std::memchr(p.abuf.get(), '\n', p.alen)) : nullptr;
    if (nl) break;
    if (p.alen > kMaxAnswerBytes) throw std::runtime_error(who + ": its first line is longer than 16 MiB");
    auto left = std::chrono::duration_cast<milliseconds>(deadline - steady_clock::now()).count();
    if (left <= 0)
      throw std::runtime_error(who + ": no ready within " + process::format_duration(cfg_.start_timeout) +
                               " (start_timeout) from " + spawner_.program());
    if (!poll_once(p, static_cast<int>(std::min<long long>(left, 100)))) {
      throw std::runtime_error(who + ": " + spawner_.program() + " ended before it was ready: " +
                               std::string(p.tail.text()));
    }
    if (p.raw_ans < 0) {
      // It closed fd 4 (e.g. not a worker at all): wait for its exit for the reason.
      while (poll_once(p, 100) && steady_clock::now() < deadline) {}
      throw std::runtime_error(who + ": " + spawner_.program() + " closed fd 4 without a ready" +
                               (p.tail.text().empty() ? std::string() : ": " + p.tail.text()));
    }
  }
  auto* nl = static_cast<char*>(std::memchr(p.abuf.get(), '\n', p.alen));
  std::string_view line(p.abuf.get(), static_cast<size_t>(nl - p.abuf.get()));
  WorkerAnswer a;
  std::string error;
  if (!parse_worker_answer(line, a, error)) throw std::runtime_error(who + ": bad first line: " + error);
  if (a.type != WorkerAnswer::Type::Ready)
    throw std::runtime_error(who + ": answered a result instead of ready");
  if (a.protocol != kWorkerProtocol)
    throw std::runtime_error(who + ": speaks protocol " + std::to_string(a.protocol) + ", the daemon speaks " +
                             std::to_string(kWorkerProtocol));
  size_t used = line.size() + 1;
  std::memmove(p.abuf.get(), p.abuf.get() + used, p.alen - used);
  p.alen -= used;
}

// Not activated (--check, a failed build or reload): end of input, then
// kill_grace, SIGTERM, kill_grace, SIGKILL, here and now.
void WorkerPool::stop_blocking(Proc& p) {
  process::close_fd(p.raw_in);
  auto wait = [&](milliseconds d) {
    auto deadline = steady_clock::now() + d;
    while (!p.reaped) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - steady_clock::now()).count();
      if (left <= 0) return;
      poll_once(p, static_cast<int>(std::min<long long>(left, 100)));
    }
  };
  wait(cfg_.kill_grace);
  if (!p.reaped) {
    process::signal_group(p.pid, SIGTERM);
    wait(cfg_.kill_grace);
  }
  if (!p.reaped) {
    process::signal_group(p.pid, SIGKILL);
    int st;
    process::reap_child(p.pid, &st, 0);
    p.reaped = true;
  }
  close_raw(p);
}

// The last handler using this pool is gone.
void WorkerPool::retire() {
  if (!activated_) {
    for (auto& s : slots_)
      if (s->proc) stop_blocking(*s->proc);
    return;
  }
  if (stopping_) return;
  asio::post(io_, [self = shared_from_this()] { self->stop(); });
}

void WorkerPool::activate(metrics::Registry& r) {
  auto& up = r.gauge("event_router_worker_processes_up", "Worker processes that finished their handshake and run.",
                     {"queue", "handler"});
  auto& inflight = r.gauge("event_router_worker_events_in_flight",
                           "Events sent to worker processes and not yet answered.", {"queue", "handler"});
  auto& restarts = r.counter("event_router_worker_restarts_total",
                             "Worker processes restarted, by reason (worker_exited, worker_timeout, protocol_error, "
                             "start_failed).",
                             {"queue", "handler", "reason"});
  up_gauge_ = &up.with({queue_, cfg_.name});
  inflight_gauge_ = &inflight.with({queue_, cfg_.name});
  for (int i = 0; i < kReasons; ++i) restarts_[i] = &restarts.with({queue_, cfg_.name, kReasonNames[i]});
  if (activated_) return;
  activated_ = true;
  for (auto& s : slots_) {
    if (!s->proc) continue;
    attach(s->proc);
    if (s->proc->state == Proc::State::Up) up_gauge_->inc();
  }
}

void WorkerPool::attach(const std::shared_ptr<Proc>& p) {
  error_code ec;
  // assign() takes ownership only on success; close_raw() closes what was not taken.
  auto take = [&](asio::posix::stream_descriptor& sd, int& fd) {
    if (ec) return;
    sd.assign(fd, ec);
    if (!ec) fd = -1;
  };
  take(p->pidfd, p->raw_pidfd);
  take(p->in, p->raw_in);
  take(p->ans, p->raw_ans);
  if (p->out.raw >= 0) take(p->out.sd, p->out.raw); else p->out.eof = true;
  if (p->err.raw >= 0) take(p->err.sd, p->err.raw); else p->err.eof = true;
  p->attached = true;
  if (ec) {
    // Cannot supervise it: kill and reap it now rather than leave it unwatched.
    close_raw(*p);
    process::signal_group(p->pid, SIGKILL);
    int st;
    process::reap_child(p->pid, &st, 0);
    p->reaped = true;
    p->out.eof = p->err.eof = true;
    fail(p, kStartFailed, "cannot watch the worker process: " + ec.message());
    return;
  }
  if (!p->out.eof) read_log(p, false);
  if (!p->err.eof) read_log(p, true);
  wait_exit(p);
  if (p->alen)
    on_answer_bytes(p, 0);  // bytes that came after the ready at startup (then reads on)
  else
    read_answers(p);
}

void WorkerPool::queue_write(const std::shared_ptr<Proc>& p, std::string_view text) {
  p->wpending += text;
  flush_writes(p);
}

void WorkerPool::flush_writes(const std::shared_ptr<Proc>& p) {
  if (p->writing || p->wpending.empty() || !p->in.is_open()) return;
  std::swap(p->wbusy, p->wpending);
  p->wpending.clear();
  p->writing = true;
  asio::async_write(p->in, asio::buffer(p->wbusy), [self = shared_from_this(), p](const error_code& ec, size_t) {
    p->writing = false;
    p->wbusy.clear();
    if (ec) {
      if (ec != asio::error::operation_aborted && (p->state == Proc::State::Up || p->state == Proc::State::Starting))
        self->fail(p, kExited, "closed its input (fd 3): " + ec.message());
      return;
    }
    self->flush_writes(p);
  });
}

void WorkerPool::send_hello(const std::shared_ptr<Proc>& p) { queue_write(p, hello_); }

void WorkerPool::read_answers(const std::shared_ptr<Proc>& p) {
  reserve_answer(*p);
  p->ans.async_read_some(asio::buffer(p->abuf.get() + p->alen, p->acap - p->alen),
                         [self = shared_from_this(), p](const error_code& ec, size_t n) {
                           if (ec) {
                             if (ec == asio::error::operation_aborted) return;
                             // EOF: it closed fd 4, most likely by exiting: on_exit says how,
                             // unless it goes on running without it.
                             if (p->state == Proc::State::Up || p->state == Proc::State::Starting)
                               self->arm_life(p, kDrainGrace, &WorkerPool::on_output_closed);
                             return;
                           }
                           self->on_answer_bytes(p, n);
                         });
}

void WorkerPool::on_answer_bytes(const std::shared_ptr<Proc>& p, size_t n) {
  p->alen += n;
  char* b = p->abuf.get();
  size_t start = 0;
  size_t from = p->ascan;
  while (from < p->alen) {
    auto* nl = static_cast<char*>(std::memchr(b + from, '\n', p->alen - from));
    if (!nl) break;
    size_t end = static_cast<size_t>(nl - b);
    if (!on_line(p, std::string_view(b + start, end - start))) return;
    start = from = end + 1;
  }
  if (start > 0) {
    std::memmove(b, b + start, p->alen - start);
    p->alen -= start;
  }
  p->ascan = p->alen;
  if (p->alen == 0 && p->acap > 4 * kAnswerChunk) {  // a big answer is past: do not keep its room
    p->abuf.reset();
    p->acap = 0;
  }
  if (p->alen > kMaxAnswerBytes) {
    fail(p, kProtocol, "a line longer than 16 MiB");
    return;
  }
  if (p->state != Proc::State::Dead) read_answers(p);
}

bool WorkerPool::on_line(const std::shared_ptr<Proc>& p, std::string_view line) {
  if (p->state == Proc::State::Dead) return false;
  WorkerAnswer a;
  std::string error;
  if (!parse_worker_answer(line, a, error)) {
    fail(p, kProtocol, std::move(error));
    return false;
  }
  if (a.type == WorkerAnswer::Type::Ready) {
    if (p->state == Proc::State::Closing) return true;  // stopped while it started: it is ending anyway
    if (p->state != Proc::State::Starting) {
      fail(p, kProtocol, "a second ready");
      return false;
    }
    if (a.protocol != kWorkerProtocol) {
      fail(p, kStartFailed, "speaks protocol " + std::to_string(a.protocol) + ", the daemon speaks " +
                                std::to_string(kWorkerProtocol));
      return false;
    }
    ++p->life_gen;
    p->life_timer.cancel();
    p->state = Proc::State::Up;
    p->up_since = steady_clock::now();
    set_up(true);
    log::info("worker process ready", {{"handler", cfg_.name}, {"pid", p->pid_text}});
    dispatch_pending();
    return true;
  }
  if (p->state == Proc::State::Starting) {
    fail(p, kProtocol, "a result before ready");
    return false;
  }
  auto it = p->inflight.find(a.id);
  if (it == p->inflight.end()) {
    fail(p, kProtocol, "answered id " + std::to_string(a.id) + ", which it does not have (unknown or answered)");
    return false;
  }
  Job* job = it->second;
  p->inflight.erase(it);
  in_flight_changed(-1);
  if (a.emit_ignored) {
    log::warn("worker gave emit with a verdict other than ack; ignored",
              {{"handler", cfg_.name}, {"pid", p->pid_text}});
  }
  job->finish(std::move(a.outcome));
  // A freed place: the oldest waiting event (a Closing process takes no new ones).
  if (!pending_.empty()) dispatch_pending();
  return p->state != Proc::State::Dead;
}

void WorkerPool::read_log(const std::shared_ptr<Proc>& p, bool is_err) {
  LogStream& s = is_err ? p->err : p->out;
  s.sd.async_read_some(asio::buffer(s.buf.data() + s.have, s.buf.size() - s.have),
                       [self = shared_from_this(), p, is_err](const error_code& ec, size_t n) {
                         LogStream& st = is_err ? p->err : p->out;
                         if (ec == asio::error::operation_aborted || st.eof) return;
                         if (!ec) {
                           st.have += n;
                           self->log_bytes(*p, is_err, false);
                           self->read_log(p, is_err);
                           return;
                         }
                         self->log_bytes(*p, is_err, true);
                         st.eof = true;
                         error_code ignored;
                         st.sd.close(ignored);
                         self->maybe_finished(p);
                       });
}

void WorkerPool::log_bytes(Proc& p, bool is_err, bool at_eof) {
  LogStream& s = is_err ? p.err : p.out;
  process::split_lines(s.buf.data(), s.have, kMaxLogLine, at_eof,
                       [&](std::string_view text, size_t) { log_line(p, is_err, text); });
}

void WorkerPool::log_line(Proc& p, bool is_err, std::string_view text) {
  if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
  if (text.empty()) return;
  if (is_err) {
    p.tail.add(text);
    log::warn(text, {{"handler", cfg_.name}, {"pid", p.pid_text}, {"stream", "stderr"}});
  } else {
    log::info(text, {{"handler", cfg_.name}, {"pid", p.pid_text}, {"stream", "stdout"}});
  }
}

void WorkerPool::wait_exit(const std::shared_ptr<Proc>& p) {
  p->pidfd.async_wait(asio::posix::descriptor_base::wait_read,
                      [self = shared_from_this(), p](const error_code& ec) { self->on_exit(p, ec); });
}

void WorkerPool::on_exit(const std::shared_ptr<Proc>& p, const error_code& ec) {
  if (ec == asio::error::operation_aborted || p->reaped) return;
  // Peek first (WNOWAIT): while the child is an unreaped zombie its group id
  // cannot be reused, and whatever it left in its group is killed.
  siginfo_t info{};
  int w;
  do w = ::waitid(P_PID, static_cast<id_t>(p->pid), &info, WEXITED | WNOHANG | WNOWAIT);
  while (w < 0 && errno == EINTR);
  if (w == 0 && info.si_pid == 0 && !ec) {
    wait_exit(p);  // not exited yet (spurious wakeup)
    return;
  }
  int st = 0;
  pid_t r;
  if (w == 0) {
    process::signal_group(p->pid, SIGKILL);
    r = process::reap_child(p->pid, &st, 0);
  } else {
    r = process::reap_child(p->pid, &st, WNOHANG);
  }
  p->reaped = true;
  error_code ignored;
  p->pidfd.close(ignored);
  std::string how = r > 0 ? process::describe_status(st) : std::string("exit status unavailable");
  if (p->state == Proc::State::Starting || p->state == Proc::State::Up) {
    std::string detail = "exited (" + how + ")";
    if (!p->tail.text().empty()) detail += "; stderr: " + p->tail.text();
    fail(p, p->state == Proc::State::Starting ? kStartFailed : kExited, std::move(detail));
  } else {
    if (p->state == Proc::State::Closing)
      log::info("worker process ended", {{"handler", cfg_.name}, {"pid", p->pid_text}, {"status", how}});
    p->state = Proc::State::Dead;
    // Unanswered at the end of a stop: retried (if the event is still live).
    auto jobs = std::move(p->inflight);
    p->inflight.clear();
    in_flight_changed(-static_cast<double>(jobs.size()));
    for (auto& [id, job] : jobs) job->finish(Outcome::retry("worker_exited", "ended during shutdown (" + how + ")"));
  }
  error_code ec2;
  p->in.close(ec2);
  if (p->out.eof && p->err.eof) {
    maybe_finished(p);
    return;
  }
  arm_life(p, kDrainGrace, &WorkerPool::on_drain_over);  // a grandchild may hold the pipes
}

void WorkerPool::arm_life(const std::shared_ptr<Proc>& p, milliseconds after,
                          void (WorkerPool::*fn)(const std::shared_ptr<Proc>&)) {
  unsigned gen = ++p->life_gen;
  p->life_timer.expires_after(after);
  p->life_timer.async_wait([self = shared_from_this(), p, gen, fn](const error_code& ec) {
    if (ec || gen != p->life_gen) return;
    ((*self).*fn)(p);
  });
}

void WorkerPool::on_output_closed(const std::shared_ptr<Proc>& p) {
  if (!p->reaped) fail(p, kExited, "closed its output (fd 4) and kept running");
}

void WorkerPool::on_start_timeout(const std::shared_ptr<Proc>& p) {
  if (p->state == Proc::State::Starting)
    fail(p, kStartFailed, "no ready within " + process::format_duration(cfg_.start_timeout) + " (start_timeout)");
}

// End of input was kill_grace ago: SIGTERM; kill_grace after that, SIGKILL.
void WorkerPool::on_grace_over(const std::shared_ptr<Proc>& p) {
  if (p->reaped) return;
  if (!p->term_sent) {
    log::warn("worker process still running after end of input and kill_grace; sending SIGTERM",
              {{"handler", cfg_.name}, {"pid", p->pid_text}});
    process::signal_group(p->pid, SIGTERM);
    p->term_sent = true;
    arm_life(p, cfg_.kill_grace, &WorkerPool::on_grace_over);
    return;
  }
  log::warn("worker process ignored SIGTERM; sending SIGKILL", {{"handler", cfg_.name}, {"pid", p->pid_text}});
  process::signal_group(p->pid, SIGKILL);
}

void WorkerPool::on_drain_over(const std::shared_ptr<Proc>& p) {
  error_code ec;
  if (!p->out.eof || !p->err.eof)
    log::warn("worker process exited but its output is still open (background process?); not waiting",
              {{"handler", cfg_.name}, {"pid", p->pid_text}});
  for (LogStream* s : {&p->out, &p->err}) {
    if (s->eof) continue;
    log_bytes(*p, s == &p->err, true);
    s->eof = true;
    s->sd.close(ec);
  }
  maybe_finished(p);
}

// Reaped and its output closed: nothing of it is pending any more.
void WorkerPool::maybe_finished(const std::shared_ptr<Proc>& p) {
  if (!p->reaped || !p->out.eof || !p->err.eof || p->finished) return;
  p->finished = true;
  error_code ec;
  p->ans.close(ec);
  p->in.close(ec);
  ++p->life_gen;
  p->life_timer.cancel();
  p->event_timer.cancel();
  closing_.erase(std::remove(closing_.begin(), closing_.end(), p), closing_.end());
  auto& s = *slots_[p->slot];
  if (s.proc == p) s.proc.reset();
}

void WorkerPool::set_up(bool up) {
  if (up_gauge_) up ? up_gauge_->inc() : up_gauge_->dec();
}

void WorkerPool::in_flight_changed(double delta) {
  if (inflight_gauge_) inflight_gauge_->inc(delta);
}

// Kills the process group now; every event it had is retried; a new process
// follows after the backoff.
void WorkerPool::fail(const std::shared_ptr<Proc>& p, RestartReason why, std::string detail) {
  if (p->state == Proc::State::Dead) return;
  const bool was_up = p->state == Proc::State::Up;
  const bool closing = p->state == Proc::State::Closing;
  p->state = Proc::State::Dead;
  if (was_up) set_up(false);
  if (!p->reaped) process::signal_group(p->pid, SIGKILL);
  error_code ec;
  p->in.close(ec);
  p->ans.close(ec);
  p->event_timer.cancel();
  p->event_timer_armed = false;
  p->order.clear();
  auto jobs = std::move(p->inflight);
  p->inflight.clear();
  in_flight_changed(-static_cast<double>(jobs.size()));
  log::warn(closing || stopping_ ? "worker process failed" : "worker process failed; restarting",
            {{"handler", cfg_.name}, {"pid", p->pid_text}, {"reason", kReasonNames[why]}, {"detail", detail},
             {"in_flight", std::to_string(jobs.size())}});
  auto& s = *slots_[p->slot];
  if (s.proc == p) {
    s.proc.reset();
    closing_.push_back(p);  // until reaped
    if (!stopping_) {
      if (restarts_[why]) restarts_[why]->inc();
      if (was_up && steady_clock::now() - p->up_since >= cfg_.restart_max) s.backoff = cfg_.restart_initial;
      schedule_restart(p->slot);
    }
  }
  // Last: finish() may come back here (a waiting event starts).
  const char* reason = why == kStartFailed ? kReasonNames[kExited] : kReasonNames[why];
  for (auto& [id, job] : jobs) job->finish(Outcome::retry(reason, detail));
  if (p->reaped) maybe_finished(p);
}

void WorkerPool::schedule_restart(unsigned slot) {
  auto& s = *slots_[slot];
  if (stopping_ || s.restart_pending) return;
  s.restart_pending = true;
  milliseconds delay = s.backoff;
  s.backoff = std::min(s.backoff * 2, cfg_.restart_max);
  log::info("worker process restarts after backoff",
            {{"handler", cfg_.name}, {"slot", std::to_string(slot)}, {"in", process::format_duration(delay)}});
  s.restart_timer.expires_after(delay);
  s.restart_timer.async_wait([self = shared_from_this(), slot](const error_code& ec) {
    self->slots_[slot]->restart_pending = false;
    if (ec || self->stopping_) return;
    self->restart(slot);
  });
}

void WorkerPool::restart(unsigned slot) {
  std::string error;
  auto p = spawn(slot, error);
  if (!p) {
    log::error("worker process cannot start", {{"handler", cfg_.name}, {"error", error}});
    if (restarts_[kStartFailed]) restarts_[kStartFailed]->inc();
    schedule_restart(slot);
    return;
  }
  slots_[slot]->proc = p;
  attach(p);
  if (p->state != Proc::State::Starting) return;
  send_hello(p);
  arm_life(p, cfg_.start_timeout, &WorkerPool::on_start_timeout);
}

void WorkerPool::submit(Job& job) {
  if (stopping_) {
    job.finish(Outcome::retry("worker_unavailable", "the worker handler is stopping"));
    return;
  }
  Proc* best = nullptr;
  std::shared_ptr<Proc> best_ref;
  for (auto& s : slots_) {
    Proc* p = s->proc.get();
    if (!p || p->state != Proc::State::Up || p->inflight.size() >= cfg_.per_process) continue;
    if (!best || p->inflight.size() < best->inflight.size()) {
      best = p;
      best_ref = s->proc;
    }
  }
  if (best && pending_.empty()) {
    send(best_ref, job);
    return;
  }
  pending_.push_back({&job, steady_clock::now() + cfg_.timeout});
  if (best) dispatch_pending();
  arm_pending_timer();
}

void WorkerPool::send(const std::shared_ptr<Proc>& p, Job& job) {
  if (job.stale()) {  // its channel is gone: the broker redelivers it anyway
    job.finish(Outcome::retry("worker_unavailable", "the event's channel closed before it was sent"));
    return;
  }
  uint64_t id = p->next_id++;
  p->inflight.emplace(id, &job);
  in_flight_changed(1);
  append_event_line(p->wpending, id, job.view());
  p->order.emplace_back(id, steady_clock::now() + cfg_.timeout);
  if (!p->event_timer_armed) arm_event_timer(p);
  flush_writes(p);
}

void WorkerPool::dispatch_pending() {
  while (!pending_.empty() && !stopping_) {
    std::shared_ptr<Proc> best;
    for (auto& s : slots_) {
      auto& p = s->proc;
      if (!p || p->state != Proc::State::Up || p->inflight.size() >= cfg_.per_process) continue;
      if (!best || p->inflight.size() < best->inflight.size()) best = p;
    }
    if (!best) return;
    Job* job = pending_.front().job;
    pending_.pop_front();
    send(best, *job);
  }
}

void WorkerPool::arm_pending_timer() {
  if (pending_timer_armed_ || pending_.empty() || stopping_) return;
  pending_timer_armed_ = true;
  pending_timer_.expires_at(pending_.front().deadline);
  pending_timer_.async_wait([self = shared_from_this()](const error_code& ec) {
    self->pending_timer_armed_ = false;
    if (ec || self->stopping_) return;
    self->on_pending_timer();
  });
}

// Events that waited `timeout` for a process: retried, not held forever.
void WorkerPool::on_pending_timer() {
  auto now = steady_clock::now();
  while (!pending_.empty() && pending_.front().deadline <= now) {
    Job* job = pending_.front().job;
    pending_.pop_front();
    job->finish(Outcome::retry("worker_unavailable",
                               "no worker process could take it within " + process::format_duration(cfg_.timeout)));
  }
  arm_pending_timer();
}

void WorkerPool::arm_event_timer(const std::shared_ptr<Proc>& p) {
  while (!p->order.empty() && !p->inflight.count(p->order.front().first)) p->order.pop_front();
  if (p->order.empty() || p->state == Proc::State::Dead) {
    p->event_timer_armed = false;
    return;
  }
  p->event_timer_armed = true;
  p->event_timer.expires_at(p->order.front().second);
  p->event_timer.async_wait([self = shared_from_this(), p](const error_code& ec) {
    if (ec) return;
    self->on_event_timer(p);
  });
}

void WorkerPool::on_event_timer(const std::shared_ptr<Proc>& p) {
  p->event_timer_armed = false;
  if (p->state == Proc::State::Dead) return;
  while (!p->order.empty() && !p->inflight.count(p->order.front().first)) p->order.pop_front();
  if (!p->order.empty() && p->order.front().second <= steady_clock::now()) {
    uint64_t id = p->order.front().first;
    fail(p, kTimeout, "event " + std::to_string(id) + " not answered within " + process::format_duration(cfg_.timeout));
    return;
  }
  arm_event_timer(p);
}

// End of input: a worker exits when it reads EOF on fd 3. In-flight answers are still read.
void WorkerPool::close_input(const std::shared_ptr<Proc>& p) {
  if (p->state != Proc::State::Up && p->state != Proc::State::Starting) return;
  if (p->state == Proc::State::Up) set_up(false);
  p->state = Proc::State::Closing;
  error_code ec;
  p->in.close(ec);  // by now nothing is waiting to be written (drained, or abandoned)
  if (p->inflight.empty()) {
    p->event_timer.cancel();
    p->event_timer_armed = false;
  }
  arm_life(p, cfg_.kill_grace, &WorkerPool::on_grace_over);
}

void WorkerPool::stop() {
  if (stopping_) return;
  stopping_ = true;
  pending_timer_.cancel();
  auto waiting = std::move(pending_);
  pending_.clear();
  for (auto& s : slots_) {
    s->restart_timer.cancel();
    if (s->proc) close_input(s->proc);
  }
  for (auto& w : waiting) w.job->finish(Outcome::retry("worker_unavailable", "the worker handler is stopping"));
}

void WorkerPool::abort_jobs() {
  // The shutdown deadline passed: these events are abandoned (not finished).
  size_t n = pending_.size();
  pending_.clear();
  for (auto& s : slots_) {
    if (!s->proc) continue;
    n += s->proc->inflight.size();
    in_flight_changed(-static_cast<double>(s->proc->inflight.size()));
    s->proc->inflight.clear();
  }
  if (n) log::warn("worker handler abandoned in-flight events", {{"handler", cfg_.name}, {"count", std::to_string(n)}});
}

bool WorkerPool::ready(std::string& reason) const {
  unsigned up = 0;
  for (auto& s : slots_)
    if (s->proc && s->proc->state == Proc::State::Up) ++up;
  if (up == slots_.size()) return true;
  reason = "worker handler '" + cfg_.name + "': " + std::to_string(slots_.size() - up) + " of " +
           std::to_string(slots_.size()) + " processes down";
  return false;
}

// Handlers of consecutive generations share one pool when nothing its
// processes depend on changed; the last one retires it.
struct PoolRef {
  std::shared_ptr<WorkerPool> pool;
  ~PoolRef() {
    if (pool) pool->retire();
  }
};

class WorkerHandler final : public Handler {
 public:
  WorkerHandler(const std::string& name, std::shared_ptr<PoolRef> ref) : Handler(name), ref_(std::move(ref)) {}
  void start(Job& job) override { ref_->pool->submit(job); }
  void abort_all() override { ref_->pool->abort_jobs(); }
  void activate(metrics::Registry& r) override { ref_->pool->activate(r); }
  void stop() override { ref_->pool->stop(); }
  bool ready(std::string& reason) const override { return ref_->pool->ready(reason); }
  const std::shared_ptr<PoolRef>& ref() const { return ref_; }

 private:
  std::shared_ptr<PoolRef> ref_;
};

}  // namespace

std::unique_ptr<Handler> make_worker_handler(const config::HandlerConfig& cfg, const config::QueueConfig& q,
                                             boost::asio::io_context& io, const Handler* previous) {
  if (const auto* prev = dynamic_cast<const WorkerHandler*>(previous)) {
    const auto& pool = *prev->ref()->pool;
    if (pool.queue() == q.name && same_processes(pool.cfg(), cfg)) {
      log::info("worker handler unchanged; its processes are kept", {{"handler", cfg.name}});
      return std::make_unique<WorkerHandler>(cfg.name, prev->ref());
    }
  }
  auto ref = std::make_shared<PoolRef>();
  auto pool = std::make_shared<WorkerPool>(cfg, q, io);
  pool->start_blocking();  // on failure, ~WorkerPool kills what it started
  ref->pool = std::move(pool);
  return std::make_unique<WorkerHandler>(cfg.name, std::move(ref));
}

}  // namespace er::dispatch
