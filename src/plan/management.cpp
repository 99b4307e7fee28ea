#include "plan/management.hpp"

#include <openssl/evp.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace er::plan {

namespace beast = boost::beast;
namespace bhttp = beast::http;
using boost::asio::ip::tcp;
using boost::system::error_code;

namespace {

constexpr size_t kMaxBody = 64u << 20;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      int h = hex_value(s[i + 1]), l = hex_value(s[i + 2]);
      if (h >= 0 && l >= 0) {
        out += static_cast<char>(h * 16 + l);
        i += 2;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

std::string base64(const std::string& in) {
  std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

std::string seconds_text(std::chrono::milliseconds d) {
  auto ms = d.count();
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

}  // namespace

std::string Endpoint::display() const {
  std::string h = host.find(':') != std::string::npos ? "[" + host + "]" : host;
  return "http://" + h + ":" + port + prefix + "/";
}

Endpoint parse_endpoint(std::string_view url) {
  auto bad = [&](const std::string& why) {
    // The URL may hold a password: name only its shape.
    return ManagementError("management URL: " + why + " (expected http://[user:password@]host[:port][/prefix])");
  };
  constexpr std::string_view scheme = "http://";
  if (url.rfind("https://", 0) == 0)
    throw bad("https:// is not supported; use the plain http listener or a local tunnel");
  if (url.rfind(scheme, 0) != 0) throw bad("it must start with http://");
  std::string_view rest = url.substr(scheme.size());
  size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view{} : rest.substr(slash);
  Endpoint ep;
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    std::string_view userinfo = authority.substr(0, at);
    authority = authority.substr(at + 1);
    size_t colon = userinfo.find(':');
    ep.user = percent_decode(userinfo.substr(0, colon));
    if (colon != std::string_view::npos) ep.password = percent_decode(userinfo.substr(colon + 1));
    ep.has_credentials = true;
  }
  std::string_view port;
  if (!authority.empty() && authority.front() == '[') {
    size_t close = authority.find(']');
    if (close == std::string_view::npos) throw bad("unclosed '[' in the host");
    ep.host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') throw bad("junk after the host");
      port = after.substr(1);
    }
  } else {
    size_t colon = authority.find(':');
    ep.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) port = authority.substr(colon + 1);
  }
  if (ep.host.empty()) throw bad("no host");
  if (!port.empty()) {
    if (port.size() > 5 || port.find_first_not_of("0123456789") != std::string_view::npos ||
        std::stoul(std::string(port)) == 0 || std::stoul(std::string(port)) > 65535)
      throw bad("bad port");
    ep.port = std::string(port);
  }
  if (path.find_first_of("?#") != std::string_view::npos) throw bad("no query or fragment allowed");
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  ep.prefix = std::string(path);
  return ep;
}

std::string encode_segment(std::string_view s) {
  static const char hex[] = "0123456789ABCDEF";
  std::string out;
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if ((u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || (u >= '0' && u <= '9') || c == '-' || c == '_' ||
        c == '.' || c == '~') {
      out += c;
    } else {
      out += '%';
      out += hex[u >> 4];
      out += hex[u & 15];
    }
  }
  return out;
}

Response Client::get(const std::string& path) const {
  boost::asio::io_context ioc;  // first: destroyed last, after everything that uses it
  tcp::resolver resolver(ioc);
  beast::tcp_stream stream(ioc);
  beast::flat_buffer buffer;
  bhttp::response_parser<bhttp::string_body> parser;
  parser.body_limit(kMaxBody);
  bhttp::request<bhttp::empty_body> req{bhttp::verb::get, ep_.prefix + path, 11};
  req.set(bhttp::field::host, ep_.host.find(':') != std::string::npos ? "[" + ep_.host + "]:" + ep_.port
                                                                       : ep_.host + ":" + ep_.port);
  req.set(bhttp::field::user_agent, "event-router/" ER_VERSION);
  req.set(bhttp::field::accept, "application/json");
  req.set(bhttp::field::authorization, "Basic " + base64(ep_.user + ":" + ep_.password));
  req.keep_alive(false);

  // One deadline for the whole exchange: the chain runs on `ioc` for at
  // most the timeout; whatever is still pending then is cancelled.
  error_code result = boost::asio::error::would_block;
  const char* stage = "resolving the host";
  resolver.async_resolve(ep_.host, ep_.port, [&](error_code ec, tcp::resolver::results_type results) {
    if (ec) return void(result = ec);
    stage = "connecting";
    stream.async_connect(results, [&](error_code ec, const tcp::endpoint&) {
      if (ec) return void(result = ec);
      stage = "sending the request";
      bhttp::async_write(stream, req, [&](error_code ec, size_t) {
        if (ec) return void(result = ec);
        stage = "waiting for the answer";
        bhttp::async_read(stream, buffer, parser, [&](error_code ec, size_t) { result = ec; });
      });
    });
  });
  ioc.run_for(timeout_);
  const bool timed_out = result == boost::asio::error::would_block;
  if (timed_out) {
    resolver.cancel();
    error_code ignored;
    stream.socket().close(ignored);
    ioc.restart();
    ioc.run();  // the handlers see operation_aborted and stop
  }
  const std::string where = "the management API at " + ep_.display();
  if (timed_out)
    throw ManagementError(where + " did not answer within " + seconds_text(timeout_) + " (" + stage +
                          "; the bound is broker.rpc_timeout)");
  if (result == bhttp::error::body_limit)
    throw ManagementError(where + " sent an answer over " + std::to_string(kMaxBody >> 20) + " MiB for " + path);
  if (result)
    throw ManagementError("cannot reach " + where + ": " + stage + ": " + result.message() +
                          " (is the rabbitmq_management plugin enabled there? see --management)");
  Response r;
  r.status = parser.get().result_int();
  r.body = std::move(parser.get().body());
  return r;
}

}  // namespace er::plan
