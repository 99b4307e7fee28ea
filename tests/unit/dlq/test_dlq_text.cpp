// What `dlq list` and `replay` print comes from publishers: it must not be
// able to drive the terminal or fake rows, and replays carry none of the
// failure bookkeeping.
#include <catch2/catch.hpp>

#include "dlq/dlq.hpp"

using namespace er;

TEST_CASE("dlq: printed fields show control bytes as \\xNN and are capped", "[dlq]") {
  CHECK(dlq::printable("evt-1", 64) == "evt-1");
  CHECK(dlq::printable("a\x1b[2Jb", 64) == "a\\x1b[2Jb");  // clear-screen escape
  CHECK(dlq::printable("x\nfake-row\r", 64) == "x\\x0afake-row\\x0d");
  CHECK(dlq::printable(std::string(100, 'i'), 10) == "iiiiiii...");
  CHECK(dlq::printable("\x7f", 64) == "\\x7f");
  // Cut on a character boundary, never inside a UTF-8 sequence.
  std::string s = "ab\xc3\xa9\xc3\xa9\xc3\xa9";
  std::string p = dlq::printable(s, 6);
  CHECK(p == "ab...");
}

TEST_CASE("dlq: replays drop every failure and signature header", "[dlq]") {
  for (const char* k : {"x-death-reason", "x-death-detail", "x-attempts", "x-first-failed-at", "x-last-failed-at",
                        "x-original-exchange", "x-original-routing-key", "x-original-queue", "x-attempt",
                        "x-last-error", "x-death", "x-er-sig", "x-headers-dropped"})
    CHECK(dlq::is_failure_header(k));
  CHECK_FALSE(dlq::is_failure_header("traceparent"));
  CHECK_FALSE(dlq::is_failure_header("x-request-id"));
}
