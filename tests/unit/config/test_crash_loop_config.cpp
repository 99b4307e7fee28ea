// `crash_loop:` top level and per queue: defaults, overrides, 0, errors.
#include <catch2/catch.hpp>

#include <string>

#include "config/config.hpp"

using namespace er::config;
using namespace std::chrono_literals;

namespace {
const std::string kHead = "broker: {url: 'amqp://h'}\nexchange: {name: ex}\n";
std::string handlers(const char* name) {
  return std::string("handlers: [{name: ") + name + ", events: ['#'], exec: ['/bin/true']}]";
}

Config load(const std::string& top, const std::string& q1_extra = "") {
  return load_config_string(kHead + top + "queues: [{name: q1, " + q1_extra + handlers("h1") + "}, {name: q2, " +
                                handlers("h2") + "}]\n",
                            "t.yaml", "/");
}

std::string error_of(const std::string& top, const std::string& q1_extra = "") {
  try {
    load(top, q1_extra);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}
}  // namespace

TEST_CASE("crash_loop: defaults", "[config]") {
  Config c = load("");
  CHECK(c.crash_max == 3);
  CHECK(c.crash_ttl == 24h);
  CHECK(c.queues[0].crash_max == 3);
  CHECK(c.queues[1].crash_max == 3);
}

TEST_CASE("crash_loop: top level is the queues' default, a queue overrides it", "[config]") {
  Config c = load("crash_loop: {max_crashes: 5, ttl: 2h}\n", "crash_loop: {max_crashes: 0}, ");
  CHECK(c.crash_max == 5);
  CHECK(c.crash_ttl == 2h);
  CHECK(c.queues[0].crash_max == 0);  // off for this queue
  CHECK(c.queues[1].crash_max == 5);
  Config off = load("crash_loop: {max_crashes: 0}\n", "crash_loop: {max_crashes: 2}, ");
  CHECK(off.queues[0].crash_max == 2);
  CHECK(off.queues[1].crash_max == 0);
}

TEST_CASE("crash_loop: errors name the key", "[config]") {
  CHECK_THAT(error_of("crash_loop: {max_crashes: -1}\n"),
             Catch::StartsWith("t.yaml:3:27: crash_loop.max_crashes: expected an integer 0..1000"));
  CHECK_THAT(error_of("crash_loop: {max_crashes: 1001}\n"), Catch::Contains("1001 is out of range 0..1000"));
  CHECK_THAT(error_of("crash_loop: {max_crash: 2}\n"), Catch::Contains("unknown key 'max_crash'"));
  CHECK_THAT(error_of("crash_loop: {ttl: 10s}\n"), Catch::StartsWith("t.yaml:3:19: crash_loop.ttl: must be between 1m and 30d"));
  CHECK_THAT(error_of("", "crash_loop: {ttl: 1h}, "), Catch::Contains("unknown key 'ttl'"));
  CHECK_THAT(error_of("", "crash_loop: {}, "), Catch::Contains("queues[0].crash_loop: missing required key 'max_crashes'"));
}
