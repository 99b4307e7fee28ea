// The benchmark's trivial endpoint: answers every request with 200 and an empty
// body, keep-alive, on one thread (Boost.Beast, asynchronous). It reads the
// request body and nothing else, so its CPU per request is the floor of an
// HTTP server on this machine, the figure the http plugin's is compared with.
//   er-bench-http-server PORT        (127.0.0.1; PORT 0 picks one)
// Prints "listening PORT" once it accepts; "requests N" on SIGTERM/SIGINT.
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <cstdio>
#include <cstdlib>
#include <memory>

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

static unsigned long long g_requests = 0;

class Session : public std::enable_shared_from_this<Session> {
 public:
  explicit Session(tcp::socket s) : stream_(std::move(s)) {}
  void start() { read(); }

 private:
  void read() {
    req_ = {};
    http::async_read(stream_, buf_, req_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) return;  // closed by the client, or garbage: drop the connection
      self->answer();
    });
  }
  void answer() {
    ++g_requests;
    res_ = {};
    res_.version(req_.version());
    res_.result(http::status::ok);
    res_.keep_alive(req_.keep_alive());
    res_.prepare_payload();
    http::async_write(stream_, res_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec || !self->res_.keep_alive()) return;
      self->read();
    });
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buf_;
  http::request<http::string_body> req_;
  http::response<http::empty_body> res_;
};

static void accept(tcp::acceptor &acc) {
  acc.async_accept([&acc](beast::error_code ec, tcp::socket s) {
    if (!ec) {
      s.set_option(tcp::no_delay(true));
      std::make_shared<Session>(std::move(s))->start();
    }
    accept(acc);
  });
}

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s PORT\n", argv[0]);
    return 2;
  }
  asio::io_context io(1);
  tcp::acceptor acc(io, {asio::ip::make_address("127.0.0.1"), static_cast<unsigned short>(std::atoi(argv[1]))});
  asio::signal_set stop(io, SIGTERM, SIGINT);
  stop.async_wait([&io](beast::error_code, int) { io.stop(); });
  accept(acc);
  std::printf("listening %u\n", acc.local_endpoint().port());
  std::fflush(stdout);
  io.run();
  std::printf("requests %llu\n", g_requests);
  return 0;
}
