#include <catch2/catch.hpp>

#include <string>

#include "http_parts.hpp"

using namespace er_http;

TEST_CASE("parse_url: scheme, host, port, target", "[http]") {
  Url u;
  std::string err;
  REQUIRE(parse_url("http://svc/events", u, err));
  CHECK_FALSE(u.tls);
  CHECK(u.host == "svc");
  CHECK(u.port == "80");
  CHECK(u.target == "/events");
  CHECK(u.host_header == "svc");

  REQUIRE(parse_url("HTTPS://svc.internal:8443", u, err));
  CHECK(u.tls);
  CHECK(u.port == "8443");
  CHECK(u.target == "/");
  CHECK(u.host_header == "svc.internal:8443");

  REQUIRE(parse_url("http://[::1]:9000/in/{event_type}?x=1", u, err));
  CHECK(u.host == "::1");
  CHECK(u.host_header == "[::1]:9000");
  CHECK(u.target == "/in/{event_type}?x=1");

  REQUIRE(parse_url("https://h:443?q", u, err));
  CHECK(u.target == "/?q");
  CHECK(u.host_header == "h");  // the default port is not repeated
}

TEST_CASE("parse_url refuses what it cannot send", "[http]") {
  Url u;
  std::string err;
  const char* bad[] = {"ftp://h/x",       "http://",           "http:///x",        "http://u:p@h/x",
                       "http://h:0/",     "http://h:65536/",   "http://h:/x",      "http://h:12a/",
                       "http://h/x#frag", "http://h/a b",      "http://h/a\r\nX:1", "http://[::1/x",
                       "http://h\x01/",   "http://h/\xc3\xa9", "http://[zz]/"};
  for (const char* b : bad) {
    INFO(b);
    CHECK_FALSE(parse_url(b, u, err));
    CHECK_FALSE(err.empty());
  }
}

TEST_CASE("percent_encode keeps only unreserved characters", "[http]") {
  CHECK(percent_encode("speaker.assigned_v2-x~") == "speaker.assigned_v2-x~");
  CHECK(percent_encode("a/b?c#d e%") == "a%2Fb%3Fc%23d%20e%25");
  CHECK(percent_encode("\r\n") == "%0D%0A");
  CHECK(percent_encode("\xc3\xa9") == "%C3%A9");
  CHECK(percent_encode(std::string("a\0b", 3)) == "a%00b");
}

TEST_CASE("expand_target replaces every placeholder", "[http]") {
  CHECK(expand_target("/e/{event_type}", "a/b") == "/e/a%2Fb");
  CHECK(expand_target("/e/{event_type}?t={event_type}", "x y") == "/e/x%20y?t=x%20y");
  CHECK(expand_target("/fixed", "x") == "/fixed");
  CHECK(expand_target("/{event_type", "x") == "/{event_type");
}

TEST_CASE("header names and values", "[http]") {
  CHECK(valid_header_name("Authorization"));
  CHECK(valid_header_name("X-Api-Key"));
  CHECK(valid_header_name("x!#$%&'*+-.^_`|~"));
  CHECK_FALSE(valid_header_name(""));
  CHECK_FALSE(valid_header_name("Bad Name"));
  CHECK_FALSE(valid_header_name("X:Y"));
  CHECK_FALSE(valid_header_name("X\r\nY"));
  CHECK_FALSE(valid_header_name("\xc3\xa9"));

  CHECK(valid_header_value("Bearer abc.def"));
  CHECK(valid_header_value(""));
  CHECK(valid_header_value("caf\xc3\xa9"));  // obs-text cannot split a header
  CHECK_FALSE(valid_header_value("a\r\nX-Injected: 1"));
  CHECK_FALSE(valid_header_value("a\nb"));
  CHECK_FALSE(valid_header_value("a\rb"));
  CHECK_FALSE(valid_header_value("a\tb"));
  CHECK_FALSE(valid_header_value(std::string("a\0b", 3)));
  CHECK_FALSE(valid_header_value("a\x7f"));
}

TEST_CASE("parse_duration_ms", "[http]") {
  CHECK(parse_duration_ms("10s") == 10000u);
  CHECK(parse_duration_ms("250ms") == 250u);
  CHECK(parse_duration_ms("2m") == 120000u);
  CHECK(parse_duration_ms("1h") == 3600000u);
  CHECK_FALSE(parse_duration_ms("10"));
  CHECK_FALSE(parse_duration_ms("s"));
  CHECK_FALSE(parse_duration_ms("1.5s"));
  CHECK_FALSE(parse_duration_ms("-1s"));
  CHECK_FALSE(parse_duration_ms("9999999999999s"));
}

TEST_CASE("parse_retry_after: seconds and the three HTTP-date forms", "[http]") {
  const std::time_t now = 784111777;  // Sun, 06 Nov 1994 08:49:37 GMT
  CHECK(parse_retry_after_ms("120", now) == 120000u);
  CHECK(parse_retry_after_ms(" 0 ", now) == 0u);
  CHECK(parse_retry_after_ms("99999999999999", now) == 24u * 3600 * 1000);  // the answers' cap
  CHECK(parse_retry_after_ms("Sun, 06 Nov 1994 08:49:47 GMT", now) == 10000u);
  CHECK(parse_retry_after_ms("Sunday, 06-Nov-94 08:50:37 GMT", now) == 60000u);
  CHECK(parse_retry_after_ms("Sun Nov  6 08:49:57 1994", now) == 20000u);
  CHECK(parse_retry_after_ms("Sun, 06 Nov 1994 08:00:00 GMT", now) == 0u);  // past: no extra wait
  CHECK_FALSE(parse_retry_after_ms("", now));
  CHECK_FALSE(parse_retry_after_ms("-5", now));
  CHECK_FALSE(parse_retry_after_ms("1.5", now));
  CHECK_FALSE(parse_retry_after_ms("soon", now));
  CHECK_FALSE(parse_retry_after_ms("Sun, 06 Nov 1994 08:49:47 GMT trailing", now));
}

TEST_CASE("decide: the status table", "[http]") {
  const std::time_t now = 784111777;
  CHECK(decide(200, "OK", "", "", "", now).verdict == Verdict::Ack);
  CHECK(decide(204, "", "", "", "", now).verdict == Verdict::Ack);
  for (unsigned s : {408u, 500u, 502u, 504u}) {
    INFO(s);
    Decision d = decide(s, "X", "text/plain", "", "down", now);
    CHECK(d.verdict == Verdict::Retry);
    CHECK(d.delay_ms == 0);
    CHECK(d.reason.rfind("HTTP " + std::to_string(s) + " X: down", 0) == 0);
  }
  Decision d = decide(302, "Found", "", "", "", now);
  CHECK(d.verdict == Verdict::Retry);  // a wrong url, not a bad event
  CHECK(d.reason == "HTTP 302 Found (redirects are not followed: check the url)");
  d = decide(503, "Service Unavailable", "", "7", "", now);
  CHECK(d.verdict == Verdict::Retry);
  CHECK(d.delay_ms == 7000);
  CHECK(d.reason == "HTTP 503 Service Unavailable");
  d = decide(429, "", "", "Sun, 06 Nov 1994 08:49:40 GMT", "", now);
  CHECK(d.delay_ms == 3000);
  CHECK(decide(429, "", "", "garbage", "", now).delay_ms == 0);
  CHECK(decide(500, "", "", "7", "", now).delay_ms == 0);  // only 429 and 503 carry one

  d = decide(404, "Not Found", "text/plain", "", std::string(300, 'x') + "\r\nX", now);
  CHECK(d.verdict == Verdict::DeadLetter);
  CHECK(d.reason == "HTTP 404 Not Found: " + std::string(kBodyInReason, 'x') + "...");
  d = decide(422, "", "application/json", "", "{\"detail\":[{\"msg\":\"field required\"}]}", now);
  CHECK(d.verdict == Verdict::DeadLetter);  // a JSON body without a verdict is just text
  CHECK(d.reason == "HTTP 422: {\"detail\":[{\"msg\":\"field required\"}]}");
  d = decide(400, "", "", "", "a\r\nb\x01", now);
  CHECK(d.reason == "HTTP 400: a  b ");  // controls never reach the reason
}

TEST_CASE("decide: an explicit answer in the worker protocol's vocabulary", "[http]") {
  const std::time_t now = 0;
  Decision d = decide(200, "", "application/json; charset=utf-8", "",
                      R"({"verdict":"dead_letter","reason":"bad_payload","detail":"speaker_id missing"})", now);
  CHECK(d.verdict == Verdict::DeadLetter);
  CHECK(d.reason == "bad_payload: speaker_id missing");
  d = decide(500, "", "application/json", "", R"({"verdict":"ack"})", now);
  CHECK(d.verdict == Verdict::Ack);  // the answer decides for any status
  d = decide(200, "", "application/problem+json", "", R"({"verdict":"retry","delay_ms":30000})", now);
  CHECK(d.verdict == Verdict::Retry);
  CHECK(d.delay_ms == 30000);
  CHECK(d.reason == "handler_failed");
  d = decide(200, "", "application/json", "", R"({"verdict":"dead_letter"})", now);
  CHECK(d.reason == "handler_rejected");
  d = decide(200, "", "application/json", "",
             R"({"verdict":"ack","emit":[{"event_type":"a.b","payload":{"n":1}},{"event_type":"c"}]})", now);
  CHECK(d.verdict == Verdict::Ack);
  REQUIRE(d.emits.size() == 2);
  CHECK(d.emits[0] == R"({"event_type":"a.b","payload":{"n":1}})");
  d = decide(200, "", "application/json", "", R"({"verdict":"retry","emit":[{"event_type":"x"}]})", now);
  CHECK(d.emits.empty());  // emits only with an ack
  d = decide(200, "", "application/json", "", R"({"verdict":"ack","emit":{"event_type":"x"}})", now);
  CHECK(d.verdict == Verdict::DeadLetter);
  CHECK(d.reason.rfind("emit_invalid", 0) == 0);
  d = decide(200, "", "application/json", "", R"({"verdict":"ack","emit":[1]})", now);
  CHECK(d.verdict == Verdict::DeadLetter);

  // Malformed answers: the service's bug, retried.
  const char* bad[] = {R"({"verdict":"maybe"})", R"({"verdict":1})", R"({"verdict":"retry","delay_ms":-1})",
                       R"({"verdict":"retry","delay_ms":"5"})", R"({"verdict":"dead_letter","reason":"has space"})",
                       R"({"verdict":"dead_letter","detail":7})"};
  for (const char* b : bad) {
    INFO(b);
    d = decide(200, "OK", "application/json", "", b, now);
    CHECK(d.verdict == Verdict::Retry);
    CHECK(d.reason.rfind("HTTP 200 OK: bad answer: ", 0) == 0);
  }
  // Not JSON, or not declared as JSON: the status decides.
  CHECK(decide(200, "", "text/plain", "", R"({"verdict":"dead_letter"})", now).verdict == Verdict::Ack);
  CHECK(decide(200, "", "application/json", "", "{not json", now).verdict == Verdict::Ack);
  CHECK(decide(200, "", "application/json", "", std::string(100000, '['), now).verdict == Verdict::Ack);
}
