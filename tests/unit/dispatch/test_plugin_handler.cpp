#include <catch2/catch.hpp>

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <future>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dispatch/plugin_handler.hpp"
#include "event_router/plugin.h"
#include "util/log.hpp"

using namespace er::dispatch;
namespace asio = boost::asio;

namespace {

// Test-only plugins: tests/plugins/NAME.c -> ER_TEST_PLUGIN_DIR/NAME.so.
std::string test_plugin(const std::string& name) { return std::string(ER_TEST_PLUGIN_DIR) + "/" + name + ".so"; }
// Example plugins: plugins/NAME/NAME_plugin.c -> ER_PLUGIN_BUILD_DIR/libNAME_plugin.so.
std::string example_plugin(const std::string& name) {
  return std::string(ER_PLUGIN_BUILD_DIR) + "/lib" + name + "_plugin.so";
}

er::config::HandlerConfig plugin_config(const std::string& name, const std::string& path,
                                        const std::string& json = "{}",
                                        std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  er::config::HandlerConfig c;
  c.name = name;
  c.kind = er::config::HandlerKind::Plugin;
  c.plugin_path = path;
  c.plugin_config_json = json;
  c.timeout = timeout;
  return c;
}

struct TestJob : Job {
  EventView v;
  std::optional<Outcome> outcome;
  int finishes = 0;
  std::thread::id finish_thread;

  explicit TestJob(std::string_view body) { v.body = body; }
  const EventView& view() const override { return v; }
  void finish(Outcome o) override {
    ++finishes;
    finish_thread = std::this_thread::get_id();
    outcome = std::move(o);
  }
};

struct Fixture {
  asio::io_context io;
  asio::thread_pool pool{2};
  ~Fixture() { pool.join(); }

  std::unique_ptr<Handler> load(const std::string& path, const std::string& json = "{}",
                                const std::string& name = "h") {
    return make_plugin_handler(plugin_config(name, path, json), io, pool);
  }

  // Runs the loop until `done()` or 10 s; the guard keeps run_for() from
  // returning at once while events wait for a plugin's own thread.
  template <typename Pred>
  bool run_until(Pred done) {
    auto guard = asio::make_work_guard(io);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      io.restart();
      io.run_for(std::chrono::milliseconds(5));
    }
    return done();
  }
  // Runs the loop for `d` (for "nothing more happens" checks).
  void run_for(std::chrono::milliseconds d) {
    auto guard = asio::make_work_guard(io);
    io.restart();
    io.run_for(d);
  }

  // Runs one event through a NONBLOCKING plugin: finished inside start().
  Outcome run_inline(Handler& h, std::string_view body) {
    TestJob job(body);
    h.start(job);
    REQUIRE(job.finishes == 1);
    return *job.outcome;
  }
};

std::string load_error(Fixture& f, const std::string& path, const std::string& json = "{}") {
  try {
    f.load(path, json, "billing");
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  FAIL("no exception for " << path);
  return {};
}

// Captures what er::log writes to stderr.
class StderrCapture {
 public:
  StderrCapture() {
    char name[] = "/tmp/er-test-stderr-XXXXXX";
    fd_ = mkstemp(name);
    unlink(name);
    saved_ = dup(STDERR_FILENO);
    dup2(fd_, STDERR_FILENO);
  }
  ~StderrCapture() { restore(); }
  std::string text() {
    restore();
    std::string out;
    char buf[4096];
    lseek(fd_, 0, SEEK_SET);
    for (ssize_t n; (n = read(fd_, buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
    return out;
  }

 private:
  void restore() {
    if (saved_ >= 0) {
      dup2(saved_, STDERR_FILENO);
      close(saved_);
      saved_ = -1;
    }
  }
  int fd_ = -1;
  int saved_ = -1;
};

}  // namespace

TEST_CASE("plugin: verdict mapping", "[plugin]") {
  Fixture f;
  auto h = f.load(test_plugin("verdict_plugin"));
  CHECK(h->name() == "h");
  CHECK(h->max_concurrency() == ~0u);  // CONCURRENT

  SECTION("ack") {
    auto o = f.run_inline(*h, "ack");
    CHECK(o.verdict == Verdict::Ack);
    CHECK(o.reason.empty());
  }
  SECTION("retry with a delay and a reason") {
    auto o = f.run_inline(*h, "retry");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.reason == "handler_failed");
    CHECK(o.detail == "downstream busy");
    CHECK(o.retry_delay == std::chrono::milliseconds(1500));
  }
  SECTION("retry without a reason") {
    auto o = f.run_inline(*h, "retry-silent");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail == "plugin asked to retry");
    CHECK(o.retry_delay == std::chrono::milliseconds(0));
  }
  SECTION("dead letter") {
    auto o = f.run_inline(*h, "dead");
    CHECK(o.verdict == Verdict::DeadLetter);
    CHECK(o.reason == "handler_failed");
    CHECK(o.detail == "bad speaker");
  }
  SECTION("dead letter without a reason") {
    auto o = f.run_inline(*h, "dead-silent");
    CHECK(o.verdict == Verdict::DeadLetter);
    CHECK(o.detail == "plugin rejected the event");
  }
  SECTION("non-zero return") {
    auto o = f.run_inline(*h, "fail");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.reason == "handler_failed");
    CHECK(o.detail == "plugin returned 7");
  }
  SECTION("unknown verdict") {
    auto o = f.run_inline(*h, "unknown");
    CHECK(o.verdict == Verdict::Retry);
    CHECK(o.detail == "plugin returned unknown verdict 42");
  }
  SECTION("a reason filling all 512 bytes without a NUL") {
    auto o = f.run_inline(*h, "full");
    CHECK(o.verdict == Verdict::DeadLetter);
    CHECK(o.detail == std::string(512, 'x'));
  }
}

TEST_CASE("plugin: verdict names", "[plugin]") {
  CHECK(std::string(verdict_name(Verdict::Ack)) == "ack");
  CHECK(std::string(verdict_name(Verdict::Retry)) == "retry");
  CHECK(std::string(verdict_name(Verdict::DeadLetter)) == "dead-letter");
}

TEST_CASE("plugin: config JSON reaches init", "[plugin]") {
  Fixture f;
  auto h = f.load(test_plugin("verdict_plugin"), R"({"api_key":"k-1","n":[1,2]})");
  auto o = f.run_inline(*h, "config");
  CHECK(o.detail == R"(config={"api_key":"k-1","n":[1,2]})");

  auto empty = f.load(test_plugin("verdict_plugin"), "");
  CHECK(f.run_inline(*empty, "config").detail == "config={}");
}

TEST_CASE("plugin: the event view reaches the plugin", "[plugin]") {
  Fixture f;
  auto h = f.load(test_plugin("verdict_plugin"));
  er::event::Envelope env;
  env.event_type = "speaker.onboarded";
  env.event_id = "e-1";
  env.correlation_id = "c-1";
  env.aggregate_id = "a-1";
  env.aggregate_type = "Speaker";
  TestJob job("fields");
  job.v.routing_key = "speaker.onboarded";
  job.v.exchange = "events";
  job.v.queue = "speakers";
  job.v.envelope = &env;
  job.v.attempt = 3;
  job.v.redelivered = true;
  h->start(job);
  REQUIRE(job.finishes == 1);
  CHECK(job.outcome->detail ==
        "type=speaker.onboarded id=e-1 corr=c-1 agg=Speaker/a-1 rk=speaker.onboarded ex=events q=speakers "
        "attempt=3 redelivered=1 size_ok=1");

  TestJob bare("fields");  // no envelope: absent fields have len 0
  h->start(bare);
  CHECK(bare.outcome->detail == "type= id= corr= agg=/ rk= ex= q= attempt=1 redelivered=0 size_ok=1");
}

TEST_CASE("plugin: cleanup runs when the handler is destroyed", "[plugin]") {
  // Keep our own reference so the library (and its counter) stays loaded.
  void* dl = dlopen(test_plugin("verdict_plugin").c_str(), RTLD_NOW | RTLD_LOCAL);
  REQUIRE(dl != nullptr);
  auto live = reinterpret_cast<int (*)()>(dlsym(dl, "verdict_plugin_live"));
  REQUIRE(live != nullptr);
  int before = live();
  {
    Fixture f;
    auto a = f.load(test_plugin("verdict_plugin"));
    auto b = f.load(test_plugin("verdict_plugin"));  // one library, two instances
    CHECK(live() == before + 2);
    a.reset();
    CHECK(live() == before + 1);
  }
  CHECK(live() == before);
  dlclose(dl);
}

TEST_CASE("plugin: load errors are clear", "[plugin]") {
  Fixture f;
  SECTION("missing file names the path") {
    std::string path = "/nonexistent/dir/nope_plugin.so";
    auto msg = load_error(f, path);
    CHECK_THAT(msg, Catch::StartsWith("handler 'billing': cannot load plugin /nonexistent/dir/nope_plugin.so: "));
    CHECK_THAT(msg, Catch::Contains("No such file or directory"));
  }
  SECTION("not a shared library") {
    char name[] = "/tmp/er-test-not-a-plugin-XXXXXX";
    int fd = mkstemp(name);
    REQUIRE(write(fd, "hello", 5) == 5);
    close(fd);
    auto msg = load_error(f, name);
    unlink(name);
    CHECK_THAT(msg, Catch::StartsWith(std::string("handler 'billing': cannot load plugin ") + name + ": "));
  }
  SECTION("unresolved symbol fails at load time (RTLD_NOW)") {
    auto msg = load_error(f, test_plugin("unresolved_plugin"));
    CHECK_THAT(msg, Catch::StartsWith("handler 'billing': cannot load plugin " + test_plugin("unresolved_plugin")));
    CHECK_THAT(msg, Catch::Contains("er_test_function_nobody_defines"));
  }
  SECTION("missing symbol") {
    auto msg = load_error(f, test_plugin("missing_symbol_plugin"));
    CHECK(msg == "handler 'billing': plugin " + test_plugin("missing_symbol_plugin") +
                     " does not export er_plugin_cleanup");
  }
  SECTION("no common ABI version") {
    auto msg = load_error(f, test_plugin("bad_version_plugin"));
    CHECK(msg == "handler 'billing': plugin " + test_plugin("bad_version_plugin") +
                     " supports none of the ABI versions 2, 1 (it answered -1)");
  }
  SECTION("init fails with the plugin's message") {
    auto msg = load_error(f, test_plugin("init_fail_plugin"));
    CHECK(msg == "handler 'billing': plugin " + test_plugin("init_fail_plugin") +
                     " failed to initialize (returned 3): missing api_key");
    // The same plugin starts once it is configured.
    auto h = f.load(test_plugin("init_fail_plugin"), R"({"api_key":"x"})");
    CHECK(f.run_inline(*h, "{}").verdict == Verdict::Ack);
  }
}

TEST_CASE("plugin: blocking plugins run on the pool, finish on the loop", "[plugin]") {
  Fixture f;
  auto h = f.load(test_plugin("blocking_plugin"));
  CHECK(h->max_concurrency() == 1u);  // not CONCURRENT

  std::vector<std::unique_ptr<TestJob>> jobs;
  for (int i = 0; i < 4; ++i) jobs.push_back(std::make_unique<TestJob>(i == 0 ? "tid" : "ack"));
  for (auto& j : jobs) h->start(*j);
  for (auto& j : jobs) CHECK(j->finishes == 0);  // nothing finished inside start()

  f.pool.join();  // every call done and its finish() posted to the loop...
  for (auto& j : jobs) CHECK(j->finishes == 0);  // ...but not yet run
  f.io.run();
  for (auto& j : jobs) {
    CHECK(j->finishes == 1);
    CHECK(j->finish_thread == std::this_thread::get_id());
  }
  REQUIRE(jobs[0]->outcome->verdict == Verdict::Retry);
  CHECK(jobs[0]->outcome->detail != "tid=" + std::to_string(static_cast<unsigned long>(pthread_self())));
  CHECK(jobs[1]->outcome->verdict == Verdict::Ack);

  // Even with 2 pool threads and 4 jobs at once, a non-CONCURRENT instance
  // never runs two calls at a time.
  void* dl = dlopen(test_plugin("blocking_plugin").c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  REQUIRE(dl != nullptr);
  auto overlap = reinterpret_cast<int (*)()>(dlsym(dl, "blocking_plugin_max_overlap"));
  REQUIRE(overlap != nullptr);
  CHECK(overlap() == 1);
  dlclose(dl);
}

TEST_CASE("plugin: abort_all drops outcomes of running calls", "[plugin]") {
  Fixture f;
  auto h = f.load(test_plugin("blocking_plugin"));
  TestJob job("ack");
  h->start(job);
  h->abort_all();
  TestJob after("ack");  // started after the abort: handled normally
  h->start(after);
  for (int i = 0; i < 200 && after.finishes == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // run() returns when idle
    f.io.restart();
    f.io.run();
  }
  CHECK(after.finishes == 1);
  f.pool.join();  // the aborted call itself still completes...
  f.io.run();
  CHECK(job.finishes == 0);  // ...but its outcome is dropped
}

TEST_CASE("plugin: example log plugin", "[plugin]") {
  Fixture f;
  er::log::set_level(er::log::Level::Info);
  er::event::Envelope env;
  env.event_type = "speaker.onboarded";
  env.event_id = "e-1";
  env.correlation_id = "c-1";
  TestJob job(R"({"event_type":"speaker.onboarded"})");
  job.v.routing_key = "speaker.onboarded";
  job.v.envelope = &env;
  job.v.attempt = 2;

  SECTION("with a prefix") {
    auto h = f.load(example_plugin("log"), R"({"level": 1, "prefix" : "billing \"eu\""})", "audit");
    CHECK(h->max_concurrency() == ~0u);
    StderrCapture cap;
    h->start(job);
    std::string out = cap.text();
    REQUIRE(job.finishes == 1);
    CHECK(job.outcome->verdict == Verdict::Ack);
    CHECK_THAT(out, Catch::Contains(" info \"billing \\\"eu\\\" handled speaker.onboarded id=e-1 "
                                    "correlation_id=c-1 routing_key=speaker.onboarded attempt=2\" handler=audit\n"));
  }
  SECTION("default prefix, absent fields") {
    auto h = f.load(example_plugin("log"), "{}", "audit");
    env.correlation_id.clear();
    StderrCapture cap;
    h->start(job);
    std::string out = cap.text();
    CHECK(job.outcome->verdict == Verdict::Ack);
    CHECK_THAT(out, Catch::Contains("\"event handled speaker.onboarded id=e-1 correlation_id=- "
                                    "routing_key=speaker.onboarded attempt=2\" handler=audit"));
  }
  SECTION("a prefix that is not a string is refused") {
    CHECK_THROWS_WITH(f.load(example_plugin("log"), R"({"prefix": 5})", "audit"),
                      Catch::Contains("failed to initialize (returned 1): config: \"prefix\" must be a string"));
  }
}

TEST_CASE("plugin: example noop plugin", "[plugin]") {
  Fixture f;
  auto h = f.load(example_plugin("noop"));
  CHECK(h->max_concurrency() == ~0u);
  CHECK(f.run_inline(*h, "anything").verdict == Verdict::Ack);
}

// ---- ABI version 2: asynchronous completion and emit ----

namespace {

// The async test plugin's last return codes (tests/plugins/async_plugin.c).
struct Codes {
  int second_complete, emit, emit_after_complete, completions, handle_calls;
};
Codes codes() {
  void* dl = dlopen(test_plugin("async_plugin").c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  REQUIRE(dl != nullptr);
  auto fn = reinterpret_cast<void (*)(int*)>(dlsym(dl, "async_plugin_codes"));
  REQUIRE(fn != nullptr);
  int c[5];
  fn(c);
  dlclose(dl);
  return {c[0], c[1], c[2], c[3], c[4]};
}

std::unique_ptr<Handler> load_async(Fixture& f, bool nonblocking,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  return make_plugin_handler(
      plugin_config("async", test_plugin("async_plugin"), nonblocking ? R"({"nonblocking":1})" : "{}", timeout),
      f.io, f.pool);
}

}  // namespace

TEST_CASE("plugin v2: completion from the plugin's own thread, every verdict", "[plugin][v2]") {
  Fixture f;
  bool nonblocking = GENERATE(false, true);
  auto h = load_async(f, nonblocking);
  CHECK(h->max_concurrency() == ~0u);
  TestJob ack(R"({"delay_ms":30})");
  TestJob retry(R"({"delay_ms":10,"verdict":"retry"})");
  TestJob dead(R"({"verdict":"dead_letter"})");
  for (TestJob* j : {&ack, &retry, &dead}) h->start(*j);
  for (TestJob* j : {&ack, &retry, &dead}) CHECK(j->finishes == 0);  // pending, not finished in start()
  REQUIRE(f.run_until([&] { return ack.finishes && retry.finishes && dead.finishes; }));
  for (TestJob* j : {&ack, &retry, &dead}) {
    CHECK(j->finishes == 1);
    CHECK(j->finish_thread == std::this_thread::get_id());  // always on the loop
  }
  CHECK(ack.outcome->verdict == Verdict::Ack);
  CHECK(retry.outcome->verdict == Verdict::Retry);
  CHECK(retry.outcome->detail == "async retry");
  CHECK(retry.outcome->retry_delay == std::chrono::milliseconds(1000));
  CHECK(dead.outcome->verdict == Verdict::DeadLetter);
  CHECK(dead.outcome->detail == "async reject");
}

TEST_CASE("plugin v2: a verdict returned from handle() still works", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, true);
  auto o = f.run_inline(*h, R"({"sync":1,"verdict":"dead_letter"})");
  CHECK(o.verdict == Verdict::DeadLetter);
  CHECK(o.emits.empty());
}

TEST_CASE("plugin v2: emits reach Outcome.emits, with an ack only", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, false);
  TestJob ack(R"({"emit":3,"delay_ms":5})");
  TestJob retry(R"({"emit":2,"verdict":"retry"})");
  TestJob sync(R"({"emit":2,"sync":1})");
  for (TestJob* j : {&ack, &retry, &sync}) h->start(*j);
  REQUIRE(f.run_until([&] { return ack.finishes && retry.finishes && sync.finishes; }));
  REQUIRE(ack.outcome->verdict == Verdict::Ack);
  // Compact: the plugin's spaces are gone.
  CHECK(ack.outcome->emits == std::vector<std::string>{R"({"event_type":"follow.up","payload":{"n":0}})",
                                                       R"({"event_type":"follow.up","payload":{"n":1}})",
                                                       R"({"event_type":"follow.up","payload":{"n":2}})"});
  CHECK(retry.outcome->verdict == Verdict::Retry);
  CHECK(retry.outcome->emits.empty());  // emits count with an ack only
  CHECK(sync.outcome->emits.size() == 2);
}

TEST_CASE("plugin v2: emit refuses what is not one valid follow-up object", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, true);
  auto emit = [&](const std::string& json) {
    auto o = f.run_inline(*h, "EMIT:" + json);
    CHECK(o.verdict == Verdict::Ack);
    return std::make_pair(codes().emit, o.emits);
  };
  for (const char* bad : {"", "[1]", "\"x\"", "{}", R"({"event_type":""})", R"({"event_type":5})",
                          R"({"event_type":"a"} {"event_type":"b"})", R"({"event_type":"a"}x)",
                          R"({"event_type":"a","payload":[1]})", R"({"event_type":"a","routing_key":7})",
                          R"({"event_type":"a","aggregate_id":null})", R"({"event_type":"a")", "\xff\xfe"}) {
    INFO(bad);
    auto [rc, emits] = emit(bad);
    CHECK(rc == ER_E_INVALID);
    CHECK(emits.empty());
  }
  auto [rc, emits] = emit(R"( {"event_type":"a.b","payload":{"k":[1,{"x":null}]},"aggregate_id":"d-1",)"
                          R"("aggregate_type":"Draft","routing_key":"rk","extra":true} )");
  CHECK(rc == ER_OK);
  CHECK(emits == std::vector<std::string>{R"({"event_type":"a.b","payload":{"k":[1,{"x":null}]},)"
                                          R"("aggregate_id":"d-1","aggregate_type":"Draft","routing_key":"rk",)"
                                          R"("extra":true})"});
  // Deep nesting is parsed without recursion.
  std::string deep = R"({"event_type":"a","payload":{"p":)" + std::string(100000, '[') + std::string(100000, ']') + "}}";
  CHECK(emit(deep).first == ER_OK);
}

TEST_CASE("plugin v2: at most 1000 emits per event", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, true);
  auto o = f.run_inline(*h, R"({"emit":1001,"sync":1})");
  CHECK(o.verdict == Verdict::Ack);
  CHECK(o.emits.size() == 1000);
  CHECK(codes().emit == ER_E_LIMIT);
}

TEST_CASE("plugin v2: double completion is refused, logged, harmless", "[plugin][v2]") {
  Fixture f;
  er::log::set_level(er::log::Level::Info);
  auto h = load_async(f, false);
  StderrCapture cap;
  TestJob job(R"({"double":1,"emit":1})");
  h->start(job);
  REQUIRE(f.run_until([&] { return job.finishes == 1 && codes().emit_after_complete != 0; }));
  f.run_for(std::chrono::milliseconds(50));
  std::string out = cap.text();
  CHECK(job.finishes == 1);
  CHECK(job.outcome->verdict == Verdict::Ack);
  CHECK(job.outcome->emits.size() == 1);
  CHECK(codes().second_complete == ER_E_HANDLE);
  CHECK(codes().emit_after_complete == ER_E_HANDLE);
  CHECK_THAT(out, Catch::Contains("plugin completed an event that is not pending"));
  CHECK_THAT(out, Catch::Contains("second completion returned 1"));
}

TEST_CASE("plugin v2: completing inside handle()", "[plugin][v2]") {
  Fixture f;
  bool nonblocking = GENERATE(false, true);
  auto h = load_async(f, nonblocking);
  // Completed, then ER_PENDING: finished once, and only after handle() returned.
  TestJob early(R"({"early":1,"verdict":"retry"})");
  // Completed and a verdict returned as well: the completion counts.
  TestJob both(R"({"both":1,"verdict":"dead_letter"})");
  h->start(early);
  h->start(both);
  REQUIRE(f.run_until([&] { return early.finishes && both.finishes; }));
  f.run_for(std::chrono::milliseconds(20));
  CHECK(early.finishes == 1);
  CHECK(early.outcome->verdict == Verdict::Retry);
  CHECK(both.finishes == 1);
  CHECK(both.outcome->verdict == Verdict::DeadLetter);
  CHECK(both.outcome->detail == "async reject");
}

TEST_CASE("plugin v2: a pending event times out; a late completion is refused", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, false, std::chrono::milliseconds(100));
  TestJob never(R"({"never":1})");
  TestJob late(R"({"delay_ms":1500})");  // well after the timeout, even on a loaded machine
  int completions = codes().completions;
  h->start(never);
  h->start(late);
  REQUIRE(f.run_until([&] { return never.finishes && late.finishes; }));
  for (TestJob* j : {&never, &late}) {
    CHECK(j->outcome->verdict == Verdict::Retry);
    CHECK(j->outcome->reason == "plugin_timeout");
    CHECK(j->outcome->detail == "not completed within 100ms");
  }
  // The late completion arrives after the timeout: refused, nothing finishes twice.
  REQUIRE(f.run_until([&] { return codes().completions > completions; }));
  f.run_for(std::chrono::milliseconds(20));
  CHECK(late.finishes == 1);
}

TEST_CASE("plugin v2: abort_all abandons pending events", "[plugin][v2]") {
  Fixture f;
  auto h = load_async(f, true);
  TestJob never(R"({"never":1})");
  TestJob soon(R"({"delay_ms":50})");
  int completions = codes().completions;
  h->start(never);
  h->start(soon);
  h->abort_all();
  REQUIRE(f.run_until([&] { return codes().completions > completions; }));  // the plugin completed `soon`...
  f.run_for(std::chrono::milliseconds(20));
  CHECK(soon.finishes == 0);  // ...but the event was abandoned: refused
  CHECK(never.finishes == 0);
  TestJob after(R"({"delay_ms":1})");  // the handler still works for new events
  h->start(after);
  REQUIRE(f.run_until([&] { return after.finishes == 1; }));
}

TEST_CASE("plugin v2: destroying the handler with events pending is safe", "[plugin][v2]") {
  Fixture f;
  TestJob job(R"({"delay_ms":30})");
  {
    auto h = load_async(f, false);
    h->start(job);
  }  // cleanup stops the plugin's thread; the event is abandoned
  f.run_for(std::chrono::milliseconds(100));
  CHECK(job.finishes == 0);
}

TEST_CASE("plugin v2: pending events hold no thread", "[plugin][v2]") {
  er::config::HandlerConfig cfg = plugin_config("async", test_plugin("async_plugin"));
  asio::io_context io;
  asio::thread_pool one{1};
  auto h = make_plugin_handler(cfg, io, one);
  int calls = codes().handle_calls;
  std::vector<std::unique_ptr<TestJob>> jobs;
  for (int i = 0; i < 50; ++i) jobs.push_back(std::make_unique<TestJob>(R"({"delay_ms":60000})"));
  for (auto& j : jobs) h->start(*j);
  // Every handle() call ran on the one pool thread and returned while all 50
  // events are still pending.
  std::promise<void> drained;
  asio::post(one, [&] { drained.set_value(); });
  drained.get_future().wait();
  CHECK(codes().handle_calls - calls == 50);
  io.restart();
  io.run_for(std::chrono::milliseconds(10));
  for (auto& j : jobs) CHECK(j->finishes == 0);
  h->abort_all();
  h.reset();
  one.join();
}

TEST_CASE("plugin v1: a plugin built against the version 1 header works unchanged", "[plugin][v1]") {
  Fixture f;
  bool nonblocking = GENERATE(false, true);
  auto h = f.load(test_plugin("v1_plugin"), nonblocking ? R"({"nonblocking":1})" : "{}");
  CHECK(h->max_concurrency() == ~0u);
  auto run = [&](std::string_view body) {
    TestJob job(body);
    h->start(job);
    REQUIRE(f.run_until([&] { return job.finishes == 1; }));
    return *job.outcome;
  };
  CHECK(run("ack").verdict == Verdict::Ack);
  auto r = run("retry");
  CHECK(r.verdict == Verdict::Retry);
  CHECK(r.detail == "v1 retry");
  CHECK(r.retry_delay == std::chrono::milliseconds(250));
  auto d = run("dead");
  CHECK(d.verdict == Verdict::DeadLetter);
  CHECK(d.detail == "v1 reject");
  // Version 2's ER_PENDING value is only an error code for a version 1 plugin.
  auto p = run("erpd");
  CHECK(p.verdict == Verdict::Retry);
  CHECK(p.detail == "plugin returned " + std::to_string(ER_PENDING));
  // It sees none of version 2: its reserved fields are all NULL.
  CHECK(run("view").detail == "host_reserved_null=1 event_reserved_null=1 sizes_ok=1");
}
