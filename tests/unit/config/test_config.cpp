#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "config/config.hpp"

// Same fallback as config.cpp, for builds that do not pass the macro.
#ifndef ER_PLUGIN_INSTALL_DIR
#define ER_PLUGIN_INSTALL_DIR "/usr/lib/event-router/plugins"
#endif

namespace fs = std::filesystem;
using namespace er::config;
using namespace std::chrono_literals;

namespace {

// Drops the newline after R"( so that line 1 is the first line of the YAML.
std::string Y(const char* text) { return text[0] == '\n' ? text + 1 : text; }

class EnvGuard {
 public:
  EnvGuard(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~EnvGuard() {
    if (old_)
      setenv(name_.c_str(), old_->c_str(), 1);
    else
      unsetenv(name_.c_str());
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// A scratch folder holding a fake plugin and a couple of programs.
struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/er-config-test-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
    file("plugins/libp.so", 0644);
    file("bin/tool", 0755, "#!/bin/sh\nexit 0\n");
    file("bin/noexec", 0644);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& rel, mode_t mode, const std::string& content = "") {
    std::string p = path + "/" + rel;
    fs::create_directories(fs::path(p).parent_path());
    std::ofstream(p) << content;
    REQUIRE(chmod(p.c_str(), mode) == 0);
    return p;
  }
};

std::string error_of(const std::string& yaml, const std::string& dir) {
  try {
    load_config_string(yaml, "t.yaml", dir);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_CASE("a complete config is parsed into the expected fields", "[config]") {
  TempDir tmp;
  EnvGuard url("ER_T_URL", nullptr);
  EnvGuard exch("ER_T_EXCHANGE", "custom.events");
  EnvGuard prefix("ER_T_PREFIX", "spk");
  Config c = load_config_string(Y(R"(
broker:
  url: ${ER_T_URL:-amqp://guest:guest@localhost:5672/}
  heartbeat: 0
exchange:
  name: ${ER_T_EXCHANGE:-draft-genie.events}
  type: fanout
queues:
  - name: speaker.events
    bindings: ["speaker.*", "#.urgent"]
    prefetch: 20
    unhandled: ack
    dead_letter_queue: speaker.dead
    handlers:
      - name: speaker-log
        events: ["speaker.*"]
        plugin: plugins/libp.so
        config: {prefix: "${ER_T_PREFIX}", n: 3, f: 1.5, on: true, nothing: null, q: "42", list: [1, "2", x]}
        concurrency: 4
      - name: speaker-default
        events: ["#"]
        plugin: ./plugins/../plugins/libp.so
  - name: draft.events
    bindings: ["draft.*"]
    handlers:
      - name: index-draft
        events: ["draft.ingested", "draft.*.done"]
        exec: [bin/tool, "--fast", "${ER_T_UNSET_ARG:-x y}"]
        timeout: 1.5
        kill_grace: 500ms
        env: {INDEX_DIR: /var/lib/drafts, B: "2"}
        inherit_env: [HOME, LANG]
shutdown_timeout: 0
workers: 8
log: {level: debug}
)"),
                                "router.yaml", tmp.path);

  CHECK(c.path == "router.yaml");
  CHECK(c.dir == tmp.path);
  CHECK(c.broker.url == "amqp://guest:guest@localhost:5672/");
  CHECK(c.broker.heartbeat == 0ms);
  CHECK(c.exchange.name == "custom.events");
  CHECK(c.exchange.type == "fanout");
  CHECK(c.shutdown_timeout == 0ms);
  CHECK(c.plugin_threads == 8);
  CHECK(c.log.level == LogLevel::Debug);
  REQUIRE(c.queues.size() == 2);

  const QueueConfig& q0 = c.queues[0];
  CHECK(q0.name == "speaker.events");
  CHECK(q0.mark.line == 8);
  CHECK(q0.mark.column == 5);
  CHECK(q0.bindings == std::vector<std::string>{"speaker.*", "#.urgent"});
  CHECK(q0.prefetch == 20);
  CHECK(q0.unhandled == Unhandled::Ack);
  CHECK(q0.dead_letter_queue == "speaker.dead");
  REQUIRE(q0.handlers.size() == 2);

  const HandlerConfig& h0 = q0.handlers[0];
  CHECK(h0.name == "speaker-log");
  CHECK(h0.mark.line == 14);
  CHECK(h0.mark.column == 9);
  CHECK(h0.kind == HandlerKind::Plugin);
  REQUIRE(h0.events.size() == 1);
  CHECK(h0.events[0].text() == "speaker.*");
  CHECK(h0.plugin_path == tmp.path + "/plugins/libp.so");
  CHECK(h0.plugin_config_json ==
        R"({"prefix":"spk","n":3,"f":1.5,"on":true,"nothing":null,"q":"42","list":[1,"2","x"]})");
  CHECK(h0.concurrency == 4);

  const HandlerConfig& h1 = q0.handlers[1];
  CHECK(h1.plugin_path == tmp.path + "/plugins/libp.so");  // lexically normalized
  CHECK(h1.plugin_config_json == "{}");
  CHECK(h1.concurrency == 20);  // the queue's prefetch
  CHECK(h1.events[0].matches("anything.at.all"));

  const QueueConfig& q1 = c.queues[1];
  CHECK(q1.prefetch == 10);
  CHECK(q1.unhandled == Unhandled::DeadLetter);
  CHECK(q1.dead_letter_queue == "draft.events.dlq");
  REQUIRE(q1.handlers.size() == 1);
  const HandlerConfig& h2 = q1.handlers[0];
  CHECK(h2.kind == HandlerKind::Exec);
  CHECK(h2.argv == std::vector<std::string>{tmp.path + "/bin/tool", "--fast", "x y"});
  CHECK(h2.timeout == 1500ms);
  CHECK(h2.kill_grace == 500ms);
  CHECK(h2.env == std::vector<std::pair<std::string, std::string>>{{"INDEX_DIR", "/var/lib/drafts"},
                                                                   {"B", "2"}});
  CHECK(h2.inherit_env == std::vector<std::string>{"HOME", "LANG"});
  CHECK(h2.concurrency == 10);
  REQUIRE(h2.events.size() == 2);
  CHECK(h2.events[1].matches("draft.x.done"));
}

TEST_CASE("defaults apply to a minimal config", "[config]") {
  TempDir tmp;
  Config c = load_config_string(Y(R"(
broker: {url: "amqp://localhost/"}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - {name: h, events: ["#"], exec: [bin/tool]}
)"),
                                "t.yaml", tmp.path);
  CHECK(c.broker.heartbeat == 30s);
  CHECK(c.exchange.type == "topic");
  CHECK(c.shutdown_timeout == 30s);
  CHECK(c.plugin_threads == 4);
  CHECK(c.log.level == LogLevel::Info);
  REQUIRE(c.queues.size() == 1);
  CHECK(c.queues[0].bindings.empty());
  CHECK(c.queues[0].prefetch == 10);
  CHECK(c.queues[0].unhandled == Unhandled::DeadLetter);
  CHECK(c.queues[0].dead_letter_queue == "q.dlq");
  const HandlerConfig& h = c.queues[0].handlers.at(0);
  CHECK(h.concurrency == 10);
  CHECK(h.timeout == 30s);
  CHECK(h.kill_grace == 5s);
  CHECK(h.env.empty());
  CHECK(h.inherit_env.empty());
}

TEST_CASE("load_config reads a file and resolves paths against its folder", "[config]") {
  TempDir tmp;
  std::string file = tmp.file("etc/router.yaml", 0644, Y(R"(
broker: {url: "amqp://localhost/"}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - {name: p, events: ["#"], plugin: ../plugins/libp.so}
      - {name: e, events: ["#"], exec: [../bin/tool, "a b"]}
)"));
  Config c = load_config(file);
  CHECK(c.path == file);
  CHECK(c.dir == tmp.path + "/etc");
  CHECK(c.queues[0].handlers[0].plugin_path == tmp.path + "/plugins/libp.so");
  CHECK(c.queues[0].handlers[1].argv == std::vector<std::string>{tmp.path + "/bin/tool", "a b"});
}

TEST_CASE("load_config reports files it cannot open", "[config]") {
  CHECK_THROWS_WITH(load_config("/nonexistent/router.yaml"),
                    "/nonexistent/router.yaml: cannot open: No such file or directory");
  TempDir tmp;
  CHECK_THROWS_WITH(load_config(tmp.path), tmp.path + ": cannot open: Is a directory");
  CHECK_THROWS_AS(load_config("/nonexistent/router.yaml"), ConfigError);
}

TEST_CASE("absolute plugin and exec paths are kept (normalized)", "[config]") {
  TempDir tmp;
  Config c = load_config_string(
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
      "      - {name: p, events: ['#'], plugin: " + tmp.path + "/plugins/./libp.so}\n"
      "      - {name: e, events: ['#'], exec: [" + tmp.path + "//bin/tool]}\n",
      "t.yaml", "/");
  CHECK(c.queues[0].handlers[0].plugin_path == tmp.path + "/plugins/libp.so");
  CHECK(c.queues[0].handlers[1].argv[0] == tmp.path + "/bin/tool");
}

TEST_CASE("bare exec names are searched in PATH", "[config]") {
  TempDir tmp;
  const char* yaml = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
                     "      - {name: e, events: ['#'], exec: [\"true\", x]}\n";
  SECTION("system PATH") {
    Config c = load_config_string(yaml, "t.yaml", tmp.path);
    const std::string& p = c.queues[0].handlers[0].argv[0];
    CHECK((p == "/usr/bin/true" || p == "/bin/true"));
    CHECK(c.queues[0].handlers[0].argv[1] == "x");
  }
  SECTION("non-executable candidates are skipped like execvp does") {
    tmp.file("a/true", 0644);
    tmp.file("b/true", 0755);
    EnvGuard path("PATH", (tmp.path + "/a:" + tmp.path + "/b").c_str());
    Config c = load_config_string(yaml, "t.yaml", "/");
    CHECK(c.queues[0].handlers[0].argv[0] == tmp.path + "/b/true");
  }
  SECTION("not found") {
    EnvGuard path("PATH", (tmp.path + "/empty").c_str());
    CHECK(error_of(yaml, tmp.path) ==
          "t.yaml:6:41: queues[0].handlers[0].exec[0]: program 'true' not found in PATH");
  }
}

TEST_CASE("bare plugin names are searched in plugin_search_dirs()", "[config]") {
  TempDir tmp;
  tmp.file("second/libbare.so", 0644);
  EnvGuard dirs("EVENT_ROUTER_PLUGIN_DIR", (tmp.path + "/first::" + tmp.path + "/second").c_str());

  std::vector<std::string> d = plugin_search_dirs();
  REQUIRE(d.size() == 4);
  CHECK(d[0] == tmp.path + "/first");
  CHECK(d[1] == tmp.path + "/second");
  CHECK(d[2] == (fs::read_symlink("/proc/self/exe").parent_path() / "plugins").string());
  CHECK(d[3] == ER_PLUGIN_INSTALL_DIR);

  const std::string head =
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
      "      - name: p\n        events: ['#']\n";
  Config c = load_config_string(head + "        plugin: libbare.so\n", "t.yaml", "/");
  CHECK(c.queues[0].handlers[0].plugin_path == tmp.path + "/second/libbare.so");

  CHECK(error_of(head + "        plugin: libnope.so\n", "/") ==
        "t.yaml:8:17: queues[0].handlers[0].plugin: plugin 'libnope.so' not found in " + d[0] +
            ", " + d[1] + ", " + d[2] + ", " + d[3] +
            " (set EVENT_ROUTER_PLUGIN_DIR or give a path)");
}

TEST_CASE("YAML syntax errors carry the parser's position", "[config][errors]") {
  CHECK(error_of("broker: {url: x}\nexchange: {name: ex}\nqueues: a: b\n", "/") ==
        "t.yaml:3:10: illegal map value");
  CHECK(error_of(Y(R"(
broker:
  url: x
  - y
)"),
                 "/") == "t.yaml:3:3: end of map not found");
}

TEST_CASE("the document itself must be a single mapping", "[config][errors]") {
  CHECK(error_of("", "/") ==
        "t.yaml:1:1: the file is empty; expected a mapping with 'broker', 'exchange' and 'queues'");
  CHECK(error_of("# only a comment\n", "/") ==
        "t.yaml:1:1: the file is empty; expected a mapping with 'broker', 'exchange' and 'queues'");
  CHECK(error_of("- a\n- b\n", "/") == "t.yaml:1:1: expected a mapping at the top level, got a list");
  CHECK(error_of("a: 1\n---\nb: 2\n", "/") == "t.yaml:1:1: expected a single YAML document, found 2");
}

TEST_CASE("missing required keys point at the parent mapping", "[config][errors]") {
  TempDir tmp;
  CHECK(error_of("exchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:1: missing required key 'broker'");
  CHECK(error_of("broker: {url: 'amqp://h'}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:1: missing required key 'exchange'");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\n", "/") ==
        "t.yaml:1:1: missing required key 'queues'");
  CHECK(error_of(Y(R"(
broker:
  heartbeat: 10s
exchange: {name: ex}
queues: [{name: q}]
)"),
                 "/") == "t.yaml:2:3: broker: missing required key 'url' (or 'urls')");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {type: topic}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:2:11: exchange: missing required key 'name'");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
  - bindings: ["a"]
)"),
                 "/") == "t.yaml:5:5: queues[1]: missing required key 'name'");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - events: ["a"]
        plugin: plugins/libp.so
)"),
                 tmp.path) == "t.yaml:6:9: queues[0].handlers[0]: missing required key 'name'");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - name: h
        plugin: plugins/libp.so
)"),
                 tmp.path) == "t.yaml:6:9: queues[0].handlers[0]: missing required key 'events'");
}

TEST_CASE("unknown keys are reported at every level", "[config][errors]") {
  TempDir tmp;
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nquues: []\n", "/") ==
        "t.yaml:3:1: unknown key 'quues' (did you mean 'queues'?)");
  CHECK(error_of("broker: {ulr: u}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:10: broker: unknown key 'ulr' (did you mean 'url'?)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex, durable: true}\nqueues: [{name: q}]\n",
                 "/") == "t.yaml:2:22: exchange: unknown key 'durable'");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    prefech: 5
)"),
                 "/") == "t.yaml:5:5: queues[0]: unknown key 'prefech' (did you mean 'prefetch'?)");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - name: a
        events: ["a"]
        plugin: plugins/libp.so
      - name: b
        evnts: ["b"]
        plugin: plugins/libp.so
)"),
                 tmp.path) ==
        "t.yaml:10:9: queues[0].handlers[1]: unknown key 'evnts' (did you mean 'events'?)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nlog: {levl: info}\n",
                 "/") == "t.yaml:4:7: log: unknown key 'levl' (did you mean 'level'?)");
}

TEST_CASE("duplicate keys in one mapping are rejected", "[config][errors]") {
  CHECK(error_of(Y(R"(
broker:
  url: a
  url: b
exchange: {name: ex}
queues: [{name: q}]
)"),
                 "/") == "t.yaml:3:3: broker: duplicate key 'url'");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nworkers: 1\nworkers: 2\n",
                 "/") == "t.yaml:5:1: duplicate key 'workers'");
}

TEST_CASE("wrong value types", "[config][errors]") {
  TempDir tmp;
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n";
  CHECK(error_of(head + "    prefetch: \"ten\"\n", "/") ==
        "t.yaml:5:15: queues[0].prefetch: expected an integer 1..65535, got 'ten'");
  CHECK(error_of(head + "    prefetch: [1]\n", "/") ==
        "t.yaml:5:15: queues[0].prefetch: expected an integer 1..65535, got a list");
  CHECK(error_of(head + "    bindings: \"speaker.*\"\n", "/") ==
        "t.yaml:5:15: queues[0].bindings: expected a list of topic patterns, got a scalar");
  CHECK(error_of(head + "    bindings:\n", "/") ==
        "t.yaml:5:5: queues[0].bindings: expected a list of topic patterns, got nothing");
  CHECK(error_of(head + "    handlers: {name: h}\n", "/") ==
        "t.yaml:5:15: queues[0].handlers: expected a list of handlers, got a mapping");
  CHECK(error_of(head + "    handlers: [h]\n", "/") ==
        "t.yaml:5:16: queues[0].handlers[0]: expected a mapping, got a scalar");
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: [a], exec: /bin/true}\n", "/") ==
        "t.yaml:6:38: queues[0].handlers[0].exec: expected a list of arguments, got a scalar");
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: a, exec: [bin/tool]}\n", tmp.path) ==
        "t.yaml:6:27: queues[0].handlers[0].events: expected a list of topic patterns, got a scalar");
  CHECK(error_of(head + "    name: [a]\n", "/") == "t.yaml:5:5: queues[0]: duplicate key 'name'");
  CHECK(error_of("broker: u\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:9: broker: expected a mapping, got a scalar");
  CHECK(error_of("broker: {url: [a]}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:15: broker.url: expected a string, got a list");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: {name: q}\n", "/") ==
        "t.yaml:3:9: queues: expected a list of queues, got a mapping");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nworkers: -1\n", "/") ==
        "t.yaml:4:10: workers: expected an integer 1..65535, got '-1'");
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: [a], exec: [bin/tool], env: {A: [1]}}\n",
                 tmp.path) ==
        "t.yaml:6:59: queues[0].handlers[0].env.A: expected a string value, got a list");
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: [a], exec: [bin/tool], inherit_env: HOME}\n",
                 tmp.path) ==
        "t.yaml:6:63: queues[0].handlers[0].inherit_env: expected a list of variable names, got a scalar");
}

TEST_CASE("numbers out of range", "[config][errors]") {
  TempDir tmp;
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n";
  CHECK(error_of(head + "    prefetch: 0\n", "/") == "t.yaml:5:15: queues[0].prefetch: 0 is out of range 1..65535");
  CHECK(error_of(head + "    prefetch: 65536\n", "/") ==
        "t.yaml:5:15: queues[0].prefetch: 65536 is out of range 1..65535");
  CHECK(load_config_string(head + "    prefetch: 65535\n", "t.yaml", "/").queues[0].prefetch == 65535);
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: [a], exec: [bin/tool], concurrency: 0}\n",
                 tmp.path) ==
        "t.yaml:6:63: queues[0].handlers[0].concurrency: 0 is out of range 1..65535");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nworkers: 0\n", "/") ==
        "t.yaml:4:10: workers: 0 is out of range 1..65535");
}

TEST_CASE("bad durations", "[config][errors]") {
  TempDir tmp;
  const std::string head =
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
      "      - name: h\n        events: [a]\n        exec: [bin/tool]\n";
  CHECK(error_of(head + "        timeout: 5x\n", tmp.path) ==
        "t.yaml:9:18: queues[0].handlers[0].timeout: invalid duration '5x': unknown unit 'x' (use ms, s, m or h)");
  CHECK(error_of(head + "        timeout: 0s\n", tmp.path) ==
        "t.yaml:9:18: queues[0].handlers[0].timeout: duration must be greater than 0");
  CHECK(error_of(head + "        kill_grace: -1s\n", tmp.path) ==
        "t.yaml:9:21: queues[0].handlers[0].kill_grace: negative duration '-1s'");
  CHECK(error_of("broker: {url: 'amqp://h', heartbeat: 1.5s}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:38: broker.heartbeat: heartbeat must be a whole number of seconds");
  CHECK(error_of("broker: {url: 'amqp://h', heartbeat: 65536}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:38: broker.heartbeat: heartbeat must be at most 65535s");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nshutdown_timeout: soon\n",
                 "/") ==
        "t.yaml:4:19: shutdown_timeout: invalid duration 'soon' (expected e.g. 500ms, 30s, 5m, 1h or seconds)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nshutdown_timeout: {a: 1}\n",
                 "/") == "t.yaml:4:19: shutdown_timeout: expected a duration, got a mapping");
}

TEST_CASE("bad topic patterns in bindings and events", "[config][errors]") {
  TempDir tmp;
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n";
  CHECK(error_of(head + "    bindings: [\"ok.*\", \"a..b\"]\n", "/") ==
        "t.yaml:5:24: queues[0].bindings[1]: invalid topic pattern 'a..b': empty word");
  CHECK(error_of(head + "    bindings:\n      - speaker.*\n      - speaker.x*\n", "/") ==
        "t.yaml:7:9: queues[0].bindings[1]: invalid topic pattern 'speaker.x*': '*' and '#' must be whole words");
  CHECK(error_of(head + "    handlers:\n      - name: h\n        events: [\"\"]\n        exec: [bin/tool]\n",
                 tmp.path) == "t.yaml:7:18: queues[0].handlers[0].events[0]: empty topic pattern");
  CHECK(error_of(head + "    handlers:\n      - name: h\n        events: []\n        exec: [bin/tool]\n",
                 tmp.path) ==
        "t.yaml:7:17: queues[0].handlers[0].events: at least one event pattern is required (use \"#\" for all)");
}

TEST_CASE("handler kinds: neither, both, misplaced keys", "[config][errors]") {
  TempDir tmp;
  const std::string head =
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
      "      - name: h\n        events: [a]\n";
  CHECK(error_of(head, tmp.path) ==
        "t.yaml:6:9: queues[0].handlers[0]: handler needs one of 'plugin', 'exec' and 'worker'");
  CHECK(error_of(head + "        plugin: plugins/libp.so\n        exec: [bin/tool]\n", tmp.path) ==
        "t.yaml:9:9: queues[0].handlers[0]: a handler takes one of 'plugin', 'exec' and 'worker'");
  CHECK(error_of(head + "        exec: [bin/tool]\n        worker: [bin/tool]\n", tmp.path) ==
        "t.yaml:9:9: queues[0].handlers[0]: a handler takes one of 'plugin', 'exec' and 'worker'");
  CHECK(error_of(head + "        exec: [bin/tool]\n        processes: 2\n", tmp.path) ==
        "t.yaml:9:9: queues[0].handlers[0]: 'processes' only applies to worker handlers");
  CHECK(error_of(head + "        plugin: plugins/libp.so\n        kill_grace: 5s\n", tmp.path) ==
        "t.yaml:9:9: queues[0].handlers[0]: 'kill_grace' only applies to exec and worker handlers");
  CHECK(error_of(head + "        exec: [bin/tool]\n        config: {a: 1}\n", tmp.path) ==
        "t.yaml:9:9: queues[0].handlers[0]: 'config' only applies to plugin handlers");
  CHECK(error_of(head + "        exec: []\n", tmp.path) ==
        "t.yaml:8:15: queues[0].handlers[0].exec: the argument list must not be empty");
}

TEST_CASE("plugin files and exec programs must exist", "[config][errors]") {
  TempDir tmp;
  fs::create_directories(tmp.path + "/dir");
  const std::string head =
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
      "      - name: h\n        events: [a]\n";
  CHECK(error_of(head + "        plugin: plugins/libmissing.so\n", tmp.path) ==
        "t.yaml:8:17: queues[0].handlers[0].plugin: plugin file '" + tmp.path +
            "/plugins/libmissing.so': No such file or directory");
  CHECK(error_of(head + "        plugin: ./plugins\n", tmp.path) ==
        "t.yaml:8:17: queues[0].handlers[0].plugin: plugin file '" + tmp.path +
            "/plugins': not a regular file");
  CHECK(error_of(head + "        exec: [bin/missing]\n", tmp.path) ==
        "t.yaml:8:16: queues[0].handlers[0].exec[0]: program '" + tmp.path +
            "/bin/missing': No such file or directory");
  CHECK(error_of(head + "        exec: [\"x\", bin/noexec]\n", tmp.path).find("not found in PATH") !=
        std::string::npos);
  CHECK(error_of(head + "        exec:\n          - bin/noexec\n", tmp.path) ==
        "t.yaml:9:13: queues[0].handlers[0].exec[0]: program '" + tmp.path +
            "/bin/noexec' is not executable");
  CHECK(error_of(head + "        exec: [./dir]\n", tmp.path) ==
        "t.yaml:8:16: queues[0].handlers[0].exec[0]: program '" + tmp.path + "/dir': not a regular file");
}

TEST_CASE("duplicate queue and handler names", "[config][errors]") {
  TempDir tmp;
  EnvGuard q("ER_T_QUEUE", "speaker.events");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: speaker.events
  - name: ${ER_T_QUEUE}
)"),
                 "/") ==
        "t.yaml:5:11: queues[1].name: duplicate queue name 'speaker.events' (first defined at line 4)");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: a
    handlers:
      - {name: h, events: [x], exec: [bin/tool]}
  - name: b
    handlers:
      - {name: h, events: [x], exec: [bin/tool]}
)"),
                 tmp.path) ==
        "t.yaml:9:16: queues[1].handlers[0].name: duplicate handler name 'h' (first defined at line 6)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q, dead_letter_queue: q}]\n", "/") ==
        "t.yaml:3:39: queues[0].dead_letter_queue: the dead-letter queue must differ from the queue itself");
}

TEST_CASE("bad enum values", "[config][errors]") {
  const std::string tail = "exchange: {name: ex}\nqueues: [{name: q}]\n";
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex, type: topc}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:2:28: exchange.type: invalid value 'topc' (expected one of: topic, direct, fanout, headers)"
        " (did you mean 'topic'?)");
  CHECK(error_of("broker: {url: 'amqp://h'}\n" + tail + "log: {level: verbose}\n", "/") ==
        "t.yaml:4:14: log.level: invalid value 'verbose' (expected one of: debug, info, warn, error)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    unhandled: foo\n", "/") ==
        "t.yaml:5:16: queues[0].unhandled: invalid value 'foo' (expected one of: dead-letter, ack)");
}

TEST_CASE("empty values are rejected", "[config][errors]") {
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: []\n", "/") ==
        "t.yaml:3:9: queues: at least one queue is required");
  CHECK(error_of("broker: {url: \"\"}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "/") ==
        "t.yaml:1:15: broker.url: must not be empty");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n", "/") ==
        "t.yaml:3:1: queues: expected a list of queues, got nothing");
}

TEST_CASE("environment substitution in values", "[config][env]") {
  TempDir tmp;
  EnvGuard pass("ER_T_PASS", nullptr);
  EnvGuard url("ER_T_URL", nullptr);
  EnvGuard empty("ER_T_EMPTY", "");

  SECTION("unset without default names the key") {
    CHECK(error_of(Y(R"(
broker:
  url: amqp://user:${ER_T_PASS}@host/
exchange: {name: ex}
queues: [{name: q}]
)"),
                   "/") ==
          "t.yaml:2:8: key 'broker.url': environment variable ER_T_PASS is not set and has no default");
  }
  SECTION("set, empty and default") {
    EnvGuard set("ER_T_PASS", "s3cret");
    Config c = load_config_string(Y(R"(
broker: {url: "amqp://u:${ER_T_PASS}@h/"}
exchange: {name: "${ER_T_EMPTY:-fallback}"}
queues: [{name: "${ER_T_EMPTY}q$$"}]
)"),
                                  "t.yaml", "/");
    CHECK(c.broker.url == "amqp://u:s3cret@h/");
    CHECK(c.exchange.name == "fallback");
    CHECK(c.queues[0].name == "q$");
  }
  SECTION("substituted text cannot change the YAML structure") {
    EnvGuard set("ER_T_URL", "ex #w: x");
    Config c = load_config_string("broker: {url: 'amqp://h'}\nexchange:\n  name: ${ER_T_URL}\nqueues: [{name: q}]\n",
                                  "t.yaml", "/");
    CHECK(c.exchange.name == "ex #w: x");
  }
  SECTION("unterminated reference") {
    CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: \"${ER_T_URL:-x\"}\nqueues: [{name: q}]\n", "/") ==
          "t.yaml:2:18: key 'exchange.name': unterminated '${' at character 1 of the value (missing '}')");
    // The error names the place, not the value, which may hold a password.
    std::string e = error_of("broker: {url: \"amqp://u:s3cret@h/${ER_T_X\"}\nexchange: {name: x}\nqueues: [{name: q}]\n", "/");
    CHECK(e == "t.yaml:1:15: key 'broker.url': unterminated '${' at character 19 of the value (missing '}')");
    CHECK(e.find("s3cret") == std::string::npos);
  }
  SECTION("inside list items") {
    EnvGuard topic("ER_T_TOPIC", "speaker");
    Config c = load_config_string(
        "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    bindings: [\"${ER_T_TOPIC}.*\"]\n",
        "t.yaml", "/");
    CHECK(c.queues[0].bindings.at(0) == "speaker.*");
    CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    bindings:\n"
                   "      - a\n      - ${ER_T_PASS}\n",
                   "/") ==
          "t.yaml:7:9: key 'queues[0].bindings[1]': environment variable ER_T_PASS is not set and has no default");
  }
  SECTION("inside exec argv, env and a plugin's config tree") {
    EnvGuard set("ER_T_PASS", "pw");
    EnvGuard num("ER_T_NUM", "42");
    Config c = load_config_string(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - name: e
        events: ["#"]
        exec: [bin/tool, "--pass=${ER_T_PASS}"]
        env: {PASS: "${ER_T_PASS}"}
      - name: p
        events: ["#"]
        plugin: plugins/libp.so
        config:
          auth: {password: "${ER_T_PASS}"}
          port: ${ER_T_NUM}
          quoted: "${ER_T_NUM}"
          items: [a, "${ER_T_PASS}"]
)"),
                                  "t.yaml", tmp.path);
    CHECK(c.queues[0].handlers[0].argv.at(1) == "--pass=pw");
    CHECK(c.queues[0].handlers[0].env.at(0).second == "pw");
    CHECK(c.queues[0].handlers[1].plugin_config_json ==
          R"({"auth":{"password":"pw"},"port":42,"quoted":"42","items":["a","pw"]})");
    CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - name: p
        events: ["#"]
        plugin: plugins/libp.so
        config:
          nested:
            - {secret: "${ER_T_URL}"}
)"),
                   tmp.path) ==
          "t.yaml:11:24: key 'queues[0].handlers[0].config.nested[0].secret': environment variable "
          "ER_T_URL is not set and has no default");
  }
}

TEST_CASE("plugin config renders any YAML as JSON", "[config]") {
  TempDir tmp;
  auto json = [&](const std::string& cfg) {
    Config c = load_config_string(
        "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
        "      - name: p\n        events: ['#']\n        plugin: plugins/libp.so\n" + cfg,
        "t.yaml", tmp.path);
    return c.queues[0].handlers[0].plugin_config_json;
  };
  CHECK(json("") == "{}");
  CHECK(json("        config:\n") == "{}");
  CHECK(json("        config: {}\n") == "{}");
  CHECK(json("        config: [1, two, 3.5]\n") == R"([1,"two",3.5])");
  CHECK(json("        config: hello\n") == R"("hello")");
  CHECK(json("        config: 7\n") == "7");
  CHECK(json("        config: {a: -5, b: 1e3, c: False, d: ~, e: 'true', f: .inf, g: 007, h: \"\"}\n") ==
        R"({"a":-5,"b":1000.0,"c":false,"d":null,"e":"true","f":".inf","g":7,"h":""})");
  CHECK(json("        config: {big: 123456789012345678901234567890, tagged: !!str 5}\n") ==
        R"({"big":1.2345678901234568e29,"tagged":"5"})");
  CHECK(json("        config:\n          text: |\n            line1\n            line2\n") ==
        R"({"text":"line1\nline2\n"})");
  CHECK(json("        config: {quote: 'say \"hi\"'}\n") == R"({"quote":"say \"hi\""})");
}

TEST_CASE("retry: queue values, and handler keys override the queue's one by one", "[config][retry]") {
  TempDir tmp;
  Config c = load_config_string(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    retry: {max_attempts: 4, delay: 500ms, multiplier: 1.5, max_delay: 2s}
    handlers:
      - name: inherits
        events: ["#"]
        exec: [bin/tool]
      - name: overrides
        events: ["#"]
        plugin: plugins/libp.so
        retry:
          max_attempts: 1
          max_delay: 10s
  - name: plain
    handlers:
      - {name: p, events: ["#"], exec: [bin/tool], retry: {delay: 2s, multiplier: 3}}
)"),
                                "t.yaml", tmp.path);
  const QueueConfig& q = c.queues.at(0);
  CHECK(q.retry.max_attempts == 4);
  CHECK(q.retry.delay == 500ms);
  CHECK(q.retry.multiplier == 1.5);
  CHECK(q.retry.max_delay == 2s);
  CHECK(q.handlers.at(0).retry == q.retry);
  const RetryConfig& o = q.handlers.at(1).retry;
  CHECK(o.max_attempts == 1);
  CHECK(o.delay == 500ms);
  CHECK(o.multiplier == 1.5);
  CHECK(o.max_delay == 10s);

  const QueueConfig& plain = c.queues.at(1);
  CHECK(plain.retry == RetryConfig{});
  CHECK(plain.retry.max_attempts == 5);
  CHECK(plain.retry.delay == 1s);
  CHECK(plain.retry.multiplier == 2.0);
  CHECK(plain.retry.max_delay == 5min);
  const RetryConfig& p = plain.handlers.at(0).retry;
  CHECK(p.max_attempts == 5);
  CHECK(p.delay == 2s);
  CHECK(p.multiplier == 3.0);
  CHECK(p.max_delay == 5min);
}

TEST_CASE("retry: delay_before grows by the multiplier and stops at max_delay", "[config][retry]") {
  RetryConfig r;  // 1s, x2, at most 5m
  CHECK(r.delay_before(0) == 0ms);
  CHECK(r.delay_before(1) == 0ms);
  CHECK(r.delay_before(2) == 1s);
  CHECK(r.delay_before(3) == 2s);
  CHECK(r.delay_before(4) == 4s);
  CHECK(r.delay_before(10) == 256s);
  CHECK(r.delay_before(11) == 300s);  // 512s, clamped
  CHECK(r.delay_before(1000) == 5min);
  CHECK(r.delay_before(~0u) == 5min);

  r.multiplier = 1e300;  // overflows a double from the 4th attempt on
  CHECK(r.delay_before(3) == 5min);
  CHECK(r.delay_before(1000) == 5min);

  r.delay = 100ms;
  r.multiplier = 1.5;
  CHECK(r.delay_before(2) == 100ms);
  CHECK(r.delay_before(3) == 150ms);
  CHECK(r.delay_before(4) == 225ms);
  CHECK(r.delay_before(5) == 338ms);  // 337.5, rounded
  r.multiplier = 1.1;
  CHECK(r.delay_before(4) == 121ms);  // 121.00000000000001

  r.multiplier = 1;
  CHECK(r.delay_before(2) == 100ms);
  CHECK(r.delay_before(1000) == 100ms);
}

TEST_CASE("retry: retry_steps lists every distinct wait of a queue, ascending", "[config][retry]") {
  QueueConfig q;
  q.retry.max_attempts = 4;  // 1s 2s 4s
  q.handlers.resize(3);
  q.handlers[0].retry = q.retry;
  q.handlers[1].retry.max_attempts = 1;  // never retries
  RetryConfig& r = q.handlers[2].retry;  // 1s 3s 9s 20s 20s
  r.max_attempts = 6;
  r.multiplier = 3;
  r.max_delay = 20s;
  CHECK(q.retry_steps() == std::vector<Duration>{1s, 2s, 3s, 4s, 9s, 20s});

  QueueConfig once;
  once.retry.max_attempts = 1;
  CHECK(once.retry_steps().empty());

  QueueConfig flat;
  flat.retry.max_attempts = 1000;
  flat.retry.multiplier = 1;
  CHECK(flat.retry_steps() == std::vector<Duration>{1s});

  QueueConfig many;
  many.retry.max_attempts = 1000;  // reaches 5m at attempt 11
  CHECK(many.retry_steps().size() == 10);
  CHECK(many.retry_steps().back() == 5min);
}

TEST_CASE("retry: bad values", "[config][retry][errors]") {
  TempDir tmp;
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n";
  CHECK(error_of(head + "    retry: {max_attempts: 0}\n", "/") ==
        "t.yaml:5:27: queues[0].retry.max_attempts: 0 is out of range 1..1000");
  CHECK(error_of(head + "    retry: {max_attempts: 1001}\n", "/") ==
        "t.yaml:5:27: queues[0].retry.max_attempts: 1001 is out of range 1..1000");
  CHECK(error_of(head + "    retry: {max_attempts: 2.5}\n", "/") ==
        "t.yaml:5:27: queues[0].retry.max_attempts: expected an integer 1..1000, got '2.5'");
  CHECK(error_of(head + "    retry: {delay: 0s}\n", "/") ==
        "t.yaml:5:20: queues[0].retry.delay: duration must be greater than 0");
  CHECK(error_of(head + "    retry: {delay: soon}\n", "/") ==
        "t.yaml:5:20: queues[0].retry.delay: invalid duration 'soon' (expected e.g. 500ms, 30s, 5m, 1h or seconds)");
  CHECK(error_of(head + "    retry: {multiplier: 0.5}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: 0.5 is out of range (must be >= 1)");
  CHECK(error_of(head + "    retry: {multiplier: -2}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: -2 is out of range (must be >= 1)");
  CHECK(error_of(head + "    retry: {multiplier: fast}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: expected a number >= 1, got 'fast'");
  CHECK(error_of(head + "    retry: {multiplier: .inf}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: expected a number >= 1, got '.inf'");
  CHECK(error_of(head + "    retry: {multiplier: 1e999}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: expected a number >= 1, got '1e999'");
  CHECK(error_of(head + "    retry: {multiplier: [2]}\n", "/") ==
        "t.yaml:5:25: queues[0].retry.multiplier: expected a number >= 1, got a list");
  CHECK(error_of(head + "    retry: {delay: 1m, max_delay: 30s}\n", "/") ==
        "t.yaml:5:35: queues[0].retry.max_delay: max_delay 30s is shorter than delay 1m");
  CHECK(error_of(head + "    retry: {delay: 10m}\n", "/") ==
        "t.yaml:5:20: queues[0].retry.delay: delay 10m is longer than max_delay 5m (set max_delay too)");
  CHECK(error_of(head + "    retry: 5\n", "/") ==
        "t.yaml:5:12: queues[0].retry: expected a mapping, got a scalar");
  CHECK(error_of(head + "    retry:\n", "/") ==
        "t.yaml:5:5: queues[0].retry: expected a mapping, got nothing");
  CHECK(error_of(head + "    retry: {max_attempt: 3}\n", "/") ==
        "t.yaml:5:13: queues[0].retry: unknown key 'max_attempt' (did you mean 'max_attempts'?)");
  CHECK(error_of(head + "    retry: {delay: 1s, delay: 2s}\n", "/") ==
        "t.yaml:5:24: queues[0].retry: duplicate key 'delay'");

  // At handler level, against the values inherited from the queue.
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    retry: {max_delay: 10s}
    handlers:
      - name: h
        events: ["#"]
        exec: [bin/tool]
        retry:
          delay: 20s
)"),
                 tmp.path) ==
        "t.yaml:11:18: queues[0].handlers[0].retry.delay: delay 20s is longer than max_delay 10s (set max_delay too)");
  CHECK(error_of(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
queues:
  - name: q
    handlers:
      - name: h
        events: ["#"]
        exec: [bin/tool]
        retry:
          dealy: 1s
)"),
                 tmp.path) ==
        "t.yaml:10:11: queues[0].handlers[0].retry: unknown key 'dealy' (did you mean 'delay'?)");
  CHECK(error_of(head + "    handlers:\n      - {name: h, events: [a], exec: [bin/tool], retry: {max_delay: 1500ms, delay: 2s}}\n",
                 tmp.path) ==
        "t.yaml:6:69: queues[0].handlers[0].retry.max_delay: max_delay 1500ms is shorter than delay 2s");
}

TEST_CASE("max_message_bytes: top level, per queue, bytes or sizes with units", "[config]") {
  Config c = load_config_string(Y(R"(
broker: {url: 'amqp://h'}
exchange: {name: ex}
max_message_bytes: 512KiB
queues:
  - name: a
  - name: b
    max_message_bytes: 2MB
  - name: c
    max_message_bytes: 1000
)"),
                                "t.yaml", "/");
  CHECK(c.max_message_bytes == 524288);
  CHECK(c.queues.at(0).max_message_bytes == 524288);
  CHECK(c.queues.at(1).max_message_bytes == 2000000);
  CHECK(c.queues.at(2).max_message_bytes == 1000);

  Config d = load_config_string("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n", "t.yaml", "/");
  CHECK(d.max_message_bytes == 1048576);
  CHECK(d.queues.at(0).max_message_bytes == 1048576);

  auto size = [](const std::string& text) {
    return load_config_string("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nmax_message_bytes: " +
                                  text + "\n",
                              "t.yaml", "/")
        .queues.at(0)
        .max_message_bytes;
  };
  CHECK(size("1") == 1);
  CHECK(size("7B") == 7);
  CHECK(size("3KB") == 3000);
  CHECK(size("3kB") == 3000);
  CHECK(size("3KiB") == 3072);
  CHECK(size("1MiB") == 1048576);
  CHECK(size("\"64 MiB\"") == 64 * 1048576);
  CHECK(size("128MiB") == 134217728);
  CHECK(size("134217728") == 134217728);
  CHECK(size("0000128MiB") == 134217728);
}

TEST_CASE("max_message_bytes: bad sizes", "[config][errors]") {
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nmax_message_bytes: ";
  CHECK(error_of(head + "0\n", "/") == "t.yaml:4:20: max_message_bytes: size must be at least 1 byte");
  CHECK(error_of(head + "0MiB\n", "/") == "t.yaml:4:20: max_message_bytes: size must be at least 1 byte");
  CHECK(error_of(head + "129MiB\n", "/") ==
        "t.yaml:4:20: max_message_bytes: size '129MiB' is larger than 128MiB (RabbitMQ's maximum message size)");
  CHECK(error_of(head + "134217729\n", "/") ==
        "t.yaml:4:20: max_message_bytes: size '134217729' is larger than 128MiB (RabbitMQ's maximum message size)");
  CHECK(error_of(head + "1GB\n", "/") ==
        "t.yaml:4:20: max_message_bytes: size '1GB' is larger than 128MiB (RabbitMQ's maximum message size)");
  CHECK(error_of(head + "99999999999999999999999\n", "/") ==
        "t.yaml:4:20: max_message_bytes: size '99999999999999999999999' is larger than 128MiB (RabbitMQ's maximum message size)");
  CHECK(error_of(head + "1.5MiB\n", "/") ==
        "t.yaml:4:20: max_message_bytes: invalid size '1.5MiB': use a whole number (e.g. 1536KiB for 1.5MiB)");
  CHECK(error_of(head + "1Mib\n", "/") ==
        "t.yaml:4:20: max_message_bytes: invalid size '1Mib': unknown unit 'Mib' (use B, KB, KiB, MB or MiB)"
        " (did you mean 'MiB'?)");
  CHECK(error_of(head + "2 bytes\n", "/") ==
        "t.yaml:4:20: max_message_bytes: invalid size '2 bytes': unknown unit 'bytes' (use B, KB, KiB, MB or MiB)");
  CHECK(error_of(head + "lots\n", "/") ==
        "t.yaml:4:20: max_message_bytes: invalid size 'lots' (expected a number of bytes or e.g. 512KiB, 1MiB, 2MB)");
  CHECK(error_of(head + "-1\n", "/") ==
        "t.yaml:4:20: max_message_bytes: invalid size '-1' (expected a number of bytes or e.g. 512KiB, 1MiB, 2MB)");
  CHECK(error_of(head + "[1]\n", "/") == "t.yaml:4:20: max_message_bytes: expected a size, got a list");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    max_message_bytes: 200MB\n",
                 "/") ==
        "t.yaml:5:24: queues[0].max_message_bytes: size '200MB' is larger than 128MiB (RabbitMQ's maximum message size)");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    max_msg_bytes: 1\n", "/") ==
        "t.yaml:5:5: queues[0]: unknown key 'max_msg_bytes'");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\nmax_message_byte: 1\n", "/") ==
        "t.yaml:4:1: unknown key 'max_message_byte' (did you mean 'max_message_bytes'?)");
}

TEST_CASE("schemas: a folder relative to the config file's folder", "[config]") {
  TempDir tmp;
  fs::create_directories(tmp.path + "/etc/schemas/events");
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n";
  CHECK(load_config_string(head, "t.yaml", tmp.path).schemas_dir.empty());
  CHECK(load_config_string(head + "schemas: etc/schemas/events\n", "t.yaml", tmp.path).schemas_dir ==
        tmp.path + "/etc/schemas/events");
  CHECK(load_config_string(head + "schemas: ./etc/../etc/schemas/events/\n", "t.yaml", tmp.path).schemas_dir ==
        tmp.path + "/etc/schemas/events");
  CHECK(load_config_string(head + "schemas: " + tmp.path + "/etc/schemas\n", "t.yaml", "/").schemas_dir ==
        tmp.path + "/etc/schemas");

  std::string file = tmp.file("etc/router.yaml", 0644, head + "schemas: schemas/events\n");
  CHECK(load_config(file).schemas_dir == tmp.path + "/etc/schemas/events");
}

TEST_CASE("schemas: the folder must exist", "[config][errors]") {
  TempDir tmp;
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n";
  CHECK(error_of(head + "schemas: nope\n", tmp.path) ==
        "t.yaml:4:10: schemas: folder '" + tmp.path + "/nope': No such file or directory");
  CHECK(error_of(head + "schemas: bin/tool\n", tmp.path) ==
        "t.yaml:4:10: schemas: folder '" + tmp.path + "/bin/tool': not a directory");
  CHECK(error_of(head + "schemas: \"\"\n", tmp.path) == "t.yaml:4:10: schemas: must not be empty");
  CHECK(error_of(head + "schemas: [a]\n", tmp.path) == "t.yaml:4:10: schemas: expected a string, got a list");
  CHECK(error_of(head + "schema: x\n", tmp.path) == "t.yaml:4:1: unknown key 'schema' (did you mean 'schemas'?)");
}

TEST_CASE("queue arguments keep their YAML types", "[config]") {
  TempDir d;
  auto c = load_config_string(Y(R"(
broker: {url: "amqp://guest:guest@localhost:5672/"}
exchange: {name: ex}
queues:
  - name: q
    arguments: {x-queue-type: quorum, x-delivery-limit: 20}
    dead_letter_arguments: {x-max-length: 1, x-overflow: reject-publish, x-single-active-consumer: true, x-note: "42"}
)"),
                              "t.yaml", d.path);
  const auto& q = c.queues.at(0);
  REQUIRE(q.arguments.size() == 2);
  CHECK(q.arguments[0].key == "x-queue-type");
  CHECK(q.arguments[0].kind == QueueArgument::Kind::String);
  CHECK(q.arguments[0].s == "quorum");
  CHECK(q.arguments[1].kind == QueueArgument::Kind::Int);
  CHECK(q.arguments[1].i == 20);
  REQUIRE(q.dead_letter_arguments.size() == 4);
  CHECK(q.dead_letter_arguments[0].kind == QueueArgument::Kind::Int);
  CHECK(q.dead_letter_arguments[0].i == 1);
  CHECK(q.dead_letter_arguments[1].s == "reject-publish");
  CHECK(q.dead_letter_arguments[2].kind == QueueArgument::Kind::Bool);
  CHECK(q.dead_letter_arguments[2].b);
  CHECK(q.dead_letter_arguments[3].kind == QueueArgument::Kind::String);  // quoted: stays a string
  CHECK(q.dead_letter_arguments[3].s == "42");

  CHECK(error_of(Y(R"(
broker: {url: "amqp://guest:guest@localhost:5672/"}
exchange: {name: ex}
queues:
  - name: q
    arguments: {x-max-length: [1]}
)"),
                 d.path) == "t.yaml:5:31: queues[0].arguments.x-max-length: expected a number, boolean or string, got a list");
}

TEST_CASE("single_active_consumer: declared as the queue argument; or read from arguments; not both", "[config]") {
  TempDir d;
  auto q = [](const std::string& extra) {
    return "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    " + extra + "\n";
  };
  auto c = load_config_string(q("single_active_consumer: true\n    arguments: {x-max-length: 5}"), "t.yaml", d.path);
  const auto& a = c.queues.at(0).arguments;
  CHECK(c.queues[0].single_active_consumer);
  REQUIRE(a.size() == 2);
  CHECK(a[1].key == "x-single-active-consumer");
  CHECK(a[1].kind == QueueArgument::Kind::Bool);
  CHECK(a[1].b);
  auto off = load_config_string(q("single_active_consumer: false"), "t.yaml", d.path);
  CHECK_FALSE(off.queues[0].single_active_consumer);
  CHECK(off.queues[0].arguments.empty());
  CHECK_FALSE(load_config_string(q("prefetch: 3"), "t.yaml", d.path).queues[0].single_active_consumer);
  auto by_arg = load_config_string(q("arguments: {x-single-active-consumer: true}"), "t.yaml", d.path);
  CHECK(by_arg.queues[0].single_active_consumer);
  CHECK(by_arg.queues[0].arguments.size() == 1);
  CHECK(error_of(q("single_active_consumer: true\n    arguments: {x-single-active-consumer: true}"), d.path)
            .find("set either single_active_consumer or arguments.x-single-active-consumer, not both") !=
        std::string::npos);
  CHECK(error_of(q("single_active_consumer: sure"), d.path).rfind("t.yaml:5:29: ", 0) == 0);
}

TEST_CASE("a broker URL that can never connect is refused at load", "[config]") {
  TempDir d;
  auto cfg = [](const char* url) {
    return std::string("broker:\n  url: \"") + url + "\"\nexchange: {name: ex}\nqueues: [{name: q}]\n";
  };
  CHECK(error_of(cfg("http://guest:secret@localhost:5672/"), d.path) ==
        "t.yaml:2:8: broker.url: 'http://guest:****@localhost:5672/' is not a valid broker URL (expected "
        "amqp://user:password@host:port/vhost)");
  CHECK(error_of(cfg("amqp://guest:guest@localhost:notaport/"), d.path).find("not a valid broker URL") !=
        std::string::npos);
  CHECK(error_of(cfg("amqps://guest:guest@localhost/"), d.path) == "<no error>");
  CHECK(error_of(cfg("amqp://guest:guest@localhost:5672/"), d.path) == "<no error>");
}

TEST_CASE("broker urls, reconnect, dedupe, http, state_dir and log format", "[config]") {
  TempDir d;
  auto c = load_config_string(Y(R"(
broker:
  urls: ["amqp://a:p@node1:5672/", "amqp://a:p@node2:5672/"]
  reconnect: {initial: 200ms, max: 5s}
exchange: {name: ex}
state_dir: state
http: {listen: "127.0.0.1:9090"}
log: {level: debug, format: json}
queues:
  - name: q
    dedupe: {ttl: 24h}
)"),
                              "t.yaml", d.path);
  REQUIRE(c.broker.urls.size() == 2);
  CHECK(c.broker.url == "amqp://a:p@node1:5672/");
  CHECK(c.broker.reconnect_initial == 200ms);
  CHECK(c.broker.reconnect_max == 5s);
  CHECK(c.state_dir == d.path + "/state");
  CHECK(c.http_listen == "127.0.0.1:9090");
  CHECK(c.log.format == LogFormat::Json);
  CHECK(c.queues[0].dedupe_ttl == std::chrono::hours(24));

  auto base = [](const std::string& broker) {
    return "broker: " + broker + "\nexchange: {name: ex}\nqueues: [{name: q}]\n";
  };
  CHECK(error_of(base("{url: 'amqp://h', urls: ['amqp://h']}"), d.path) ==
        "t.yaml:1:33: broker.urls: set either 'url' or 'urls', not both");
  CHECK(error_of(base("{urls: []}"), d.path) == "t.yaml:1:16: broker.urls: at least one URL is required");
  CHECK(error_of(base("{urls: ['amqp://h', 'nope']}"), d.path).find("'nope' is not a valid broker URL") !=
        std::string::npos);
  CHECK(error_of(base("{url: 'amqp://h', reconnect: {initial: 5s, max: 1s}}"), d.path) ==
        "t.yaml:1:57: broker.reconnect.max: max must be at least initial");
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nhttp: {listen: 9090}\nqueues: [{name: q}]\n",
                 d.path) == "t.yaml:3:16: http.listen: expected host:port (e.g. 127.0.0.1:9090), got '9090'");
}

TEST_CASE("dedupe_store: postgres, table, timeout, lease, on_unavailable", "[config]") {
  TempDir d;
  ::setenv("ER_TEST_DEDUPE_PG", "postgresql://u:secret@10.0.0.5/db", 1);
  auto c = load_config_string(Y(R"(
broker: {url: "amqp://h"}
exchange: {name: ex}
dedupe_store: {postgres: "${ER_TEST_DEDUPE_PG}", table: er_seen, timeout: 500ms, lease: 2m, on_unavailable: run}
queues: [{name: q, dedupe: {ttl: 1h}}]
)"),
                              "t.yaml", d.path);
  CHECK(c.dedupe_store.postgres == "postgresql://u:secret@10.0.0.5/db");
  CHECK(c.dedupe_store.table == "er_seen");
  CHECK(c.dedupe_store.timeout == 500ms);
  CHECK(c.dedupe_store.lease == std::chrono::minutes(2));
  CHECK(c.dedupe_store.on_unavailable == DedupeUnavailable::Run);

  auto dflt = load_config_string(Y("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n"), "t.yaml",
                                 d.path);
  CHECK(dflt.dedupe_store.postgres.empty());  // SQLite in state_dir
  CHECK(dflt.dedupe_store.on_unavailable == DedupeUnavailable::Retry);

  auto with = [](const std::string& store) {
    return "broker: {url: 'amqp://h'}\nexchange: {name: ex}\ndedupe_store: " + store + "\nqueues: [{name: q}]\n";
  };
  CHECK(error_of(with("{table: x}"), d.path).find("'postgres'") != std::string::npos);
  CHECK(error_of(with("{postgres: 'postgresql://h', table: 'x; DROP TABLE y'}"), d.path)
            .find("table must be a lower-case SQL identifier") != std::string::npos);
  CHECK(error_of(with("{postgres: 'postgresql://h', timeout: 1ms}"), d.path).find("between 10ms and 1m") !=
        std::string::npos);
  CHECK(error_of(with("{postgres: 'postgresql://h', on_unavailable: drop}"), d.path).find("retry") !=
        std::string::npos);
  CHECK(error_of(with("{postgres: 'postgresql://h', pool: 4}"), d.path).find("pool") != std::string::npos);
}

TEST_CASE("broker.tls files are resolved and checked", "[config]") {
  TempDir d;
  d.file("tls/ca.pem", 0644, "x");
  d.file("tls/client.pem", 0644, "x");
  d.file("tls/client.key", 0600, "x");
  auto c = load_config_string(Y(R"(
broker:
  url: amqps://u:p@broker:5671/
  tls: {ca_file: tls/ca.pem, cert_file: tls/client.pem, key_file: tls/client.key, verify_hostname: false}
exchange: {name: ex}
queues: [{name: q}]
)"),
                              "t.yaml", d.path);
  CHECK(c.broker.tls.ca_file == d.path + "/tls/ca.pem");
  CHECK(c.broker.tls.key_file == d.path + "/tls/client.key");
  CHECK(c.broker.tls.verify_peer);
  CHECK_FALSE(c.broker.tls.verify_hostname);
  CHECK(error_of("broker:\n  url: amqps://h/\n  tls: {ca_file: nope.pem}\nexchange: {name: ex}\nqueues: [{name: q}]\n",
                 d.path) == "t.yaml:3:18: broker.tls.ca_file: cannot read " + d.path + "/nope.pem: No such file or directory");
  CHECK(error_of("broker:\n  url: amqps://h/\n  tls: {cert_file: tls/client.pem}\nexchange: {name: ex}\nqueues: [{name: q}]\n",
                 d.path) == "t.yaml:3:8: broker.tls: cert_file and key_file go together (client certificate authentication)");
}

TEST_CASE("broker.tls with a plain amqp:// URL is refused, not ignored", "[config]") {
  TempDir d;
  // The password would go over the wire in clear while the config says TLS.
  CHECK(error_of("broker:\n  url: amqp://u:s3cret@h/\n  tls: {verify_peer: true}\nexchange: {name: ex}\nqueues: [{name: q}]\n",
                 d.path) == "t.yaml:3:8: broker.tls: TLS settings need amqps:// URLs, but 'amqp://u:****@h/' is not "
                            "amqps:// (the connection would not use TLS)");
  // One plain URL in a list is enough to refuse.
  CHECK(error_of("broker:\n  urls: [amqps://a/, amqp://b/]\n  tls: {}\nexchange: {name: ex}\nqueues: [{name: q}]\n",
                 d.path)
            .rfind("t.yaml:3:8: broker.tls: TLS settings need amqps:// URLs, but 'amqp://b/'", 0) == 0);
  CHECK(error_of("broker:\n  urls: [amqps://a/, amqps://b/]\n  tls: {}\nexchange: {name: ex}\nqueues: [{name: q}]\n",
                 d.path) == "<no error>");
}

TEST_CASE("security: the copy key from a file or an environment variable", "[config][security]") {
  TempDir d;
  std::string key32(32, 'k');
  d.file("keys/copy.key", 0600, key32 + "\n");  // the newline is part of the key
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n";

  auto c = load_config_string(head + "security: {copy_key_file: keys/copy.key}\n", "t.yaml", d.path);
  CHECK(c.security.copy_key == key32 + "\n");
  CHECK(c.security.copy_key_file == d.path + "/keys/copy.key");
  CHECK(c.security.copy_key_env.empty());

  {
    EnvGuard g("ER_TEST_COPY_KEY", "0123456789abcdef0123456789abcdef!");
    auto e = load_config_string(head + "security: {copy_key_env: ER_TEST_COPY_KEY}\n", "t.yaml", d.path);
    CHECK(e.security.copy_key == "0123456789abcdef0123456789abcdef!");
    CHECK(e.security.copy_key_env == "ER_TEST_COPY_KEY");
    CHECK(e.security.copy_key_file.empty());
  }

  auto none = load_config_string(head, "t.yaml", d.path);
  CHECK(none.security.copy_key.empty());  // settle::load_or_create_copy_key() then uses state_dir
}

TEST_CASE("security: copy key errors carry the position", "[config][security][errors]") {
  TempDir d;
  d.file("short.key", 0600, std::string(31, 's'));
  d.file("big.key", 0600, std::string(4097, 'b'));
  d.file("ok.key", 0600, std::string(32, 'k'));
  fs::create_directories(d.path + "/dir.key");
  const std::string head = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues: [{name: q}]\n";

  CHECK(error_of(head + "security: {copy_key_file: ok.key, copy_key_env: K}\n", d.path) ==
        "t.yaml:4:35: security: set either 'copy_key_file' or 'copy_key_env', not both");
  CHECK(error_of(head + "security: {copy_key_file: nope.key}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: cannot read " + d.path + "/nope.key: No such file or directory");
  CHECK(error_of(head + "security: {copy_key_file: dir.key}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: cannot read " + d.path + "/dir.key: not a regular file");
  REQUIRE(mkfifo((d.path + "/fifo.key").c_str(), 0600) == 0);  // would block a plain open()
  CHECK(error_of(head + "security: {copy_key_file: fifo.key}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: cannot read " + d.path + "/fifo.key: not a regular file");
  CHECK(error_of(head + "security: {copy_key_file: short.key}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: " + d.path +
            "/short.key is 31 bytes; the copy key needs at least 32 (e.g. head -c 32 /dev/urandom > copy.key)");
  CHECK(error_of(head + "security: {copy_key_file: big.key}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: " + d.path + "/big.key is larger than 4096 bytes: not a key file?");
  CHECK(error_of(head + "security: {copy_key_file: ''}\n", d.path) ==
        "t.yaml:4:27: security.copy_key_file: must not be empty");
  CHECK(error_of(head + "security: {copy_key: x}\n", d.path).rfind("t.yaml:4:12: security: unknown key 'copy_key'", 0) == 0);
  CHECK(error_of(head + "security: on\n", d.path) == "t.yaml:4:11: security: expected a mapping, got a scalar");
  {
    EnvGuard unset("ER_TEST_COPY_KEY", nullptr);
    CHECK(error_of(head + "security:\n  copy_key_env: ER_TEST_COPY_KEY\n", d.path) ==
          "t.yaml:5:17: security.copy_key_env: environment variable 'ER_TEST_COPY_KEY' is not set");
  }
  {
    EnvGuard short_key("ER_TEST_COPY_KEY", "too short");
    CHECK(error_of(head + "security:\n  copy_key_env: ER_TEST_COPY_KEY\n", d.path) ==
          "t.yaml:5:17: security.copy_key_env: environment variable 'ER_TEST_COPY_KEY' is 9 bytes; the copy key "
          "needs at least 32 (e.g. head -c 32 /dev/urandom > copy.key)");
  }
  // Permission denied: root reads any file, so this part only runs as another user.
  if (geteuid() != 0) {
    d.file("locked.key", 0000, std::string(32, 'k'));
    CHECK(error_of(head + "security: {copy_key_file: locked.key}\n", d.path) ==
          "t.yaml:4:27: security.copy_key_file: cannot read " + d.path + "/locked.key: Permission denied");
  }
}

TEST_CASE("worker handlers: processes, per-process concurrency, restart, emit style", "[config]") {
  TempDir tmp;
  fs::create_directories(tmp.path + "/bin");
  { std::ofstream(tmp.path + "/bin/w") << "#!/bin/sh\n"; }
  fs::permissions(tmp.path + "/bin/w", fs::perms::owner_all);
  auto c = er::config::load_config_string(
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    prefetch: 20\n    handlers:\n"
      "      - name: w\n        events: [a]\n        worker: [bin/w, --fast]\n        processes: 3\n"
      "        concurrency: 4\n        restart: {initial: 2s, max: 1m}\n        emit: {style: camel}\n",
      "t.yaml", tmp.path);
  const auto& h = c.queues[0].handlers[0];
  CHECK(h.kind == er::config::HandlerKind::Worker);
  CHECK(h.argv == std::vector<std::string>{tmp.path + "/bin/w", "--fast"});
  CHECK(h.processes == 3);
  CHECK(h.per_process == 4);
  CHECK(h.concurrency == 12);
  CHECK(h.restart_initial == std::chrono::seconds(2));
  CHECK(h.restart_max == std::chrono::minutes(1));
  CHECK(h.emit_style == er::config::EmitStyle::Camel);
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    handlers:\n"
                 "      - name: w\n        events: [a]\n        worker: [bin/w]\n"
                 "        restart: {initial: 2s, max: 1s}\n",
                 tmp.path) == "t.yaml:9:18: queues[0].handlers[0].restart: 'max' must not be below 'initial'");
}

TEST_CASE("'workers' is the old name of 'plugin_threads': accepted with a warning", "[config]") {
  TempDir tmp;
  auto c = er::config::load_config_string(
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nworkers: 7\nqueues:\n  - name: q\n", "t.yaml", tmp.path);
  CHECK(c.plugin_threads == 7);
  REQUIRE(c.warnings.size() == 1);
  CHECK(c.warnings[0].rfind("t.yaml:3:1: 'workers' is deprecated", 0) == 0);
  CHECK(error_of("broker: {url: 'amqp://h'}\nexchange: {name: ex}\nplugin_threads: 2\nworkers: 7\nqueues:\n  - name: q\n",
                 tmp.path) == "t.yaml:4:1: 'workers' is the old name of 'plugin_threads'; give only 'plugin_threads'");
  auto fresh = er::config::load_config_string(
      "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nplugin_threads: 3\nqueues:\n  - name: q\n", "t.yaml", tmp.path);
  CHECK(fresh.plugin_threads == 3);
  CHECK(fresh.warnings.empty());
}

TEST_CASE("ordering: per queue, inherited and overridden per handler; ordering_hold_max bounds", "[config]") {
  TempDir d;
  auto c = load_config_string(Y(R"(
broker: {url: "amqp://h"}
exchange: {name: ex}
queues:
  - name: q
    ordering: aggregate
    ordering_hold_max: 90s
    handlers:
      - {name: ordered, events: ["a.*"], exec: [bin/tool]}
      - {name: free, events: ["#"], exec: [bin/tool], ordering: none}
  - name: r
    handlers:
      - {name: one, events: ["#"], exec: [bin/tool], ordering: aggregate}
)"),
                              "t.yaml", d.path);
  CHECK(c.queues[0].ordering == Ordering::Aggregate);
  CHECK(c.queues[0].ordering_hold_max == 90s);
  CHECK(c.queues[0].handlers[0].ordering == Ordering::Aggregate);
  CHECK(c.queues[0].handlers[1].ordering == Ordering::None);
  CHECK(c.queues[1].ordering == Ordering::None);
  CHECK(c.queues[1].ordering_hold_max == 5min);  // the default
  CHECK(c.queues[1].handlers[0].ordering == Ordering::Aggregate);

  auto q = [](const std::string& extra) {
    return "broker: {url: 'amqp://h'}\nexchange: {name: ex}\nqueues:\n  - name: q\n    " + extra + "\n";
  };
  CHECK(error_of(q("ordering: key"), d.path) ==
        "t.yaml:5:15: queues[0].ordering: invalid value 'key' (expected one of: none, aggregate)");
  CHECK(error_of(q("ordering_hold_max: 0"), d.path).rfind("t.yaml:5:24: ", 0) == 0);
  CHECK(error_of(q("ordering_hold_max: 500ms"), d.path) ==
        "t.yaml:5:24: queues[0].ordering_hold_max: ordering_hold_max must be between 1s and 24h "
        "(and below the broker's consumer_timeout, 30m by default)");
  CHECK(error_of(q("ordering_hold_max: 25h"), d.path).find("between 1s and 24h") != std::string::npos);
  CHECK(error_of(q("handlers: [{name: h, events: ['#'], exec: [bin/tool], ordering: yes}]"), d.path)
            .find("invalid value 'yes' (expected one of: none, aggregate)") != std::string::npos);
}
