#include <catch2/catch.hpp>

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dispatch/plugin_handler.hpp"
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
                                        const std::string& json = "{}") {
  er::config::HandlerConfig c;
  c.name = name;
  c.kind = er::config::HandlerKind::Plugin;
  c.plugin_path = path;
  c.plugin_config_json = json;
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
                     " supports none of the ABI versions 1 (it answered -1)");
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
