// The http plugin (ABI version 2): POSTs each event to a service's HTTP
// endpoint and completes it from its own Asio thread when the answer comes
// (docs/http.md). handle() only checks the event's header fields, builds the
// request and hands it to the plugin's io_context: it never blocks.
#include <event_router/plugin.h>

#include <openssl/err.h>
#include <pthread.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <rapidjson/document.h>
#include <rapidjson/error/en.h>

#include <algorithm>
#include <boost/asio/connect.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>
#include <vector>

#include "http_parts.hpp"

namespace {

namespace asio = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;
using er_http::Decision;
using er_http::Verdict;

// A response body larger than this is not read (the answer's emits are
// limited to 16 MiB by the daemon anyway): the request is retried.
constexpr uint64_t kMaxResponseBytes = 17u << 20;

struct Config {
  er_http::Url url;
  std::chrono::milliseconds timeout{10'000};
  unsigned max_connections = 8;
  std::string source;  // empty: the event's queue
  std::vector<std::pair<std::string, std::string>> headers;
  bool tls_verify = true;
  std::string ca, cert, key;
};

// ---------------------------------------------------------------------------
// Config

std::string lower_ascii(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool is_reserved_header(std::string_view name) {
  static const char* const kReserved[] = {"host", "content-length", "content-type", "transfer-encoding",
                                          "connection", "te", "upgrade", "keep-alive", "trailer"};
  const std::string lower = lower_ascii(name);
  if (lower.rfind("ce-", 0) == 0) return true;  // the event's own (CloudEvents) headers
  for (const char* r : kReserved)
    if (lower == r) return true;
  return false;
}

bool readable(const std::string& path, const char* what, std::string& err) {
  if (path.empty()) {
    err = std::string(what) + ": empty path";
    return false;
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    err = std::string(what) + ": cannot read " + path + ": " + std::strerror(errno);
    return false;
  }
  std::fclose(f);
  return true;
}

const char* json_type(const rapidjson::Value& v) {
  if (v.IsString()) return "a string";
  if (v.IsNumber()) return "a number";
  if (v.IsBool()) return "a boolean";
  if (v.IsObject()) return "a mapping";
  if (v.IsArray()) return "a list";
  return "null";
}

bool string_field(const rapidjson::Value& v, const char* what, std::string& out, std::string& err) {
  if (!v.IsString()) {
    err = std::string(what) + ": expected a string, got " + json_type(v);
    return false;
  }
  out.assign(v.GetString(), v.GetStringLength());
  return true;
}

bool load_tls(const rapidjson::Value& t, Config& c, std::string& err) {
  if (!t.IsObject()) {
    err = std::string("tls: expected a mapping, got ") + json_type(t);
    return false;
  }
  for (auto& m : t.GetObject()) {
    std::string_view k(m.name.GetString(), m.name.GetStringLength());
    if (k == "ca") {
      if (!string_field(m.value, "tls.ca", c.ca, err) || !readable(c.ca, "tls.ca", err)) return false;
    } else if (k == "cert") {
      if (!string_field(m.value, "tls.cert", c.cert, err) || !readable(c.cert, "tls.cert", err)) return false;
    } else if (k == "key") {
      if (!string_field(m.value, "tls.key", c.key, err) || !readable(c.key, "tls.key", err)) return false;
    } else if (k == "verify") {
      if (!m.value.IsBool()) {
        err = std::string("tls.verify: expected true or false, got ") + json_type(m.value);
        return false;
      }
      c.tls_verify = m.value.GetBool();
    } else {
      err = "tls: unknown key '" + std::string(k) + "' (known: ca, cert, key, verify)";
      return false;
    }
  }
  if (c.cert.empty() != c.key.empty()) {
    err = "tls: a client certificate needs both cert and key";
    return false;
  }
  return true;
}

bool load_config(const char* json, size_t len, Config& c, std::string& err) {
  rapidjson::Document doc;
  doc.Parse(json, len);
  if (doc.HasParseError() || !doc.IsObject()) {
    err = "config: expected a mapping";
    return false;
  }
  bool have_url = false, have_tls = false;
  for (auto& m : doc.GetObject()) {
    std::string_view k(m.name.GetString(), m.name.GetStringLength());
    const rapidjson::Value& v = m.value;
    if (k == "url") {
      std::string u;
      if (!string_field(v, "url", u, err) || !er_http::parse_url(u, c.url, err)) return false;
      have_url = true;
    } else if (k == "timeout") {
      std::string t;
      if (!string_field(v, "timeout", t, err)) return false;
      auto ms = er_http::parse_duration_ms(t);
      if (!ms || *ms == 0 || *ms > 3'600'000) {
        err = "timeout: expected a duration from 1ms to 1h such as 10s or 500ms, got '" + t + "'";
        return false;
      }
      c.timeout = std::chrono::milliseconds(*ms);
    } else if (k == "max_connections") {
      if (!v.IsUint() || v.GetUint() < 1 || v.GetUint() > 10000) {
        err = "max_connections: expected an integer from 1 to 10000";
        return false;
      }
      c.max_connections = v.GetUint();
    } else if (k == "source") {
      if (!string_field(v, "source", c.source, err)) return false;
      if (c.source.empty() || !er_http::valid_header_value(c.source)) {
        err = "source: must be non-empty, without control characters";
        return false;
      }
    } else if (k == "headers") {
      if (!v.IsObject()) {
        err = std::string("headers: expected a mapping, got ") + json_type(v);
        return false;
      }
      for (auto& h : v.GetObject()) {
        std::string name(h.name.GetString(), h.name.GetStringLength()), value;
        if (!er_http::valid_header_name(name)) {
          err = "headers: invalid header name '" + er_http::percent_encode(name) + "' (letters, digits and !#$%&'*+-.^_`|~ only)";
          return false;
        }
        if (is_reserved_header(name)) {
          err = "headers: '" + name + "' is set by the plugin and cannot be configured";
          return false;
        }
        if (!string_field(h.value, ("headers." + name).c_str(), value, err)) return false;
        if (!er_http::valid_header_value(value)) {
          // Never the value itself: it may hold a secret.
          err = "headers." + name + ": the value contains a control character (CR, LF, tab, ...)";
          return false;
        }
        // Header names are case-insensitive: of one configured twice the
        // last value counts.
        const std::string key = lower_ascii(name);
        auto same = std::find_if(c.headers.begin(), c.headers.end(),
                                 [&](const auto& h) { return lower_ascii(h.first) == key; });
        if (same != c.headers.end())
          same->second = std::move(value);
        else
          c.headers.emplace_back(std::move(name), std::move(value));
      }
    } else if (k == "tls") {
      if (!load_tls(v, c, err)) return false;
      have_tls = true;
    } else {
      err = "unknown key '" + std::string(k) + "' (known: url, timeout, max_connections, source, headers, tls)";
      return false;
    }
  }
  if (!have_url) {
    err = "url: required (http://host[:port]/path or https://...)";
    return false;
  }
  if (have_tls && !c.url.tls) {
    err = "tls: given, but the url is http://";
    return false;
  }
  return true;
}

std::optional<ssl::context> make_tls(const Config& c, std::string& err) {
  ssl::context ctx(ssl::context::tls_client);
  ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                  ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1);
  boost::system::error_code ec;
  if (!c.ca.empty()) {
    ctx.load_verify_file(c.ca, ec);
    if (ec) {
      err = "tls.ca: " + c.ca + ": not a PEM certificate file (" + ec.message() + ")";
      return std::nullopt;
    }
  } else {
    ctx.set_default_verify_paths(ec);
  }
  if (!c.cert.empty()) {
    ctx.use_certificate_chain_file(c.cert, ec);
    if (ec) {
      err = "tls.cert: " + c.cert + ": not a PEM certificate chain (" + ec.message() + ")";
      return std::nullopt;
    }
    ctx.use_private_key_file(c.key, ssl::context::pem, ec);
    if (ec) {
      err = "tls.key: " + c.key + ": not a PEM private key (" + ec.message() + ")";
      return std::nullopt;
    }
    if (SSL_CTX_check_private_key(ctx.native_handle()) != 1) {
      err = "tls.key: does not match tls.cert";
      return std::nullopt;
    }
  }
  ctx.set_verify_mode(c.tls_verify ? ssl::verify_peer : ssl::verify_none);
  return std::optional<ssl::context>(std::move(ctx));
}

// ---------------------------------------------------------------------------
// Requests, connections and the pool (all on the plugin's io thread)

struct Instance;

struct Job {
  er_event_handle* handle = nullptr;
  std::string wire;     // the whole request, head and body, as sent
  bool resent = false;  // sent again on a fresh connection already
};

// Keeps of a response only what decide() reads (status, reason, two fields,
// the body): a parser that stores every field allocates one node per field.
class ResponseParser : public http::basic_parser<false> {
 public:
  explicit ResponseParser(std::string& body) : body_(body) { body_.clear(); }

  unsigned status = 0;
  std::string reason, content_type, retry_after;

 private:
  void on_request_impl(http::verb, beast::string_view, beast::string_view, int, beast::error_code&) override {}
  void on_response_impl(int code, beast::string_view r, int, beast::error_code&) override {
    status = static_cast<unsigned>(code);
    reason.assign(r.data(), r.size());
  }
  void on_field_impl(http::field f, beast::string_view, beast::string_view v, beast::error_code&) override {
    // The first of a repeated field counts (as http::fields::find did).
    if (f == http::field::content_type && !have_ct_) {
      have_ct_ = true;
      content_type.assign(v.data(), v.size());
    } else if (f == http::field::retry_after && !have_ra_) {
      have_ra_ = true;
      retry_after.assign(v.data(), v.size());
    }
  }
  void on_header_impl(beast::error_code&) override {}
  void on_body_init_impl(const boost::optional<uint64_t>& n, beast::error_code&) override {
    if (n) body_.reserve(static_cast<size_t>(*n));  // within body_limit: checked before this call
  }
  size_t on_body_impl(beast::string_view b, beast::error_code&) override {
    body_.append(b.data(), b.size());
    return b.size();
  }
  void on_chunk_header_impl(uint64_t, beast::string_view, beast::error_code&) override {}
  size_t on_chunk_body_impl(uint64_t, beast::string_view b, beast::error_code&) override {
    body_.append(b.data(), b.size());
    return b.size();
  }
  void on_finish_impl(beast::error_code&) override {}

  std::string& body_;
  bool have_ct_ = false, have_ra_ = false;
};

void finish(Instance& inst, Job& job, Decision d);

class Pool;

class Conn : public std::enable_shared_from_this<Conn> {
 public:
  Conn(Instance& inst, Pool& pool);
  void run(std::unique_ptr<Job> job);
  void close();

 private:
  tcp::socket& lowest() { return tls_ ? tls_->next_layer() : *sock_; }
  template <typename F>
  void with_stream(F&& f) {
    if (tls_)
      f(*tls_);
    else
      f(*sock_);
  }
  void arm_deadline();
  void connect();
  void on_resolve(const boost::system::error_code& ec, const tcp::resolver::results_type& results);
  void on_connect(const boost::system::error_code& ec);
  void send();
  void read_answer();
  void on_read(const boost::system::error_code& ec);
  void fail(const char* stage, const boost::system::error_code& ec);
  void done(Decision d, bool reusable);

  Instance& inst_;
  Pool& pool_;
  tcp::resolver resolver_;
  asio::steady_timer deadline_;
  std::optional<tcp::socket> sock_;
  std::optional<ssl::stream<tcp::socket>> tls_;
  bool connected_ = false;
  bool reused_ = false;     // this request went out on a connection that had served one
  bool timed_out_ = false;
  unsigned deadline_gen_ = 0;  // a deadline that fired for an earlier request is ignored
  beast::flat_buffer buf_;
  std::string body_;  // the response body; its capacity kept from one request to the next
  bool interim_ = false;  // a 1xx came for this request
  std::optional<ResponseParser> parser_;
  std::unique_ptr<Job> job_;
};

class Pool {
 public:
  Pool(Instance& inst, unsigned max) : inst_(inst), max_(max) {}

  void submit(std::unique_ptr<Job> job) {
    if (stopping_) return;
    if (!idle_.empty()) {
      auto c = std::move(idle_.back());
      idle_.pop_back();
      c->run(std::move(job));
    } else if (all_.size() < max_) {
      auto c = std::make_shared<Conn>(inst_, *this);
      all_.insert(c);
      c->run(std::move(job));
    } else {
      waiting_.push_back(std::move(job));  // every connection is busy
    }
  }

  // A connection finished its request; `reusable`: still open (keep-alive).
  void release(const std::shared_ptr<Conn>& c, bool reusable) {
    if (stopping_) return;
    if (!waiting_.empty()) {
      auto job = std::move(waiting_.front());
      waiting_.pop_front();
      if (!reusable) c->close();
      c->run(std::move(job));
    } else if (reusable) {
      idle_.push_back(c);
    } else {
      all_.erase(c);
    }
  }

  // Cleanup: the daemon has no pending event of this instance left (a
  // request still running belongs to an event that timed out): drop it all.
  void stop() {
    stopping_ = true;
    waiting_.clear();
    idle_.clear();
    for (const auto& c : all_) c->close();
    all_.clear();
  }
  bool stopping() const { return stopping_; }

 private:
  Instance& inst_;
  unsigned max_;
  bool stopping_ = false;
  std::deque<std::unique_ptr<Job>> waiting_;
  std::vector<std::shared_ptr<Conn>> idle_;
  std::unordered_set<std::shared_ptr<Conn>> all_;
};

struct Instance {
  const er_host* host;
  Config cfg;
  std::string fixed_head;  // the header lines every request carries, built once
  std::optional<ssl::context> tls;
  asio::io_context io{1};
  asio::executor_work_guard<asio::io_context::executor_type> guard{io.get_executor()};
  Pool pool;
  std::thread thread;
  // Requests from handle() wait here; one post takes all that came in
  // meanwhile, so a burst of events costs the io thread one wake-up.
  std::mutex inbox_m;
  std::vector<std::unique_ptr<Job>> inbox, taken;
  bool posted = false;  // a take_inbox is on its way (under inbox_m)

  Instance(const er_host* h, Config c, std::optional<ssl::context> t)
      : host(h), cfg(std::move(c)), tls(std::move(t)), pool(*this, cfg.max_connections) {
    auto line = [&](std::string_view name, std::string_view value) {
      fixed_head.append(name).append(": ").append(value).append("\r\n");
    };
    line("Host", cfg.url.host_header);
    line("Content-Type", "application/json");
    // A configured User-Agent replaces the default.
    if (std::none_of(cfg.headers.begin(), cfg.headers.end(),
                     [](const auto& h) { return lower_ascii(h.first) == "user-agent"; }))
      line("User-Agent", "event-router/" ER_VERSION);
    line("ce-specversion", "1.0");
    if (!cfg.source.empty()) line("ce-source", cfg.source);
    for (const auto& [name, value] : cfg.headers) line(name, value);
  }

  // handle() may run on several threads at once (ER_PLUGIN_CONCURRENT).
  void enqueue(std::unique_ptr<Job> job) {
    const Job* mine = job.get();
    bool first;
    {
      std::lock_guard<std::mutex> lock(inbox_m);
      inbox.push_back(std::move(job));
      first = !posted;
      posted = true;
    }
    if (!first) return;  // a post is on its way already
    try {
      asio::post(io, [this] { take_inbox(); });
    } catch (...) {
      // Out of memory: this event is retried by the caller, so its request
      // must not go out; one queued behind it waits for the next post, or
      // for the daemon's handler timeout.
      std::lock_guard<std::mutex> lock(inbox_m);
      for (auto it = inbox.begin(); it != inbox.end(); ++it)
        if (it->get() == mine) {
          inbox.erase(it);
          break;
        }
      posted = false;  // the next enqueue posts, and takes any stranded here
      throw;
    }
  }

  void take_inbox() {
    {
      std::lock_guard<std::mutex> lock(inbox_m);
      inbox.swap(taken);
      posted = false;
    }
    try {
      for (auto& job : taken) pool.submit(std::move(job));
    } catch (...) {
      taken.clear();  // those events time out; the inbox stays usable
      throw;
    }
    taken.clear();
  }

  void log(int level, const std::string& msg) const { host->log(host->ctx, level, msg.data(), msg.size()); }

  void start() {
    thread = std::thread([this] {
      pthread_setname_np(pthread_self(), "er-http");  // as top -H and /proc show it
      for (;;) {
        try {
          io.run();
          return;
        } catch (const std::exception& e) {  // out of memory in a handler; keep serving
          log(ER_LOG_ERROR, std::string("http: io thread: ") + e.what());
        }
      }
    });
  }

  void stop() {
    asio::post(io, [this] { pool.stop(); });
    guard.reset();
    thread.join();
  }
};

Conn::Conn(Instance& inst, Pool& pool) : inst_(inst), pool_(pool), resolver_(inst.io), deadline_(inst.io) {}

void Conn::close() {
  boost::system::error_code ignored;
  resolver_.cancel();
  deadline_.cancel();
  if (sock_ || tls_) {
    lowest().shutdown(tcp::socket::shutdown_both, ignored);
    lowest().close(ignored);
  }
  connected_ = false;
}

void Conn::arm_deadline() {
  timed_out_ = false;
  deadline_.expires_after(inst_.cfg.timeout);
  deadline_.async_wait([self = shared_from_this(), gen = ++deadline_gen_](boost::system::error_code ec) {
    if (ec || gen != self->deadline_gen_ || !self->job_) return;
    self->timed_out_ = true;
    self->close();  // the pending operation ends with operation_aborted
  });
}

void Conn::run(std::unique_ptr<Job> job) {
  job_ = std::move(job);
  reused_ = connected_;
  arm_deadline();
  if (connected_)
    send();
  else
    connect();
}

void Conn::connect() {
  buf_.clear();
  tls_.reset();
  sock_.reset();
  if (inst_.tls)
    tls_.emplace(inst_.io, *inst_.tls);
  else
    sock_.emplace(inst_.io);
  const auto& u = inst_.cfg.url;
  resolver_.async_resolve(u.host, u.port,
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      const tcp::resolver::results_type& r) { self->on_resolve(ec, r); });
}

void Conn::on_resolve(const boost::system::error_code& ec, const tcp::resolver::results_type& results) {
  if (ec) return fail("resolve", ec);
  if (timed_out_) return fail("resolve", asio::error::operation_aborted);
  asio::async_connect(lowest(), results,
                      [self = shared_from_this()](const boost::system::error_code& e, const tcp::endpoint&) {
                        self->on_connect(e);
                      });
}

void Conn::on_connect(const boost::system::error_code& ec) {
  if (ec) return fail("connect", ec);
  boost::system::error_code ignored;
  lowest().set_option(tcp::no_delay(true), ignored);
  if (!tls_) {
    connected_ = true;
    return send();
  }
  const std::string& host = inst_.cfg.url.host;
  SSL* s = tls_->native_handle();
  boost::system::error_code addr_ec;
  asio::ip::make_address(host, addr_ec);
  const bool is_ip = !addr_ec;
  // SNI for names; OpenSSL checks the name (or address) with the chain, so a
  // mismatch fails the handshake as "hostname mismatch".
  bool ok = (is_ip || SSL_set_tlsext_host_name(s, host.c_str()) == 1) &&
            (!inst_.cfg.tls_verify || (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s), host.c_str())
                                             : SSL_set1_host(s, host.c_str())) == 1);
  if (!ok)
    return fail("tls setup", boost::system::error_code(static_cast<int>(::ERR_get_error()), asio::error::get_ssl_category()));
  tls_->async_handshake(ssl::stream_base::client, [self = shared_from_this()](const boost::system::error_code& e) {
    if (e) return self->fail("tls handshake", e);
    self->connected_ = true;
    self->send();
  });
}

void Conn::send() {
  interim_ = false;
  with_stream([&](auto& stream) {
    asio::async_write(stream, asio::buffer(job_->wire), [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
      if (ec) return self->fail("write", ec);
      self->read_answer();
    });
  });
}

// One answer (a 1xx is one too) into a fresh parser.
void Conn::read_answer() {
  parser_.emplace(body_);
  parser_->body_limit(kMaxResponseBytes);
  with_stream([&](auto& stream) {
    http::async_read(stream, buf_, *parser_,
                     [self = shared_from_this()](const boost::system::error_code& e, size_t) { self->on_read(e); });
  });
}

void Conn::on_read(const boost::system::error_code& ec) {
  if (ec) return fail("read", ec);
  if (parser_->status / 100 == 1 && parser_->status != 101) {  // 1xx (100, 103): the answer follows
    interim_ = true;  // the server has the request: a failure from here on is not resent
    return read_answer();
  }
  deadline_.cancel();
  const ResponseParser& res = *parser_;
  Decision d = er_http::decide(res.status, res.reason, res.content_type, res.retry_after, body_, std::time(nullptr));
  bool keep = res.keep_alive();
  if (!keep) close();
  done(std::move(d), keep);
}

void Conn::fail(const char* stage, const boost::system::error_code& ec) {
  const bool timed_out = timed_out_;
  const bool no_answer_yet = (!parser_ || !parser_->got_some()) && !interim_;
  std::string verify_error;  // why the certificate was refused, when it was
  if (tls_) {
    long v = SSL_get_verify_result(tls_->native_handle());
    if (v != X509_V_OK) verify_error = std::string(" (") + X509_verify_cert_error_string(v) + ")";
  }
  close();
  if (pool_.stopping()) return;
  // A keep-alive connection the server closed while it was idle: send the
  // request once more on a fresh one (nothing of an answer came back).
  if (reused_ && no_answer_yet && !timed_out && !job_->resent) {
    inst_.log(ER_LOG_DEBUG, std::string("http: a reused connection failed before any answer (") + stage + ": " +
                                ec.message() + "); sending again on a new one");
    job_->resent = true;
    reused_ = false;
    arm_deadline();
    connect();
    return;
  }
  std::string why = timed_out ? "HTTP request timed out after " + std::to_string(inst_.cfg.timeout.count()) +
                                    "ms (during " + stage + ")"
                              : std::string("HTTP ") + stage + " failed: " + ec.message() + verify_error;
  done(Decision{Verdict::Retry, 0, std::move(why), {}}, false);
}

void Conn::done(Decision d, bool reusable) {
  ++deadline_gen_;
  deadline_.cancel();
  auto job = std::move(job_);
  parser_.reset();
  if (body_.capacity() > (64u << 10)) std::string().swap(body_);  // keep no large answer's memory
  if (pool_.stopping()) return;  // cleanup: nothing of this instance is pending any more
  finish(inst_, *job, std::move(d));
  pool_.release(shared_from_this(), reusable);
}

void copy_reason(er_result& r, std::string_view text) {
  size_t n = std::min(text.size(), sizeof r.reason - 1);
  while (n > 0 && n < text.size() && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;  // whole UTF-8
  std::memcpy(r.reason, text.data(), n);
  r.reason[n] = '\0';
}

void finish(Instance& inst, Job& job, Decision d) {
  if (d.verdict == Verdict::Ack) {
    for (size_t i = 0; i < d.emits.size(); ++i) {
      int rc = inst.host->emit(job.handle, d.emits[i].data(), d.emits[i].size());
      if (rc == ER_OK) continue;
      if (rc == ER_E_HANDLE) return;  // the event timed out meanwhile: nothing to complete
      d = Decision{Verdict::DeadLetter, 0,
                   "emit_invalid: emit[" + std::to_string(i) + "] refused by the daemon (" +
                       (rc == ER_E_LIMIT ? "over 1000 emits or 16 MiB" : "not an object with a string event_type") + ")",
                   {}};
      break;
    }
  }
  er_result r;
  std::memset(&r, 0, sizeof r);
  r.struct_size = sizeof r;
  r.verdict = static_cast<int>(d.verdict);
  r.retry_delay_ms = static_cast<uint32_t>(std::min<uint64_t>(d.delay_ms, UINT32_MAX));
  copy_reason(r, d.reason);
  inst.host->complete(job.handle, &r);
}

// ---------------------------------------------------------------------------
// Building a request in handle()

void set_error(struct er_plugin_info* info, const std::string& msg) {
  std::snprintf(info->error, sizeof info->error, "http: %s", msg.c_str());
}

std::string_view sv(const er_str& s) { return s.data ? std::string_view(s.data, s.len) : std::string_view(); }

void dead_letter(er_result* r, const std::string& why) {
  r->verdict = ER_DEAD_LETTER;
  copy_reason(*r, why);
}

}  // namespace

extern "C" {

ER_PLUGIN_EXPORT int er_plugin_version(int supported_count, const int* supported_versions) {
  for (int i = 0; i < supported_count; ++i)
    if (supported_versions[i] == 2) return 2;  // needs host->complete
  return -1;
}

ER_PLUGIN_EXPORT int er_plugin_init(void** user_data, const struct er_host* host, const char* config_json,
                                    size_t config_len, struct er_plugin_info* info) {
  try {
    Config cfg;
    std::string err;
    if (!load_config(config_json, config_len, cfg, err)) {
      set_error(info, err);
      return 1;
    }
    std::optional<ssl::context> tls;
    if (cfg.url.tls) {
      tls = make_tls(cfg, err);
      if (!tls) {
        set_error(info, err);
        return 1;
      }
    }
    auto inst = std::make_unique<Instance>(host, std::move(cfg), std::move(tls));
    inst->start();
    *user_data = inst.release();
    info->flags = ER_PLUGIN_CONCURRENT | ER_PLUGIN_NONBLOCKING;
    return 0;
  } catch (const std::exception& e) {
    set_error(info, e.what());
    return 1;
  }
}

ER_PLUGIN_EXPORT int er_plugin_handle(void* user_data, const struct er_event* ev, struct er_result* result) {
  auto& inst = *static_cast<Instance*>(user_data);
  try {
    const Config& c = inst.cfg;
    std::string_view source = c.source.empty() ? sv(ev->queue) : std::string_view(c.source);
    std::string_view timestamp = sv(ev->timestamp);  // zero (absent) from a daemon that predates it
    // Event fields that become header values: a control character could
    // split the header or add one; such an event is refused, not encoded.
    const std::pair<const char*, std::string_view> fields[] = {{"event_id", sv(ev->event_id)},
                                                               {"event_type", sv(ev->event_type)},
                                                               {"correlation_id", sv(ev->correlation_id)},
                                                               {"timestamp", timestamp},
                                                               {"queue", source}};
    for (const auto& [name, value] : fields) {
      if (!er_http::valid_header_value(value)) {
        dead_letter(result, std::string("header_injection: the event's ") + name +
                                " contains a control character (CR, LF, tab, ...); it would become an HTTP header");
        return 0;
      }
    }
    // The request is written out here, once, in one buffer: no header
    // container to fill, no serializer to walk on the io thread.
    const std::string target = er_http::expand_target(c.url.target, sv(ev->event_type));
    char attempt[16], length[24];
    const int attempt_n = std::snprintf(attempt, sizeof attempt, "%u", static_cast<unsigned>(ev->attempt));
    const int length_n = std::snprintf(length, sizeof length, "%zu", ev->body.len);
    auto job = std::make_unique<Job>();
    job->handle = ev->handle;
    std::string& w = job->wire;
    w.reserve(target.size() + inst.fixed_head.size() + 256 + ev->event_id.len + ev->event_type.len +
              ev->correlation_id.len + timestamp.size() + source.size() + ev->body.len);
    auto line = [&w](std::string_view name, std::string_view value) {
      w.append(name).append(": ").append(value).append("\r\n");
    };
    w.append("POST ").append(target).append(" HTTP/1.1\r\n").append(inst.fixed_head);
    if (!sv(ev->event_id).empty()) line("ce-id", sv(ev->event_id));
    line("ce-type", sv(ev->event_type));
    if (c.source.empty()) line("ce-source", source);
    if (!timestamp.empty()) line("ce-time", timestamp);
    if (!sv(ev->correlation_id).empty()) line("ce-correlationid", sv(ev->correlation_id));
    line("ce-attempt", std::string_view(attempt, static_cast<size_t>(attempt_n)));
    line("Content-Length", std::string_view(length, static_cast<size_t>(length_n)));
    w.append("\r\n").append(ev->body.data ? ev->body.data : "", ev->body.len);
    inst.enqueue(std::move(job));
    return ER_PENDING;
  } catch (const std::exception& e) {
    result->verdict = ER_RETRY;
    copy_reason(*result, std::string("http: ") + e.what());
    return 0;
  }
}

ER_PLUGIN_EXPORT void er_plugin_cleanup(void* user_data) {
  auto* inst = static_cast<Instance*>(user_data);
  inst->stop();
  inst->log(ER_LOG_INFO, "http plugin stopped");  // its connections closed, its thread joined
  delete inst;
}

}  // extern "C"
