#include <catch2/catch.hpp>

#include "util/log.hpp"

using er::log::mask_url;

TEST_CASE("mask_url hides the password", "[log]") {
  CHECK(mask_url("amqp://guest:guest@localhost:5672/") == "amqp://guest:****@localhost:5672/");
  CHECK(mask_url("amqps://u:p@h/vh") == "amqps://u:****@h/vh");
  CHECK(mask_url("amqp://localhost:5672/") == "amqp://localhost:5672/");
  CHECK(mask_url("amqp://user@h/") == "amqp://user@h/");
  CHECK(mask_url("not a url") == "not a url");
}

TEST_CASE("mask_url: an unencoded '@' in the password does not leak its tail", "[log]") {
  CHECK(mask_url("amqp://u:p@ss@host:5672/") == "amqp://u:****@host:5672/");
  CHECK(mask_url("amqp://u:a@b@c@host/") == "amqp://u:****@host/");
  std::string m = mask_url("amqp://u:x@y/z@host/vh");
  CHECK(m == "amqp://u:****@host/vh");
  CHECK(m.find("y/z") == std::string::npos);
}
