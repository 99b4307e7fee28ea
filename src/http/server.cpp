#include "http/server.hpp"

#include <optional>
#include <stdexcept>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace er::http {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;
using error_code = boost::system::error_code;

namespace {

constexpr const char* kMetricsType = "text/plain; version=0.0.4; charset=utf-8";
constexpr const char* kTextType = "text/plain; charset=utf-8";

// "host:port", "[v6]:port" or ":port" (empty host). Port must be 0..65535.
bool split_host_port(std::string_view s, std::string& host, unsigned short& port) {
  std::string_view p;
  if (!s.empty() && s.front() == '[') {
    auto close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') return false;
    host = std::string(s.substr(1, close - 1));
    p = s.substr(close + 2);
  } else {
    auto colon = s.rfind(':');
    if (colon == std::string_view::npos) return false;
    host = std::string(s.substr(0, colon));
    if (host.find(':') != std::string::npos) return false;  // bare IPv6 needs brackets
    p = s.substr(colon + 1);
  }
  if (p.empty() || p.size() > 5) return false;
  unsigned v = 0;
  for (char c : p) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<unsigned>(c - '0');
  }
  if (v > 65535) return false;
  port = static_cast<unsigned short>(v);
  return true;
}

class Session;

}  // namespace

namespace detail {

struct ServerState : std::enable_shared_from_this<ServerState> {
  ServerState(net::io_context& io, std::string listen, Handlers h, Limits l)
      : io(io), acceptor(io), retry(io), listen(std::move(listen)), handlers(std::move(h)), limits(l) {}

  void do_accept();
  void on_accept(error_code ec, tcp::socket s);
  void stop();

  net::io_context& io;
  tcp::acceptor acceptor;
  net::steady_timer retry;  // backs off after accept errors such as EMFILE instead of spinning
  std::string listen;
  Handlers handlers;
  Limits limits;
  unsigned short port = 0;  // cached: other threads may ask while the loop uses the acceptor
  bool started = false;
  bool stopped = false;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;
  std::uint64_t read_seq = 0;  // orders sessions by when they began waiting for a request
};

}  // namespace detail

namespace {

// One connection; modelled on Beast's http_server_async example.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket&& s, std::shared_ptr<detail::ServerState> st)
      : stream_(std::move(s)), buffer_(st->limits.header_limit + 1024), st_(std::move(st)) {}
  ~Session() { st_->sessions.erase(this); }

  void run() {
    st_->sessions.emplace(this, weak_from_this());
    do_read();
  }

  // Waiting for (or reading) a request, since `since()`: may be evicted.
  bool reading() const { return reading_ && !closed_; }
  std::uint64_t since() const { return read_seq_; }  // order of the waits' starts

  void close() {
    closed_ = true;
    st_->sessions.erase(this);  // frees its slot now; handlers finish later
    error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.close();  // cancels the pending read/write and the timer
  }

 private:
  void do_read() {
    parser_.emplace();
    parser_->header_limit(st_->limits.header_limit);
    parser_->body_limit(0);
    stream_.expires_after(st_->limits.idle_timeout);
    reading_ = true;
    read_seq_ = ++st_->read_seq;
    bhttp::async_read(stream_, buffer_, *parser_, beast::bind_front_handler(&Session::on_read, shared_from_this()));
  }

  void on_read(error_code ec, std::size_t) {
    reading_ = false;
    if (st_->stopped || closed_) return;
    if (ec == bhttp::error::end_of_stream) return shutdown_send();
    if (ec) {
      // Malformed or oversized request: answer, then close. Socket errors and
      // timeouts (the stream is already closed) just end the session.
      if (ec.category() != bhttp::make_error_code(bhttp::error::header_limit).category()) return;  // not a parse error
      unsigned status = ec == bhttp::error::header_limit ? 431 : (ec == bhttp::error::body_limit || ec == bhttp::error::unexpected_body) ? 413 : 400;
      res_ = {};
      res_.version(11);
      res_.keep_alive(false);
      finish(status, kTextType, status == 431 ? "request header too large\n" : status == 413 ? "request body not allowed\n" : "bad request\n", false);
      return;
    }
    handle(parser_->get());
  }

  void handle(const bhttp::request<bhttp::empty_body>& req) {
    res_ = {};
    res_.version(req.version());
    res_.keep_alive(req.keep_alive());
    const bool head = req.method() == bhttp::verb::head;
    if (req.method() != bhttp::verb::get && !head) {
      res_.set(bhttp::field::allow, "GET, HEAD");
      return finish(405, kTextType, "method not allowed\n", false);
    }
    auto target = req.target();
    if (auto q = target.find('?'); q != target.npos) target = target.substr(0, q);
    const Handlers& h = st_->handlers;
    try {
      if (target == "/healthz") return finish(200, kTextType, "ok\n", head);
      if (target == "/readyz") {
        std::string reason;
        if (!h.ready || h.ready(reason))
          return finish(200, kTextType, reason.empty() ? std::string("ready\n") : "ready; " + reason + "\n", head);
        return finish(503, kTextType, (reason.empty() ? std::string("not ready") : reason) + "\n", head);
      }
      if (target == "/metrics") return finish(200, kMetricsType, h.metrics ? h.metrics() : std::string(), head);
    } catch (const std::exception& e) {
      // An exception must not escape into io_context::run() and take the daemon down.
      return finish(500, kTextType, std::string("internal error: ") + e.what() + "\n", head);
    }
    finish(404, kTextType, "not found\n", head);
  }

  void finish(unsigned status, const char* type, std::string body, bool head) {
    res_.result(status);
    res_.set(bhttp::field::server, "event-router");
    res_.set(bhttp::field::content_type, type);
    if (head) {
      res_.content_length(body.size());  // what GET would send, without the body
    } else {
      res_.body() = std::move(body);
      res_.prepare_payload();
    }
    stream_.expires_after(st_->limits.idle_timeout);
    bhttp::async_write(stream_, res_, beast::bind_front_handler(&Session::on_write, shared_from_this(), res_.need_eof()));
  }

  void on_write(bool close, error_code ec, std::size_t) {
    if (ec || st_->stopped) return;
    if (close) return shutdown_send();
    res_ = {};
    do_read();
  }

  void shutdown_send() {
    error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
    // The socket closes when the last handler drops this session.
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;  // bounded: a request is at most the header limit
  std::optional<bhttp::request_parser<bhttp::empty_body>> parser_;  // fresh per request, as limits are per message
  bhttp::response<bhttp::string_body> res_;  // must outlive async_write
  std::shared_ptr<detail::ServerState> st_;
  bool reading_ = false;
  bool closed_ = false;
  std::uint64_t read_seq_ = 0;
};

}  // namespace

namespace detail {

void ServerState::do_accept() {
  acceptor.async_accept(io, [self = shared_from_this()](error_code ec, tcp::socket s) { self->on_accept(ec, std::move(s)); });
}

void ServerState::on_accept(error_code ec, tcp::socket s) {
  if (stopped || ec == net::error::operation_aborted) return;
  if (ec) {
    retry.expires_after(std::chrono::milliseconds(100));
    retry.async_wait([self = shared_from_this()](error_code e) {
      if (!e && !self->stopped) self->do_accept();
    });
    return;
  }
  if (sessions.size() >= limits.max_connections) {
    // Make room by closing the connection idle the longest: an attacker's
    // idle sockets then cycle out instead of locking /healthz out.
    std::shared_ptr<Session> oldest;
    for (auto& kv : sessions) {
      auto live = kv.second.lock();
      if (live && live->reading() && (!oldest || live->since() < oldest->since())) oldest = std::move(live);
    }
    if (oldest) oldest->close();
  }
  if (sessions.size() >= limits.max_connections) {
    error_code ignored;
    s.close(ignored);
  } else {
    std::make_shared<Session>(std::move(s), shared_from_this())->run();
  }
  do_accept();
}

void ServerState::stop() {
  if (stopped) return;
  stopped = true;
  error_code ec;
  acceptor.close(ec);
  retry.cancel();
  // Lock first: close() never runs handlers inline, but keep the map stable anyway.
  std::vector<std::shared_ptr<Session>> live;
  for (auto& kv : sessions)
    if (auto s = kv.second.lock()) live.push_back(std::move(s));
  for (auto& s : live) s->close();
}

}  // namespace detail

Server::Server(net::io_context& io, const std::string& listen, Handlers h, Limits limits)
    : st_(std::make_shared<detail::ServerState>(io, listen, std::move(h), limits)) {
  auto fail = [&](const std::string& why) { throw std::runtime_error("http.listen " + listen + ": " + why); };
  std::string host;
  unsigned short port = 0;
  if (!split_host_port(listen, host, port)) fail("expected host:port, [ipv6]:port or :port");

  struct Candidate {
    tcp::endpoint ep;
    bool dual_stack;
  };
  std::vector<Candidate> cands;
  if (host.empty()) {
    // Dual-stack IPv6 where the kernel has it (covers IPv4 too), else IPv4 only.
    cands.push_back({tcp::endpoint(tcp::v6(), port), true});
    cands.push_back({tcp::endpoint(tcp::v4(), port), false});
  } else {
    error_code ec;
    auto addr = net::ip::make_address(host, ec);
    if (!ec) {
      cands.push_back({tcp::endpoint(addr, port), false});
    } else {
      tcp::resolver r(io);
      auto results = r.resolve(host, std::to_string(port), tcp::resolver::numeric_service, ec);
      if (ec) fail(ec.message());
      for (const auto& e : results) cands.push_back({e.endpoint(), false});
      if (cands.empty()) fail("no address");
    }
  }

  error_code ec;
  for (const auto& c : cands) {
    auto& a = st_->acceptor;
    ec = {};
    error_code ignored;
    a.open(c.ep.protocol(), ec);
    if (!ec) {
      if (c.dual_stack) a.set_option(net::ip::v6_only(false), ignored);
      a.set_option(net::socket_base::reuse_address(true), ignored);  // restart despite TIME_WAIT; Linux still refuses a port in use
      a.bind(c.ep, ec);
    }
    if (!ec) a.listen(net::socket_base::max_listen_connections, ec);
    if (!ec) {
      st_->port = a.local_endpoint(ec).port();
      if (!ec) return;
    }
    a.close(ignored);
    if (ec == net::error::address_in_use) break;  // another address would not help
  }
  fail(ec.message());
}

Server::~Server() { stop(); }

void Server::start() {
  if (st_->started || st_->stopped) return;
  st_->started = true;
  st_->do_accept();
}

void Server::stop() { st_->stop(); }

unsigned short Server::port() const { return st_->port; }

std::size_t Server::connections() const { return st_->sessions.size(); }

// ---- probe

int probe(const std::string& url_or_hostport, const std::string& path, std::string& body,
          std::chrono::milliseconds timeout) {
  std::string_view s = url_or_hostport;
  if (s.substr(0, 7) == "http://") s.remove_prefix(7);
  std::string url_path;
  if (auto slash = s.find('/'); slash != s.npos) {
    url_path = std::string(s.substr(slash));
    s = s.substr(0, slash);
  }
  std::string host;
  unsigned short port = 0;
  if (!split_host_port(s, host, port) || port == 0) return -1;
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  else if (host == "::") host = "::1";
  const std::string target = !path.empty() ? path : !url_path.empty() ? url_path : "/";

  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  tcp::resolver resolver(ioc);
  stream.expires_after(timeout);  // one deadline for connect, write and read

  bhttp::request<bhttp::empty_body> req{bhttp::verb::get, target, 11};
  req.set(bhttp::field::host, host.find(':') != std::string::npos ? "[" + host + "]:" + std::to_string(port)
                                                                  : host + ":" + std::to_string(port));
  req.set(bhttp::field::user_agent, "event-router-probe");
  req.keep_alive(false);
  beast::flat_buffer buf;
  bhttp::response_parser<bhttp::string_body> parser;
  parser.body_limit(64u << 20);
  int status = -1;

  auto on_read = [&](error_code ec, std::size_t) {
    if (ec) return;
    status = static_cast<int>(parser.get().result_int());
    body = std::move(parser.get().body());
    error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
  };
  auto on_write = [&](error_code ec, std::size_t) {
    if (!ec) bhttp::async_read(stream, buf, parser, on_read);
  };
  auto on_connect = [&](error_code ec) {
    if (!ec) bhttp::async_write(stream, req, on_write);
  };

  error_code ec;
  auto addr = net::ip::make_address(host, ec);
  if (!ec) {
    stream.async_connect(tcp::endpoint(addr, port), on_connect);
  } else {
    resolver.async_resolve(host, std::to_string(port), tcp::resolver::numeric_service,
                           [&](error_code rec, const tcp::resolver::results_type& results) {
                             if (!rec) stream.async_connect(results, [&](error_code cec, const tcp::endpoint&) { on_connect(cec); });
                           });
  }
  // The stream's deadline does not cover name resolution, so bound the run too.
  ioc.run_for(timeout + std::chrono::milliseconds(100));
  if (!ioc.stopped()) {
    // Cancel and drain, so no pending handler refers to the locals above.
    resolver.cancel();
    stream.close();
    ioc.restart();
    ioc.run();
    return -1;
  }
  return status;
}

}  // namespace er::http
