// The hot path's settings: broker.ack_window and the per-event log line
// (log.events, log.sample): defaults, values, and errors with their position.
#include <catch2/catch.hpp>

#include <string>

#include "config/config.hpp"

using namespace er::config;
using namespace std::chrono_literals;

namespace {
const std::string kTail =
    "exchange: {name: ex}\n"
    "queues: [{name: q, handlers: [{name: h, events: ['#'], exec: ['/bin/true']}]}]\n";

Config load(const std::string& broker_extra, const std::string& log) {
  return load_config_string("broker: {url: 'amqp://h'" + broker_extra + "}\n" + kTail + log, "t.yaml", "/");
}

std::string error_of(const std::string& yaml) {
  try {
    load_config_string(yaml, "t.yaml", "/");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}
}  // namespace

TEST_CASE("hot path settings: defaults", "[config]") {
  Config c = load("", "");
  CHECK(c.broker.ack_window == 10ms);
  CHECK(c.log.events == EventLog::Info);
  CHECK(c.log.sample == 1);
}

TEST_CASE("hot path settings: values", "[config]") {
  Config c = load(", ack_window: 50ms", "log: {level: warn, events: debug, sample: 100}\n");
  CHECK(c.broker.ack_window == 50ms);
  CHECK(c.log.events == EventLog::Debug);
  CHECK(c.log.sample == 100);
  c = load(", ack_window: 0", "log: {events: off}\n");
  CHECK(c.broker.ack_window == 0ms);
  CHECK(c.log.events == EventLog::Off);
}

TEST_CASE("hot path settings: errors carry file:line:column", "[config][errors]") {
  CHECK(error_of("broker: {url: 'amqp://h', ack_window: 2s}\n" + kTail) ==
        "t.yaml:1:39: broker.ack_window: ack_window must be at most 1s");
  CHECK(error_of("broker: {url: 'amqp://h', ack_window: soon}\n" + kTail).rfind("t.yaml:1:39: broker.ack_window: ", 0) ==
        0);
  CHECK(error_of("broker: {url: 'amqp://h'}\n" + kTail + "log: {events: trace}\n") ==
        "t.yaml:4:15: log.events: invalid value 'trace' (expected one of: info, debug, off)");
  CHECK(error_of("broker: {url: 'amqp://h'}\n" + kTail + "log: {sample: 0}\n") ==
        "t.yaml:4:15: log.sample: 0 is out of range 1..1000000");
  CHECK(error_of("broker: {url: 'amqp://h'}\n" + kTail + "log: {events: off, sample: 10}\n") ==
        "t.yaml:4:28: log.sample: sample has no effect with events: off");
}
