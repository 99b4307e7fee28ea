#pragma once
// The pure parts of the http plugin (no I/O): config values, URLs, header
// checks, Retry-After and the mapping of a response to a verdict. Unit-tested
// in tests/unit/plugins/http; linked into the plugin and the unit tests.
#include <cstdint>
#include <ctime>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace er_http {

// http[s]://host[:port][/path][?query]; `{event_type}` may appear in the path
// or query and is replaced by the percent-encoded event type.
struct Url {
  bool tls = false;
  std::string host;    // without brackets for an IPv6 literal
  std::string port;    // "80"/"443" by default
  std::string target;  // path and query, "/" at least; may hold {event_type}
  std::string host_header;  // as the Host header carries it (with a non-default port)
};

// False and `err` set on anything but the form above: no userinfo, no
// fragment, no whitespace or control characters, port 1..65535.
bool parse_url(std::string_view text, Url& out, std::string& err);

// RFC 3986 percent-encoding of everything but the unreserved characters, so
// an event type cannot add a path segment, a query or a line break.
std::string percent_encode(std::string_view s);

// The target with every {event_type} replaced by percent_encode(type).
std::string expand_target(std::string_view target, std::string_view event_type);

// An RFC 9110 token (the header name grammar).
bool valid_header_name(std::string_view name);
// No control character (0x00-0x1F, 0x7F; so no CR, LF, NUL or tab): such a
// value cannot split a header or start another one. Bytes >= 0x80 pass.
bool valid_header_value(std::string_view value);

// "10s", "500ms", "2m", "1h" (a whole number and a unit) to milliseconds.
std::optional<uint64_t> parse_duration_ms(std::string_view s);

// Retry-After: delay-seconds or an HTTP-date (IMF-fixdate, RFC 850 or
// asctime), relative to `now`. A date in the past is 0. Nothing if invalid.
std::optional<uint64_t> parse_retry_after_ms(std::string_view value, std::time_t now);

enum class Verdict { Ack = 0, Retry = 1, DeadLetter = 2 };

struct Decision {
  Verdict verdict = Verdict::Ack;
  uint64_t delay_ms = 0;        // retry only; 0 = the queue's backoff
  std::string reason;           // retry and dead-letter: the human reason
  std::vector<std::string> emits;  // ack only: JSON objects for host->emit
};

// Bytes of a response body quoted in a reason.
inline constexpr size_t kBodyInReason = 200;

// The outcome of one response (docs/http.md's table): the status decides,
// unless the body is a JSON object with a `verdict` (the worker protocol's
// vocabulary: verdict, delay_ms, reason, detail, emit), which decides for
// any status. A malformed answer is retried (the service's bug).
Decision decide(unsigned status, std::string_view reason_phrase, std::string_view content_type,
                std::string_view retry_after, std::string_view body, std::time_t now);

}  // namespace er_http
