#include "http_parts.hpp"

#include "dispatch/answer_rules.hpp"

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cstring>
#include <ctime>

namespace er_http {

namespace {

using er::answer::cut_utf8;
using er::answer::json_type_name;
using er::answer::kMaxDelayMs;
using er::answer::kMaxDetailBytes;
using er::answer::valid_reason;

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_alnum(char c) { return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }

bool iequal(std::string_view a, std::string_view b) {
  auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [&](char x, char y) { return lower(x) == lower(y); });
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

// Text quoted in a reason: controls become spaces (it ends up in a header
// of the dead-letter copy and in log lines).
std::string printable(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (is_ctl(static_cast<unsigned char>(c))) c = ' ';
  return out;
}

std::string status_text(unsigned status, std::string_view phrase) {
  std::string s = "HTTP " + std::to_string(status);
  if (!phrase.empty()) s += " " + printable(cut_utf8(phrase, 64));
  return s;
}

std::string with_body(std::string s, std::string_view body) {
  body = trim(body);
  if (body.empty()) return s;
  std::string_view start = cut_utf8(body, kBodyInReason);
  s += ": " + printable(start);
  if (start.size() < body.size()) s += "...";
  return s;
}

bool json_media_type(std::string_view ct) {
  ct = trim(ct.substr(0, std::min(ct.find(';'), ct.size())));
  if (iequal(ct, "application/json")) return true;
  return ct.size() > 5 && iequal(ct.substr(ct.size() - 5), "+json");
}

// The answer in the worker protocol's vocabulary; false + `err` if malformed.
bool read_answer(const rapidjson::Value& doc, Decision& d, std::string& err) {
  auto present = [&](const char* key) -> const rapidjson::Value* {
    auto m = doc.FindMember(key);
    return m != doc.MemberEnd() && !m->value.IsNull() ? &m->value : nullptr;
  };
  const rapidjson::Value* v = present("verdict");
  std::string_view verdict = v && v->IsString() ? std::string_view(v->GetString(), v->GetStringLength()) : "";
  if (verdict == "ack") {
    d.verdict = Verdict::Ack;
  } else if (verdict == "retry") {
    d.verdict = Verdict::Retry;
  } else if (verdict == "dead_letter") {
    d.verdict = Verdict::DeadLetter;
  } else {
    err = "\"verdict\" must be \"ack\", \"retry\" or \"dead_letter\"";
    return false;
  }
  std::string reason, detail;
  if (const auto* r = present("reason")) {
    std::string_view rs = r->IsString() ? std::string_view(r->GetString(), r->GetStringLength()) : "";
    if (!valid_reason(rs)) {
      err = "\"reason\" must be 1 to 64 of [A-Za-z0-9_.-]";
      return false;
    }
    reason = rs;
  }
  if (const auto* t = present("detail")) {
    if (!t->IsString()) {
      err = std::string("\"detail\" is ") + json_type_name(*t) + ", not a string";
      return false;
    }
    detail = printable(cut_utf8(std::string_view(t->GetString(), t->GetStringLength()), kMaxDetailBytes));
  }
  if (const auto* t = present("delay_ms")) {
    if (!t->IsUint64()) {
      err = "\"delay_ms\" must be a non-negative integer";
      return false;
    }
    if (d.verdict == Verdict::Retry) d.delay_ms = std::min<uint64_t>(t->GetUint64(), kMaxDelayMs);
  }
  if (d.verdict != Verdict::Ack) {
    d.reason = reason.empty() ? (d.verdict == Verdict::Retry ? "handler_failed" : "handler_rejected") : reason;
    if (!detail.empty()) d.reason += ": " + detail;
    return true;
  }
  if (const auto* e = present("emit")) {
    if (!e->IsArray()) {
      d = Decision{Verdict::DeadLetter, 0, std::string("emit_invalid: \"emit\" is ") + json_type_name(*e) + ", not an array", {}};
      return true;
    }
    size_t i = 0;
    for (const auto& item : e->GetArray()) {
      if (!item.IsObject()) {
        d = Decision{Verdict::DeadLetter, 0,
                     "emit_invalid: emit[" + std::to_string(i) + "] is " + json_type_name(item) + ", not an object", {}};
        return true;
      }
      rapidjson::StringBuffer buf;
      rapidjson::Writer<rapidjson::StringBuffer> w(buf);
      item.Accept(w);
      d.emits.emplace_back(buf.GetString(), buf.GetSize());
      ++i;
    }
  }
  return true;
}

}  // namespace

bool parse_url(std::string_view text, Url& out, std::string& err) {
  out = Url{};
  for (char c : text) {
    auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f) {
      err = "url: spaces, control and non-ASCII characters must be percent-encoded";
      return false;
    }
  }
  std::string_view rest;
  if (text.size() >= 7 && iequal(text.substr(0, 7), "http://")) {
    rest = text.substr(7);
  } else if (text.size() >= 8 && iequal(text.substr(0, 8), "https://")) {
    out.tls = true;
    rest = text.substr(8);
  } else {
    err = "url: must start with http:// or https://";
    return false;
  }
  size_t end = std::min(rest.find_first_of("/?#"), rest.size());
  std::string_view authority = rest.substr(0, end);
  std::string_view target = rest.substr(end);
  if (target.find('#') != std::string_view::npos) {
    err = "url: a fragment (#...) is never sent; remove it";
    return false;
  }
  if (authority.find('@') != std::string_view::npos) {
    err = "url: credentials in the url are not supported; use a header (headers: {Authorization: ...})";
    return false;
  }
  std::string_view host, port;
  if (!authority.empty() && authority[0] == '[') {
    size_t close = authority.find(']');
    if (close == std::string_view::npos) {
      err = "url: unterminated IPv6 address";
      return false;
    }
    host = authority.substr(1, close - 1);
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') {
        err = "url: unexpected text after the IPv6 address";
        return false;
      }
      port = after.substr(1);
    }
    if (host.empty() || !std::all_of(host.begin(), host.end(), [](char c) {
          return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.';
        })) {
      err = "url: invalid IPv6 address";
      return false;
    }
  } else {
    size_t colon = authority.find(':');
    host = authority.substr(0, colon);
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
    if (host.empty() || !std::all_of(host.begin(), host.end(),
                                     [](char c) { return is_alnum(c) || c == '-' || c == '.' || c == '_'; })) {
      err = "url: missing or invalid host";
      return false;
    }
  }
  if (!port.empty() || authority.find(':', host.size()) != std::string_view::npos) {
    unsigned long n = 0;
    bool ok = !port.empty() && port.size() <= 5 && std::all_of(port.begin(), port.end(), is_digit);
    if (ok) n = std::stoul(std::string(port));
    if (!ok || n < 1 || n > 65535) {
      err = "url: port must be 1 to 65535";
      return false;
    }
  }
  out.host = host;
  const char* def = out.tls ? "443" : "80";
  out.port = port.empty() ? def : std::string(port);
  std::string h = authority[0] == '[' ? "[" + out.host + "]" : out.host;
  out.host_header = out.port == def ? h : h + ":" + out.port;
  out.target = target.empty() ? "/" : target[0] == '?' ? "/" + std::string(target) : std::string(target);
  return true;
}

std::string percent_encode(std::string_view s) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    if (is_alnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += c;
    } else {
      auto u = static_cast<unsigned char>(c);
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 15];
    }
  }
  return out;
}

std::string expand_target(std::string_view target, std::string_view event_type) {
  static constexpr std::string_view kPlaceholder = "{event_type}";
  std::string out;
  size_t from = 0;
  for (size_t at; (at = target.find(kPlaceholder, from)) != std::string_view::npos; from = at + kPlaceholder.size()) {
    out.append(target.substr(from, at - from));
    out += percent_encode(event_type);
  }
  out.append(target.substr(from));
  return out;
}

bool valid_header_name(std::string_view name) {
  static constexpr std::string_view kTchar = "!#$%&'*+-.^_`|~";
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return is_alnum(c) || kTchar.find(c) != std::string_view::npos;
  });
}

bool valid_header_value(std::string_view value) {
  return std::none_of(value.begin(), value.end(), [](char c) { return is_ctl(static_cast<unsigned char>(c)); });
}

std::optional<uint64_t> parse_duration_ms(std::string_view s) {
  size_t n = 0;
  while (n < s.size() && is_digit(s[n])) ++n;
  if (n == 0 || n > 12) return std::nullopt;
  uint64_t v = std::stoull(std::string(s.substr(0, n)));
  std::string_view unit = s.substr(n);
  if (unit == "ms") return v;
  if (unit == "s") return v * 1000;
  if (unit == "m") return v * 60'000;
  if (unit == "h") return v * 3'600'000;
  return std::nullopt;
}

std::optional<uint64_t> parse_retry_after_ms(std::string_view value, std::time_t now) {
  value = trim(value);
  if (value.empty()) return std::nullopt;
  if (std::all_of(value.begin(), value.end(), is_digit)) {
    if (value.size() > 10) return kMaxDelayMs;  // absurdly long: the cap decides anyway
    return std::min<uint64_t>(std::stoull(std::string(value)) * 1000, kMaxDelayMs);
  }
  // The three HTTP-date forms (RFC 9110 5.6.7); the daemon runs in the C locale.
  static const char* const kFormats[] = {"%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT",
                                         "%a %b %e %H:%M:%S %Y"};
  const std::string text(value);
  for (const char* f : kFormats) {
    std::tm tm{};
    const char* end = strptime(text.c_str(), f, &tm);
    if (!end || *end != '\0') continue;
    std::time_t at = timegm(&tm);
    if (at == static_cast<std::time_t>(-1)) return std::nullopt;
    if (at <= now) return 0;
    return std::min<uint64_t>(static_cast<uint64_t>(at - now) * 1000, kMaxDelayMs);
  }
  return std::nullopt;
}

Decision decide(unsigned status, std::string_view reason_phrase, std::string_view content_type,
                std::string_view retry_after, std::string_view body, std::time_t now) {
  Decision d;
  if (json_media_type(content_type) && !body.empty()) {
    rapidjson::Document doc;
    doc.Parse<rapidjson::kParseIterativeFlag | rapidjson::kParseValidateEncodingFlag>(body.data(), body.size());
    if (!doc.HasParseError() && doc.IsObject() && doc.HasMember("verdict")) {
      std::string err;
      if (read_answer(doc, d, err)) return d;
      return Decision{Verdict::Retry, 0, status_text(status, reason_phrase) + ": bad answer: " + err, {}};
    }
  }
  if (status >= 200 && status < 300) return d;
  if (status == 429 || status == 503) {
    d.verdict = Verdict::Retry;
    d.delay_ms = parse_retry_after_ms(retry_after, now).value_or(0);
    d.reason = with_body(status_text(status, reason_phrase), body);
    return d;
  }
  if (status >= 400 && status < 500 && status != 408) {
    d.verdict = Verdict::DeadLetter;
    d.reason = with_body(status_text(status, reason_phrase), body);
    return d;
  }
  // 408, 5xx, and what should not reach us (1xx, 3xx: redirects are not
  // followed): the event is not at fault, so it is retried.
  d.verdict = Verdict::Retry;
  std::string s = status_text(status, reason_phrase);
  if (status >= 300 && status < 400) s += " (redirects are not followed: check the url)";
  d.reason = with_body(std::move(s), body);
  return d;
}

}  // namespace er_http
