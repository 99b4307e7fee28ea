#pragma once
// A small synchronous client of the RabbitMQ management HTTP API, for
// `event-router plan`. Plain http:// only; every request is bounded by one
// deadline (resolve, connect, send, receive).
#include <chrono>
#include <stdexcept>
#include <string>
#include <string_view>

namespace er::plan {

// What went wrong talking to the API; what() is the message for the operator
// (never a password).
class ManagementError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Endpoint {
  std::string host;        // a name, an IPv4 address, or an IPv6 address without brackets
  std::string port = "15672";
  std::string prefix;      // path prefix ("" or "/rabbitmq"), no trailing '/'
  std::string user;        // empty: not in the URL
  std::string password;
  bool has_credentials = false;

  // "http://host:port/prefix/" without credentials.
  std::string display() const;
};

// Parses "http://[user[:password]@]host[:port][/prefix]" (user and password
// percent-decoded). Throws ManagementError for anything else (https:// too:
// put the API behind a local tunnel or use its plain listener).
Endpoint parse_endpoint(std::string_view url);

// One path segment, percent-encoded (the vhost "/" becomes "%2F").
std::string encode_segment(std::string_view s);

struct Response {
  unsigned status = 0;
  std::string body;
};

class Client {
 public:
  Client(Endpoint endpoint, std::chrono::milliseconds timeout) : ep_(std::move(endpoint)), timeout_(timeout) {}
  // GET <prefix><path> with basic auth. Any HTTP status is an answer; no
  // answer within the timeout, a refused connection or a body over 64 MiB
  // throw ManagementError.
  Response get(const std::string& path) const;
  const Endpoint& endpoint() const { return ep_; }

 private:
  Endpoint ep_;
  std::chrono::milliseconds timeout_;
};

}  // namespace er::plan
