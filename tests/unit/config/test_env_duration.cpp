#include <catch2/catch.hpp>

#include <cstdlib>
#include <stdexcept>

#include "config/config.hpp"

using er::config::Duration;
using er::config::parse_duration;
using er::config::substitute_env;
using namespace std::chrono_literals;

TEST_CASE("substitute_env expands ${VAR}", "[env]") {
  setenv("ER_T_HOST", "rabbit", 1);
  setenv("ER_T_EMPTY", "", 1);
  unsetenv("ER_T_UNSET");
  CHECK(substitute_env("amqp://${ER_T_HOST}:5672/") == "amqp://rabbit:5672/");
  CHECK(substitute_env("${ER_T_HOST}${ER_T_HOST}") == "rabbitrabbit");
  CHECK(substitute_env("${ER_T_EMPTY}") == "");  // set but empty is fine without default
  CHECK(substitute_env("no vars") == "no vars");
  CHECK(substitute_env("") == "");
}

TEST_CASE("substitute_env defaults follow shell ':-' semantics", "[env]") {
  setenv("ER_T_HOST", "rabbit", 1);
  setenv("ER_T_EMPTY", "", 1);
  unsetenv("ER_T_UNSET");
  CHECK(substitute_env("${ER_T_HOST:-x}") == "rabbit");
  CHECK(substitute_env("${ER_T_UNSET:-x}") == "x");
  CHECK(substitute_env("${ER_T_EMPTY:-x}") == "x");
  CHECK(substitute_env("${ER_T_UNSET:-}") == "");
  CHECK(substitute_env("${ER_T_UNSET:-amqp://g:g@h:5672/}") == "amqp://g:g@h:5672/");
  CHECK(substitute_env("${ER_T_UNSET:-${ER_T_HOST}}") == "rabbit");
  CHECK(substitute_env("${ER_T_UNSET:-a:-b}") == "a:-b");
}

TEST_CASE("substitute_env '$$' and lone '$'", "[env]") {
  setenv("ER_T_HOST", "rabbit", 1);
  CHECK(substitute_env("$$") == "$");
  CHECK(substitute_env("pa$$word") == "pa$word");
  CHECK(substitute_env("$${ER_T_HOST}") == "${ER_T_HOST}");
  CHECK(substitute_env("$$$${ER_T_HOST}") == "$${ER_T_HOST}");
  CHECK(substitute_env("$$${ER_T_HOST}") == "$rabbit");
  CHECK(substitute_env("pa$word") == "pa$word");
  CHECK(substitute_env("end$") == "end$");
}

TEST_CASE("substitute_env errors", "[env]") {
  unsetenv("ER_T_UNSET");
  CHECK_THROWS_WITH(substitute_env("x${ER_T_UNSET}y"),
                    "environment variable ER_T_UNSET is not set and has no default");
  CHECK_THROWS_WITH(substitute_env("${ER_T_UNSET:-a"),
                    "unterminated '${' at character 1 of the value (missing '}')");
  CHECK_THROWS_AS(substitute_env("abc${"), std::invalid_argument);
  CHECK_THROWS_AS(substitute_env("${}"), std::invalid_argument);
  CHECK_THROWS_AS(substitute_env("${1X}"), std::invalid_argument);
  CHECK_THROWS_AS(substitute_env("${A B}"), std::invalid_argument);
  CHECK_THROWS_AS(substitute_env("${ER_T_UNSET-x}"), std::invalid_argument);
}

TEST_CASE("substitute_env errors never echo the value (it may be a secret)", "[env]") {
  unsetenv("ER_T_UNSET");
  auto message = [](const std::string& text) -> std::string {
    try {
      substitute_env(text);
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "no error";
  };
  std::string m = message("amqp://u:hunter2@h/${ER_T_UNSET:-x");
  CHECK(m == "unterminated '${' at character 20 of the value (missing '}')");
  m = message("hunter2${ER_T_UNSET:-${pw hunter3}}");
  CHECK(m == "invalid environment variable reference at character 22 of the value (use ${VAR} or ${VAR:-default})");
  m = message("${hunter2 x}");
  CHECK(m.find("hunter") == std::string::npos);
  CHECK(m.find("at character 1 ") != std::string::npos);
  m = message("${}hunter2");
  CHECK(m.find("hunter") == std::string::npos);
}

TEST_CASE("parse_duration accepts units and plain seconds", "[duration]") {
  CHECK(parse_duration("500ms") == 500ms);
  CHECK(parse_duration("30s") == 30s);
  CHECK(parse_duration("5m") == 5min);
  CHECK(parse_duration("1h") == 1h);
  CHECK(parse_duration("0") == 0ms);
  CHECK(parse_duration("0s") == 0ms);
  CHECK(parse_duration("30") == 30s);
  CHECK(parse_duration("1.5") == 1500ms);
  CHECK(parse_duration("0.25s") == 250ms);
  CHECK(parse_duration("1.5m") == 90s);
  CHECK(parse_duration("0.001") == 1ms);
  CHECK(parse_duration("2.500") == 2500ms);
  CHECK(parse_duration("1000000h") == std::chrono::hours(1000000));
}

TEST_CASE("parse_duration rejects bad input", "[duration]") {
  CHECK_THROWS_WITH(parse_duration(""), "empty duration");
  CHECK_THROWS_WITH(parse_duration("-5s"), "negative duration '-5s'");
  CHECK_THROWS_WITH(parse_duration("5x"),
                    "invalid duration '5x': unknown unit 'x' (use ms, s, m or h)");
  for (const char* bad : {"s", "ms", "abc", "5 s", " 5s", "5S", "5sec", "1e3", "+5s", "5.", ".5",
                          "1.5.2", "5s5", "0x10", "1d", "inf", "nan", "1,5"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse_duration(bad), std::invalid_argument);
  }
  CHECK_THROWS_WITH(parse_duration("0.0005"), "duration '0.0005' is finer than a millisecond");
  CHECK_THROWS_AS(parse_duration("1.5ms"), std::invalid_argument);
  CHECK_THROWS_WITH(parse_duration("1000001h"), "duration '1000001h' is too large (max 1000000h)");
  CHECK_THROWS_AS(parse_duration("99999999999999999999999999s"), std::invalid_argument);
  CHECK_THROWS_AS(parse_duration("9223372036854775807ms"), std::invalid_argument);
  CHECK_THROWS_AS(parse_duration("18446744073709551616"), std::invalid_argument);
}
