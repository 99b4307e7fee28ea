#include <catch2/catch.hpp>

#include <atomic>
#include <future>
#include <vector>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "http/server.hpp"
#include "metrics/metrics.hpp"

namespace net = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;
using namespace std::chrono_literals;

namespace {

// The server on its own io_context thread (standing in for the daemon's loop);
// the test thread is the client.
struct Running {
  net::io_context io;
  std::atomic<bool> ready{true};
  er::metrics::Registry reg;
  std::unique_ptr<er::http::Server> srv;
  std::thread loop;

  explicit Running(er::http::Limits limits = {}, std::string listen = "127.0.0.1:0") {
    reg.counter("er_requests", "Requests.", {"path"}).with({"/x"}).inc(2);
    er::http::Handlers h;
    h.ready = [this](std::string& reason) {
      if (ready) return true;
      reason = "amqp: not connected";
      return false;
    };
    h.metrics = [this] { return reg.render(); };
    srv = std::make_unique<er::http::Server>(io, listen, std::move(h), limits);
    srv->start();
    loop = std::thread([this] { io.run(); });
  }
  unsigned short port() const { return srv->port(); }
  // Returns how long io_context::run() took to return after stop().
  std::chrono::milliseconds stop() {
    auto t0 = std::chrono::steady_clock::now();
    net::post(io, [this] { srv->stop(); });
    loop.join();
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  }
  ~Running() {
    if (loop.joinable()) stop();
  }
};

// A blocking client connection.
struct Client {
  net::io_context io;
  tcp::socket sock{io};
  beast::flat_buffer buf;

  explicit Client(unsigned short port) { sock.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port)); }

  bhttp::response<bhttp::string_body> request(bhttp::verb method, const std::string& target, bool keep_alive = true) {
    bhttp::request<bhttp::empty_body> req{method, target, 11};
    req.set(bhttp::field::host, "localhost");
    req.keep_alive(keep_alive);
    bhttp::write(sock, req);
    return read(method == bhttp::verb::head);
  }
  bhttp::response<bhttp::string_body> read(bool head = false) {
    bhttp::response_parser<bhttp::string_body> p;
    p.skip(head);
    bhttp::read(sock, buf, p);
    return p.release();
  }
  void send_raw(const std::string& s) { net::write(sock, net::buffer(s)); }
  // True when the server has closed the connection (EOF or reset).
  bool closed_by_peer() {
    char c;
    boost::system::error_code ec;
    sock.read_some(net::buffer(&c, 1), ec);
    return ec == net::error::eof || ec == net::error::connection_reset;
  }
};

unsigned short unused_port() {
  net::io_context io;
  tcp::acceptor a(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  return a.local_endpoint().port();  // closed again on return: nothing listens there
}

}  // namespace

TEST_CASE("http: /healthz, /readyz flips to 503 with the reason, /metrics body and type", "[http]") {
  Running s;
  REQUIRE(s.port() != 0);
  Client c(s.port());

  auto r = c.request(bhttp::verb::get, "/healthz");
  CHECK(r.result_int() == 200);
  CHECK(r.body() == "ok\n");
  CHECK(r[bhttp::field::content_type] == "text/plain; charset=utf-8");

  r = c.request(bhttp::verb::get, "/readyz");
  CHECK(r.result_int() == 200);
  CHECK(r.body() == "ready\n");

  s.ready = false;
  r = c.request(bhttp::verb::get, "/readyz");
  CHECK(r.result_int() == 503);
  CHECK(r.body() == "amqp: not connected\n");

  r = c.request(bhttp::verb::get, "/metrics");
  CHECK(r.result_int() == 200);
  CHECK(r[bhttp::field::content_type] == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(r.body() ==
        "# HELP er_requests_total Requests.\n"
        "# TYPE er_requests_total counter\n"
        "er_requests_total{path=\"/x\"} 2\n");

  r = c.request(bhttp::verb::get, "/metrics?name[]=x");  // query strings are ignored
  CHECK(r.result_int() == 200);
}

TEST_CASE("http: unknown paths 404, other methods 405, HEAD has headers only", "[http]") {
  Running s;
  Client c(s.port());
  auto r = c.request(bhttp::verb::get, "/nope");
  CHECK(r.result_int() == 404);
  r = c.request(bhttp::verb::post, "/metrics");
  CHECK(r.result_int() == 405);
  CHECK(r[bhttp::field::allow] == "GET, HEAD");
  r = c.request(bhttp::verb::delete_, "/healthz");
  CHECK(r.result_int() == 405);
  r = c.request(bhttp::verb::head, "/healthz");
  CHECK(r.result_int() == 200);
  CHECK(r[bhttp::field::content_length] == "3");
  CHECK(r.body().empty());
  // The connection is still in sync after HEAD.
  r = c.request(bhttp::verb::get, "/healthz");
  CHECK(r.body() == "ok\n");
}

TEST_CASE("http: keep-alive serves several requests on one connection; Connection: close ends it", "[http]") {
  Running s;
  Client c(s.port());
  auto r1 = c.request(bhttp::verb::get, "/healthz");
  auto r2 = c.request(bhttp::verb::get, "/metrics");
  CHECK(r1.result_int() == 200);
  CHECK(r1.keep_alive());
  CHECK(r2.result_int() == 200);
  // Pipelined: two requests in one write, two responses in order.
  c.send_raw("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(c.read().body() == "ok\n");
  CHECK(c.read().body() == "ready\n");
  auto r3 = c.request(bhttp::verb::get, "/healthz", false);
  CHECK(r3.result_int() == 200);
  CHECK_FALSE(r3.keep_alive());
  CHECK(c.closed_by_peer());
}

TEST_CASE("http: oversized headers get 431, a request body 413, garbage 400", "[http]") {
  Running s;
  {
    Client c(s.port());
    c.send_raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(10000, 'a') + "\r\n\r\n");
    CHECK(c.read().result_int() == 431);
  }
  {
    Client c(s.port());
    c.send_raw("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    CHECK(c.read().result_int() == 413);
  }
  {
    Client c(s.port());
    c.send_raw("NOT HTTP AT ALL\r\n\r\n");
    CHECK(c.read().result_int() == 400);
  }
}

TEST_CASE("http: a handler that throws gives 500 and the server keeps serving", "[http]") {
  net::io_context io;
  er::http::Handlers h;
  h.metrics = []() -> std::string { throw std::runtime_error("boom"); };
  er::http::Server srv(io, "127.0.0.1:0", h);
  srv.start();
  std::thread t([&] { io.run(); });
  {
    Client c(srv.port());
    auto r = c.request(bhttp::verb::get, "/metrics");
    CHECK(r.result_int() == 500);
    CHECK(r.body() == "internal error: boom\n");
    CHECK(c.request(bhttp::verb::get, "/readyz").result_int() == 200);  // no ready handler = ready
  }
  net::post(io, [&] { srv.stop(); });
  t.join();
}

TEST_CASE("http: idle connections are closed after the timeout", "[http]") {
  er::http::Limits l;
  l.idle_timeout = 200ms;
  Running s(l);
  Client c(s.port());
  CHECK(c.request(bhttp::verb::get, "/healthz").result_int() == 200);
  auto t0 = std::chrono::steady_clock::now();
  CHECK(c.closed_by_peer());
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
}

TEST_CASE("http: at the limit a new connection closes the longest-idle one", "[http]") {
  er::http::Limits l;
  l.max_connections = 2;
  Running s(l);
  Client a(s.port()), b(s.port());
  // A request each makes sure both were accepted before the third connects.
  CHECK(a.request(bhttp::verb::get, "/healthz").result_int() == 200);
  CHECK(b.request(bhttp::verb::get, "/healthz").result_int() == 200);
  Client extra(s.port());
  CHECK(extra.request(bhttp::verb::get, "/healthz").result_int() == 200);
  CHECK(a.closed_by_peer());
  CHECK(b.request(bhttp::verb::get, "/healthz").result_int() == 200);
}

TEST_CASE("http: /healthz answers while 100 idle sockets are open", "[http]") {
  Running s;  // default limits: 64 connections
  std::vector<std::unique_ptr<Client>> idle;
  for (int i = 0; i < 100; ++i) idle.push_back(std::make_unique<Client>(s.port()));
  // Accepts are in connect order, so this one comes after all the idle ones.
  Client probe(s.port());
  CHECK(probe.request(bhttp::verb::get, "/healthz", false).result_int() == 200);
  // The oldest idle sockets were closed to make room (100 + probe - 64 = 37).
  for (int i = 0; i < 37; ++i) CHECK(idle[i]->closed_by_peer());
  std::promise<std::size_t> open;
  net::post(s.io, [&] { open.set_value(s.srv->connections()); });
  CHECK(open.get_future().get() <= 64);
}

TEST_CASE("http: stop() closes listener and open connections so run() returns", "[http]") {
  Running s;
  Client idle(s.port());
  CHECK(idle.request(bhttp::verb::get, "/healthz").result_int() == 200);  // now an idle keep-alive connection
  Client half(s.port());
  half.send_raw("GET /healthz HTTP/1.1\r\n");  // an unfinished request
  std::this_thread::sleep_for(50ms);
  auto took = s.stop();
  CHECK(took < 2s);  // not the 30 s idle timeout
  CHECK(s.srv->connections() == 0);
  CHECK(idle.closed_by_peer());
  std::string body;
  CHECK(er::http::probe("127.0.0.1:" + std::to_string(s.port()), "/healthz", body, 500ms) == -1);
}

TEST_CASE("http: listen errors are clear runtime_errors", "[http]") {
  net::io_context io;
  er::http::Server first(io, "127.0.0.1:0", {});
  const std::string taken = "127.0.0.1:" + std::to_string(first.port());
  try {
    er::http::Server second(io, taken, {});
    FAIL("second server on a taken port did not throw");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "http.listen " + taken + ": Address already in use");
  }
  CHECK_THROWS_WITH(er::http::Server(io, "9090", {}), Catch::Contains("http.listen 9090: expected host:port"));
  CHECK_THROWS_WITH(er::http::Server(io, "::1:9090", {}), Catch::Contains("expected host:port"));
  CHECK_THROWS_WITH(er::http::Server(io, "127.0.0.1:99999", {}), Catch::Contains("expected host:port"));
}

TEST_CASE("http: \":port\" listens on all interfaces and \"[::1]:port\" on IPv6 loopback", "[http]") {
  {
    Running s({}, ":0");
    std::string body;
    CHECK(er::http::probe(":" + std::to_string(s.port()), "/healthz", body, 2s) == 200);
    CHECK(er::http::probe("0.0.0.0:" + std::to_string(s.port()), "/healthz", body, 2s) == 200);
  }
  std::unique_ptr<Running> v6;
  try {
    v6 = std::make_unique<Running>(er::http::Limits{}, "[::1]:0");
  } catch (const std::runtime_error& e) {
    WARN("no IPv6 loopback here, skipped: " << e.what());
    return;
  }
  std::string body;
  CHECK(er::http::probe("[::1]:" + std::to_string(v6->port()), "/readyz", body, 2s) == 200);
  CHECK(body == "ready\n");
}

TEST_CASE("http: probe() returns the status and body, or -1", "[http]") {
  Running s;
  const std::string hp = "127.0.0.1:" + std::to_string(s.port());
  std::string body;
  CHECK(er::http::probe(hp, "/healthz", body, 2s) == 200);
  CHECK(body == "ok\n");
  s.ready = false;
  CHECK(er::http::probe("http://" + hp + "/readyz", "", body, 2s) == 503);
  CHECK(body == "amqp: not connected\n");
  CHECK(er::http::probe("http://localhost:" + std::to_string(s.port()), "/nope", body, 2s) == 404);
  CHECK(er::http::probe("127.0.0.1:" + std::to_string(unused_port()), "/healthz", body, 2s) == -1);
  CHECK(er::http::probe("not a url", "/healthz", body, 2s) == -1);

  // A listener that never answers: the timeout bounds the call.
  net::io_context io;
  tcp::acceptor mute(io, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  auto t0 = std::chrono::steady_clock::now();
  CHECK(er::http::probe("127.0.0.1:" + std::to_string(mute.local_endpoint().port()), "/healthz", body, 300ms) == -1);
  CHECK(std::chrono::steady_clock::now() - t0 < 2s);
}
