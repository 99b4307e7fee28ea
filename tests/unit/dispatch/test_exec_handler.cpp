#include "dispatch/exec_handler.hpp"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

using namespace er::dispatch;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// The daemon ignores SIGPIPE in main; a child that does not read stdin must
// not kill the test process either.
const bool kSigpipeIgnored = [] {
  ::signal(SIGPIPE, SIG_IGN);
  return true;
}();

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "exec-test-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& p, const std::string& content, mode_t mode) {
  {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << content;
  }
  REQUIRE(::chmod(p.c_str(), mode) == 0);
}

// Redirects fd 2 (where er::log writes) into a file for the lifetime of the object.
class StderrCapture {
 public:
  StderrCapture() {
    path_ = (fs::temp_directory_path() / ("exec-test-log-" + std::to_string(::getpid()))).string();
    int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE(fd >= 0);
    saved_ = ::fcntl(2, F_DUPFD_CLOEXEC, 3);
    ::dup2(fd, 2);
    ::close(fd);
  }
  ~StderrCapture() { restore(); }
  std::string text() {
    restore();
    return text_;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    ::dup2(saved_, 2);
    ::close(saved_);
    saved_ = -1;
    text_ = read_file(path_);
    ::unlink(path_.c_str());
  }
  std::string path_;
  std::string text_;
  int saved_ = -1;
};

// Messages of log records carrying stream=<stream> (unquotes er::log's escaping).
std::vector<std::string> log_messages(const std::string& log, const std::string& stream) {
  std::vector<std::string> out;
  std::istringstream in(log);
  std::string rec;
  while (std::getline(in, rec)) {
    size_t p = rec.find(' ');
    if (p == std::string::npos) continue;
    p = rec.find(' ', p + 1);
    if (p == std::string::npos) continue;
    ++p;
    std::string msg;
    size_t rest;
    if (p < rec.size() && rec[p] == '"') {
      size_t i = p + 1;
      for (; i < rec.size() && rec[i] != '"'; ++i) {
        if (rec[i] == '\\' && i + 1 < rec.size()) {
          char c = rec[++i];
          msg += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
        } else {
          msg += rec[i];
        }
      }
      rest = i + 1;
    } else {
      rest = rec.find(' ', p);
      msg = rec.substr(p, rest == std::string::npos ? std::string::npos : rest - p);
    }
    if (rest == std::string::npos) continue;
    std::string fields = rec.substr(rest) + " ";
    if (fields.find(" stream=" + stream + " ") != std::string::npos) out.push_back(msg);
  }
  return out;
}

class TestJob : public Job {
 public:
  explicit TestJob(std::string body = {}) : body_(std::move(body)) {
    env_.event_id = "evt-1";
    env_.event_type = "order.created";
    env_.correlation_id = "corr-9";
    env_.aggregate_id = "agg-7";
    view_.body = body_;
    view_.routing_key = "orders.created";
    view_.exchange = "events";
    view_.queue = "orders";
    view_.envelope = &env_;
    view_.attempt = 3;
    view_.redelivered = true;
  }
  const EventView& view() const override { return view_; }
  EventView& mutable_view() { return view_; }
  void finish(Outcome o) override {
    ++finish_count;
    outcome = std::move(o);
  }

  int finish_count = 0;
  std::optional<Outcome> outcome;

 private:
  std::string body_;
  er::event::Envelope env_;
  EventView view_;
};

er::config::HandlerConfig make_cfg(std::vector<std::string> argv) {
  er::config::HandlerConfig cfg;
  cfg.name = "test-exec";
  cfg.kind = er::config::HandlerKind::Exec;
  cfg.argv = std::move(argv);
  cfg.timeout = 10s;
  cfg.kill_grace = 1s;
  return cfg;
}

std::vector<std::string> sh(const std::string& script, std::vector<std::string> args = {}) {
  std::vector<std::string> v{"/bin/sh", "-c", script, "sh"};
  v.insert(v.end(), args.begin(), args.end());
  return v;
}

bool no_children() {
  int st;
  pid_t r = ::waitpid(-1, &st, WNOHANG);
  return r == 0 || (r < 0 && errno == ECHILD);
}

// Runs one job on a fresh io_context until it finishes; returns elapsed time.
std::chrono::milliseconds run_job(const er::config::HandlerConfig& cfg, TestJob& job) {
  boost::asio::io_context io;
  auto h = make_exec_handler(cfg, io);
  auto t0 = std::chrono::steady_clock::now();
  h->start(job);
  while (job.finish_count == 0 && std::chrono::steady_clock::now() - t0 < 15s) {
    io.run_for(50ms);
    if (io.stopped()) io.restart();
  }
  auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  io.run_for(20ms);  // let cancelled operations complete
  return elapsed;
}

// Starts one job per attempt number first..last on `h` at once and runs `io`
// until every one has finished (or `limit` has passed).
std::vector<std::unique_ptr<TestJob>> run_jobs(Handler& h, boost::asio::io_context& io, uint32_t first,
                                               uint32_t last, std::chrono::seconds limit) {
  std::vector<std::unique_ptr<TestJob>> jobs;
  for (uint32_t i = first; i <= last; ++i) {
    jobs.push_back(std::make_unique<TestJob>("body"));
    jobs.back()->mutable_view().attempt = i;
  }
  for (auto& j : jobs) h.start(*j);
  auto t0 = std::chrono::steady_clock::now();
  while (std::any_of(jobs.begin(), jobs.end(), [](auto& j) { return j->finish_count == 0; }) &&
         std::chrono::steady_clock::now() - t0 < limit) {
    io.run_for(20ms);
  }
  return jobs;
}

}  // namespace

TEST_CASE("outcome_for_exit maps wait statuses", "[exec]") {
  SECTION("exit 0 is ack") {
    auto o = outcome_for_exit(W_EXITCODE(0, 0), false, "ignored");
    CHECK(o.verdict == Verdict::Ack);
    CHECK(o.detail.empty());
  }
  SECTION("75 is retry") {
    auto o = outcome_for_exit(W_EXITCODE(75, 0), false, "try later");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.reason == "handler_failed");
    CHECK(o.detail == "exit code 75 (EX_TEMPFAIL); stderr: try later");
  }
  SECTION("65 is dead-letter") {
    auto o = outcome_for_exit(W_EXITCODE(65, 0), false, "bad data");
    CHECK(o.verdict == Verdict::DeadLetter);
    CHECK(o.reason == "handler_failed");
    CHECK(o.detail == "exit code 65 (EX_DATAERR); stderr: bad data");
  }
  SECTION("other codes retry; empty tail omitted") {
    auto o = outcome_for_exit(W_EXITCODE(1, 0), false, "");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail == "exit code 1");
    o = outcome_for_exit(W_EXITCODE(255, 0), false, "x");
    CHECK(o.detail == "exit code 255; stderr: x");
  }
  SECTION("signals retry") {
    auto o = outcome_for_exit(W_EXITCODE(0, SIGKILL), false, "");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail == "killed by signal 9 (SIGKILL)");
    o = outcome_for_exit(SIGSEGV | WCOREFLAG, false, "oops");
    CHECK(o.detail == "killed by signal 11 (SIGSEGV) (core dumped); stderr: oops");
  }
  SECTION("timeouts retry whatever the status") {
    auto o = outcome_for_exit(W_EXITCODE(0, 0), true, "");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail.rfind("timed out", 0) == 0);
    o = outcome_for_exit(W_EXITCODE(65, 0), true, "late");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail.find("; stderr: late") != std::string::npos);
  }
}

TEST_CASE("exit codes of real processes", "[exec]") {
  struct Case { int code; Verdict verdict; const char* detail; };
  for (auto c : {Case{0, Verdict::Ack, ""}, Case{75, Verdict::Retry, "exit code 75 (EX_TEMPFAIL)"},
                 Case{65, Verdict::DeadLetter, "exit code 65 (EX_DATAERR)"}, Case{1, Verdict::Retry, "exit code 1"}}) {
    CAPTURE(c.code);
    TestJob job;
    run_job(make_cfg(sh("exit " + std::to_string(c.code))), job);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == c.verdict);
    CHECK(job.outcome->detail == c.detail);
    CHECK(no_children());
  }
}

TEST_CASE("death by signal is retried", "[exec]") {
  TestJob job;
  run_job(make_cfg(sh("kill -9 $$")), job);
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Retry);
  CHECK(job.outcome->detail == "killed by signal 9 (SIGKILL)");
  CHECK(no_children());
}

TEST_CASE("stderr tail goes into the detail", "[exec]") {
  StderrCapture cap;
  TestJob job;
  run_job(make_cfg(sh("i=1; while [ $i -le 20 ]; do echo line$i >&2; i=$((i+1)); done; exit 1")), job);
  std::string log = cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->detail ==
        "exit code 1; stderr: line11\nline12\nline13\nline14\nline15\nline16\nline17\nline18\nline19\nline20");
  auto lines = log_messages(log, "stderr");
  REQUIRE(lines.size() == 20);
  CHECK(lines.front() == "line1");
  CHECK(log.find(" warn line1 handler=test-exec event_id=evt-1 stream=stderr") != std::string::npos);
  CHECK(no_children());
}

TEST_CASE("long stderr lines keep the tail bounded", "[exec]") {
  StderrCapture cap;
  TestJob job;
  run_job(make_cfg(sh("head -c 3000 /dev/zero | tr '\\0' a >&2; echo >&2; echo last >&2; exit 2")), job);
  cap.text();
  REQUIRE(job.finish_count == 1);
  const std::string& d = job.outcome->detail;
  CHECK(d.rfind("exit code 2; stderr: ", 0) == 0);
  CHECK(d.size() <= std::string("exit code 2; stderr: ").size() + 2048);
  CHECK(d.size() >= 2000);
  CHECK(d.substr(d.size() - 5) == "\nlast");
}

TEST_CASE("stdout lines are logged with handler fields", "[exec]") {
  StderrCapture cap;
  TestJob job;
  run_job(make_cfg(sh("echo hello; echo 'with space'; printf 'no newline'")), job);
  std::string log = cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  CHECK(log.find(" info hello handler=test-exec event_id=evt-1 stream=stdout") != std::string::npos);
  CHECK(log_messages(log, "stdout") == std::vector<std::string>{"hello", "with space", "no newline"});
}

TEST_CASE("timeout sends SIGTERM to the group", "[exec][timeout]") {
  StderrCapture cap;
  auto cfg = make_cfg({"/bin/sleep", "10"});
  cfg.timeout = 200ms;
  cfg.kill_grace = 200ms;
  TestJob job;
  auto elapsed = run_job(cfg, job);
  cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Retry);
  CHECK(job.outcome->detail == "timed out after 200ms (sent SIGTERM)");
  CHECK(elapsed >= 200ms);
  CHECK(elapsed < 1500ms);
  CHECK(no_children());
}

TEST_CASE("timeout escalates to SIGKILL when TERM is ignored", "[exec][timeout]") {
  StderrCapture cap;
  // sleep inherits the ignored TERM, so only SIGKILL ends the group.
  auto cfg = make_cfg(sh("trap '' TERM; sleep 10"));
  cfg.timeout = 200ms;
  cfg.kill_grace = 200ms;
  TestJob job;
  auto elapsed = run_job(cfg, job);
  cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Retry);
  CHECK(job.outcome->detail == "timed out after 200ms (sent SIGTERM, then SIGKILL)");
  CHECK(elapsed >= 400ms);
  CHECK(elapsed < 2000ms);
  CHECK(no_children());
}

TEST_CASE("a child trapping TERM can clean up before the grace", "[exec][timeout]") {
  StderrCapture cap;
  auto cfg = make_cfg(sh("trap 'echo cleaning up >&2; exit 3' TERM; sleep 10 & wait"));
  cfg.timeout = 200ms;
  cfg.kill_grace = 2s;
  TestJob job;
  auto elapsed = run_job(cfg, job);
  cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->detail == "timed out after 200ms (sent SIGTERM); stderr: cleaning up");
  CHECK(elapsed < 1500ms);
  CHECK(no_children());
}

TEST_CASE("the body arrives intact on stdin", "[exec][stdin]") {
  TempDir dir;
  std::string out = dir.file("body");
  std::string big(200 * 1024, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 7 + i / 251) % 256);

  SECTION("200 KB through a shell") {
    TestJob job(big);
    run_job(make_cfg(sh("cat > \"$1\"", {out})), job);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
    CHECK(read_file(out) == big);
  }
  SECTION("200 KB straight into a program") {
    TestJob job(big);
    run_job(make_cfg({"/bin/dd", "of=" + out, "status=none"}), job);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
    CHECK(read_file(out) == big);
  }
  SECTION("small body") {
    TestJob job("{\"event_type\":\"x\"}");
    run_job(make_cfg(sh("cat > \"$1\"", {out})), job);
    REQUIRE(job.finish_count == 1);
    CHECK(read_file(out) == "{\"event_type\":\"x\"}");
  }
  SECTION("empty body gives immediate EOF") {
    TestJob job;
    run_job(make_cfg(sh("cat > \"$1\"", {out})), job);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
    CHECK(read_file(out).empty());
  }
  SECTION("a child that ignores stdin is fine (EPIPE)") {
    TestJob job(big);
    run_job(make_cfg(sh("exit 0")), job);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
  }
  CHECK(no_children());
}

TEST_CASE("the environment is exactly the documented set", "[exec][env]") {
  ::setenv("ER_TEST_SECRET", "hunter2", 1);
  ::setenv("ER_TEST_INHERIT", "passed", 1);
  ::setenv("ER_TEST_INHERIT2", "from-daemon", 1);
  ::unsetenv("ER_TEST_UNSET");
  auto cfg = make_cfg({"/usr/bin/env"});
  cfg.inherit_env = {"ER_TEST_INHERIT", "ER_TEST_INHERIT2", "ER_TEST_UNSET"};
  cfg.env = {{"ER_TEST_INHERIT2", "override"}, {"HANDLER_VAR", "a b=c"}};

  StderrCapture cap;
  TestJob job;
  run_job(cfg, job);
  std::string log = cap.text();
  ::unsetenv("ER_TEST_SECRET");
  ::unsetenv("ER_TEST_INHERIT");
  ::unsetenv("ER_TEST_INHERIT2");
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);

  std::map<std::string, std::string> got;
  for (const auto& l : log_messages(log, "stdout")) {
    auto eq = l.find('=');
    REQUIRE(eq != std::string::npos);
    CHECK(got.count(l.substr(0, eq)) == 0);  // no duplicates
    got[l.substr(0, eq)] = l.substr(eq + 1);
  }
  const char* path = std::getenv("PATH");
  std::map<std::string, std::string> want{
      {"PATH", path ? path : "/usr/local/bin:/usr/bin:/bin"},
      {"EVENT_TYPE", "order.created"},
      {"EVENT_ID", "evt-1"},
      {"CORRELATION_ID", "corr-9"},
      {"AGGREGATE_ID", "agg-7"},
      {"ROUTING_KEY", "orders.created"},
      {"QUEUE", "orders"},
      {"ATTEMPT", "3"},
      {"REDELIVERED", "1"},
      {"ER_TEST_INHERIT", "passed"},
      {"ER_TEST_INHERIT2", "override"},
      {"HANDLER_VAR", "a b=c"},
      {"ER_EMIT_FD", "3"},
  };
  CHECK(got == want);
  CHECK(got.count("ER_TEST_SECRET") == 0);
}

TEST_CASE("scripts with a shebang run and see the event", "[exec][env]") {
  TempDir dir;
  std::string script = dir.file("handler.sh");
  std::string out = dir.file("out");
  write_file(script, "#!/bin/sh\necho \"$EVENT_TYPE $ATTEMPT $REDELIVERED $QUEUE\" > \"$1\"\n", 0755);
  TestJob job;
  run_job(make_cfg({script, out}), job);
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  CHECK(read_file(out) == "order.created 3 1 orders\n");
}

TEST_CASE("no daemon fd leaks into the child", "[exec][fd]") {
  int leaky = ::open("/dev/null", O_RDONLY);  // deliberately without O_CLOEXEC
  REQUIRE(leaky >= 3);
  StderrCapture cap;
  TestJob job;
  run_job(make_cfg({"/bin/ls", "/proc/self/fd"}), job);
  std::string log = cap.text();
  ::close(leaky);
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  // 0,1,2, the emit pipe (3) and the directory fd ls itself opened.
  CHECK(log_messages(log, "stdout") == std::vector<std::string>{"0", "1", "2", "3", "4"});
}

TEST_CASE("output truncation", "[exec][output]") {
  SECTION("1 MB of short lines on stdout") {
    StderrCapture cap;
    TestJob job;
    run_job(make_cfg(sh("yes 0123456789abcdef | head -c 1000000")), job);
    std::string log = cap.text();
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
    auto lines = log_messages(log, "stdout");
    REQUIRE(lines.size() == 65536 / 17 + 1);
    CHECK(lines.back() == "output truncated: " + std::to_string(1000000 - 65536 / 17 * 17) + " bytes dropped");
  }
  SECTION("1 MB as one line on stdout and stderr") {
    StderrCapture cap;
    TestJob job;
    run_job(make_cfg(sh("head -c 1000000 /dev/zero | tr '\\0' x; head -c 1000000 /dev/zero | tr '\\0' y >&2; exit 1")),
            job);
    std::string log = cap.text();
    REQUIRE(job.finish_count == 1);
    auto out = log_messages(log, "stdout");
    REQUIRE(out.size() == 17);  // 16 chunks of 4 KiB, then the note
    CHECK(out[0] == std::string(4096, 'x'));
    CHECK(out[16] == "output truncated: 934464 bytes dropped");
    auto err = log_messages(log, "stderr");
    REQUIRE(err.size() == 17);
    CHECK(err[16] == "output truncated: 934464 bytes dropped");
    CHECK(job.outcome->detail.rfind("exit code 1; stderr: yyyy", 0) == 0);
    CHECK(job.outcome->detail.size() <= 2048 + 64);
  }
  CHECK(no_children());
}

TEST_CASE("a grandchild holding the pipes does not stall the finish", "[exec]") {
  TempDir dir;
  std::string pidfile = dir.file("pid");
  TestJob job;
  StderrCapture cap;
  auto elapsed = run_job(make_cfg(sh("sleep 5 & echo $! > \"$1\"; echo started", {pidfile})), job);
  cap.text();
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  CHECK(elapsed < 1000ms);
  CHECK(no_children());
  pid_t grandchild = std::atoi(read_file(pidfile).c_str());
  if (grandchild > 0) ::kill(grandchild, SIGKILL);
}

TEST_CASE("a program missing at run time is retried", "[exec][spawn]") {
  TempDir dir;
  std::string script = dir.file("gone.sh");
  write_file(script, "#!/bin/sh\nexit 0\n", 0755);
  StderrCapture cap;
  boost::asio::io_context io;
  auto h = make_exec_handler(make_cfg({script}), io);

  SECTION("removed") {
    ::unlink(script.c_str());
    TestJob job;
    h->start(job);  // fails inline
    io.run_for(20ms);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Retry);
    CHECK(job.outcome->reason == "handler_failed");
    CHECK(job.outcome->detail == "cannot start " + script + ": No such file or directory");
  }
  SECTION("not executable") {
    ::chmod(script.c_str(), 0644);
    TestJob job;
    h->start(job);
    io.run_for(20ms);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->verdict == Verdict::Retry);
    CHECK(job.outcome->detail == "cannot start " + script + ": Permission denied");
  }
  CHECK(no_children());
}

TEST_CASE("abort_all kills running children without finishing", "[exec][abort]") {
  StderrCapture cap;
  boost::asio::io_context io;
  auto h = make_exec_handler(make_cfg({"/bin/sleep", "30"}), io);
  TestJob a, b;
  h->start(a);
  h->start(b);
  io.run_for(100ms);
  auto t0 = std::chrono::steady_clock::now();
  h->abort_all();
  auto elapsed = std::chrono::steady_clock::now() - t0;
  CHECK(elapsed < 1s);
  CHECK(no_children());
  io.run_for(50ms);  // cancelled operations complete without finishing
  CHECK(a.finish_count == 0);
  CHECK(b.finish_count == 0);

  // The handler remains usable afterwards.
  TestJob c;
  io.restart();
  h->start(c);
  io.run_for(50ms);
  CHECK(c.finish_count == 0);
  h.reset();  // destroying it with a running child kills and reaps it
  CHECK(c.finish_count == 0);
  CHECK(no_children());
  cap.text();
}

TEST_CASE("concurrent runs each finish once", "[exec]") {
  boost::asio::io_context io;
  auto h = make_exec_handler(make_cfg(sh("sleep 0.$(( $ATTEMPT % 3 )); exit $ATTEMPT")), io);
  auto jobs = run_jobs(*h, io, 0, 7, 10s);
  for (int i = 0; i < 8; ++i) {
    CAPTURE(i);
    REQUIRE(jobs[i]->finish_count == 1);
    if (i == 0)
      CHECK(jobs[i]->outcome->verdict == Verdict::Ack);
    else
      CHECK(jobs[i]->outcome->detail == "exit code " + std::to_string(i));
  }
  CHECK(no_children());
}

TEST_CASE("the child starts with clean signals in its own process group", "[exec][signals]") {
  // Mimic the daemon: signals blocked, SIGPIPE (and here SIGINT) ignored.
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGTERM);
  sigaddset(&block, SIGHUP);
  REQUIRE(::sigprocmask(SIG_BLOCK, &block, &old) == 0);
  auto old_int = ::signal(SIGINT, SIG_IGN);

  // Read by the exec'd programs themselves (a shell would change its own mask while waiting).
  StderrCapture cap;
  TestJob sigs, stat;
  run_job(make_cfg({"/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"}), sigs);
  run_job(make_cfg({"/bin/cat", "/proc/self/stat"}), stat);
  std::string log = cap.text();
  ::signal(SIGINT, old_int);
  ::sigprocmask(SIG_SETMASK, &old, nullptr);

  REQUIRE(sigs.finish_count == 1);
  REQUIRE(stat.finish_count == 1);
  auto lines = log_messages(log, "stdout");
  REQUIRE(lines.size() == 3);
  CHECK(lines[0] == "SigBlk:\t0000000000000000");
  CHECK(lines[1] == "SigIgn:\t0000000000000000");
  // /proc/self/stat: "pid (comm) state ppid pgrp ..."
  std::istringstream fields(lines[2]);
  std::string pid, comm, state, ppid, pgrp;
  fields >> pid >> comm >> state >> ppid >> pgrp;
  CHECK(pid == pgrp);
  CHECK(pgrp != std::to_string(::getpgrp()));
}

size_t open_fds() {
  return static_cast<size_t>(std::distance(fs::directory_iterator("/proc/self/fd"), fs::directory_iterator()));
}

TEST_CASE("sequential runs on one handler do not share state or leak fds", "[exec]") {
  StderrCapture cap;
  boost::asio::io_context io;
  size_t fds_before = 0;  // taken after the first run: asio opens its reactor's fds lazily
  auto h = make_exec_handler(make_cfg(sh("printf \"partial-$ATTEMPT\" >&2; exit 1")), io);
  for (uint32_t i = 1; i <= 3; ++i) {
    TestJob job;
    job.mutable_view().attempt = i;
    io.restart();  // run_for() left it stopped when it ran out of work
    h->start(job);
    auto t0 = std::chrono::steady_clock::now();
    while (job.finish_count == 0 && std::chrono::steady_clock::now() - t0 < 10s) io.run_for(20ms);
    REQUIRE(job.finish_count == 1);
    CHECK(job.outcome->detail == "exit code 1; stderr: partial-" + std::to_string(i));
    if (i == 1) {
      io.restart();
      io.poll();
      fds_before = open_fds();
    }
  }
  io.restart();
  io.poll();
  CHECK(open_fds() == fds_before);
  cap.text();
  CHECK(no_children());
}

// --- processes a handler leaves behind -------------------------------------

bool process_exists(pid_t pid) { return fs::exists("/proc/" + std::to_string(pid)); }

// Children of this process in state Z, from /proc/<pid>/stat: "pid (comm) S ppid ...".
std::vector<pid_t> zombie_children() {
  std::vector<pid_t> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::string stat = read_file("/proc/" + name + "/stat");
    size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 1));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (state == 'Z' && ppid == ::getpid()) out.push_back(std::atoi(name.c_str()));
  }
  return out;
}

// Like the daemon: orphans are reparented to this process, and reaped by an
// OrphanReaper on the loop. Undone at the end so other tests are unaffected.
struct Subreaper {
  Subreaper() { REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0); }
  ~Subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 0); }
};

TEST_CASE("a background process the handler leaves behind is killed and reaped", "[exec][orphans]") {
  Subreaper subreaper;
  TempDir dir;
  std::string pidfile = dir.file("pid");
  StderrCapture cap;
  boost::asio::io_context io;
  er::dispatch::OrphanReaper reaper(io);
  auto cfg = make_cfg(sh("sleep 30 & echo $! > \"$1\"; exit 0", {pidfile}));
  auto h = make_exec_handler(cfg, io);
  TestJob job;
  h->start(job);
  auto t0 = std::chrono::steady_clock::now();
  while (job.finish_count == 0 && std::chrono::steady_clock::now() - t0 < 10s) io.run_for(20ms);
  REQUIRE(job.finish_count == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  pid_t grandchild = std::atoi(read_file(pidfile).c_str());
  REQUIRE(grandchild > 0);
  // Gone (killed and reaped: no /proc entry, not even a zombie) within the grace.
  auto t1 = std::chrono::steady_clock::now();
  while (process_exists(grandchild) && std::chrono::steady_clock::now() - t1 < cfg.kill_grace) io.run_for(20ms);
  bool gone = !process_exists(grandchild);
  CHECK(gone);
  CHECK(zombie_children().empty());
  cap.text();
  if (!gone) {  // the old behaviour: do not leave it running
    ::kill(grandchild, SIGKILL);
    ::waitpid(grandchild, nullptr, 0);
  }
}

TEST_CASE("the orphan reaper never takes a handler's own exit status", "[exec][orphans]") {
  // Orphans that escaped the group kill (setsid) exit while the handlers'
  // own children exit: each handler must still get its child's exit code.
  Subreaper subreaper;
  StderrCapture cap;
  boost::asio::io_context io;
  er::dispatch::OrphanReaper reaper(io);
  auto h = make_exec_handler(
      make_cfg(sh("setsid sleep 0.0$(( $ATTEMPT % 7 )) & setsid sleep 0.0$(( $ATTEMPT % 5 )) & "
                  "sleep 0.0$(( $ATTEMPT % 3 )); exit $ATTEMPT")),
      io);
  constexpr int kJobs = 24;
  auto jobs = run_jobs(*h, io, 1, kJobs, 20s);
  for (int i = 1; i <= kJobs; ++i) {
    CAPTURE(i);
    REQUIRE(jobs[i - 1]->finish_count == 1);
    CHECK(jobs[i - 1]->outcome->detail == "exit code " + std::to_string(i));
  }
  // The escaped sleeps (at most 0.06 s) are reaped as they exit.
  auto t1 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t1 < 500ms) io.run_for(20ms);
  CHECK(zombie_children().empty());
  CHECK(no_children());
  cap.text();
}

// One run of a shell script; its outcome.
Outcome run_script(const std::string& script) {
  TestJob job;
  run_job(make_cfg(sh(script)), job);
  REQUIRE(job.finish_count == 1);
  return *job.outcome;
}

TEST_CASE("emits: NDJSON on fd 3, counted only with exit 0", "[exec][emit]") {
  // In order; blank lines skipped; a last line without newline counts.
  Outcome o = run_script(R"(printf '{"event_type":"a"}\n\n  \r\n{"event_type":"b"}\r\nlast' >&$ER_EMIT_FD)");
  CHECK(o.verdict == Verdict::Ack);
  CHECK(o.emits == std::vector<std::string>{R"({"event_type":"a"})", R"({"event_type":"b"})", "last"});

  // A program that fails after emitting: nothing is emitted.
  o = run_script(R"(echo '{"event_type":"a"}' >&3; exit 75)");
  CHECK(o.verdict == Verdict::Retry);
  CHECK(o.emits.empty());

  // Over the caps (lines, bytes in one line): emit_invalid, and the program is
  // never blocked on a full pipe.
  o = run_script("yes '{}' | head -n 200000 >&3");
  CHECK((o.verdict == Verdict::DeadLetter && o.reason == "emit_invalid"));
  CHECK(o.detail == "more than 1000 emitted events on fd 3");
  CHECK(o.emits.empty());
  o = run_script(R"(head -c 20000000 /dev/zero | tr '\0' x >&3)");
  CHECK((o.verdict == Verdict::DeadLetter && o.reason == "emit_invalid"));
  CHECK(o.detail == "more than 16777216 bytes of emitted events on fd 3");

  // A program that closes fd 3 at once is fine.
  o = run_script("exec 3>&-; echo done");
  CHECK(o.verdict == Verdict::Ack);
  CHECK(o.emits.empty());
}
