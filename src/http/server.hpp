#pragma once
// Small HTTP/1.1 server for /healthz, /readyz and /metrics, run by Boost.Beast
// on the daemon's io_context (no threads of its own), plus a blocking probe()
// client for the container HEALTHCHECK.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

namespace er::http {

namespace detail {
struct ServerState;
}

struct Handlers {
  // false = not ready; `reason` becomes the 503 body. True with a reason:
  // ready but degraded, 200 "ready; <reason>". Empty = always ready.
  std::function<bool(std::string& reason)> ready;
  // The /metrics body (Prometheus text format). Empty = empty body.
  std::function<std::string()> metrics;
};

struct Limits {
  // At the limit a new connection closes the one that has waited longest for
  // a request, so idle sockets cannot lock out health checks; it is refused
  // only when every connection is busy writing a response.
  std::size_t max_connections = 64;
  // Deadline for reading one whole request (or for one response write): a
  // slow or silent client is dropped after this, whatever it trickles.
  std::chrono::milliseconds idle_timeout{10000};
  std::uint32_t header_limit = 8 * 1024;     // requests carry no body
};

class Server {
 public:
  // Binds and listens now: throws std::runtime_error("http.listen <listen>: <why>").
  // `listen`: "127.0.0.1:9090", "[::1]:9090", "localhost:9090", or ":9090" for all
  // interfaces (IPv6 dual-stack, else IPv4). Port 0 picks a free port; see port().
  Server(boost::asio::io_context& io, const std::string& listen, Handlers h, Limits limits = {});
  ~Server();  // stop()
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  void start();  // begins accepting
  // Closes the acceptor and every connection, so io_context::run() can run out
  // of work. Call on the io_context's thread (or while it is not running).
  void stop();
  unsigned short port() const;  // the bound port (also for port 0); safe from any thread
  std::size_t connections() const;  // open connections, for tests and diagnostics

 private:
  std::shared_ptr<detail::ServerState> st_;  // shared with sessions: they may outlive Server until their handlers run
};

// Blocking GET of `path` from "host:port", ":port" (= 127.0.0.1), or
// "http://host:port[/path]" (an empty `path` then takes the URL's). A wildcard
// host (0.0.0.0, ::) means this machine, so a listen address can be passed as is.
// Returns the HTTP status with the body in `body`, or -1 when it cannot connect,
// the reply is not HTTP, or `timeout` (for the whole exchange) passes.
int probe(const std::string& url_or_hostport, const std::string& path, std::string& body,
          std::chrono::milliseconds timeout);

}  // namespace er::http
