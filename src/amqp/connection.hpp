#pragma once
// RAII ownership of one rabbitmq-c connection. rabbitmq-c is not
// thread-safe: a Connection belongs to the thread that runs its io_context.
#include <amqp.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

#include "config/config.hpp"

namespace er::amqp {

class AmqpError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  AmqpError(const std::string& what, int reply_code, bool channel_closed)
      : std::runtime_error(what), reply_code_(reply_code), channel_closed_(channel_closed) {}
  // The broker's reply code (404, 406, 403, 320...), 0 for library errors.
  int reply_code() const { return reply_code_; }
  // The broker closed only the channel (a channel.close): the connection lives.
  bool channel_closed() const { return channel_closed_; }
  // What a retry cannot fix: the broker refused an argument or a permission.
  bool permanent() const { return reply_code_ == AMQP_PRECONDITION_FAILED || reply_code_ == AMQP_ACCESS_REFUSED; }

 private:
  int reply_code_ = 0;
  bool channel_closed_ = false;
};

// The one place where RPC replies become text. `context` says what was being
// done ("declaring queue 'x'"). PRECONDITION_FAILED (406) on a declare is
// explained in terms of the argument that differs.
std::string describe_reply(const amqp_rpc_reply_t& reply, std::string_view context);

// Throws AmqpError unless the reply is normal.
void check_reply(const amqp_rpc_reply_t& reply, std::string_view context);

struct ConnectionDeleter {
  void operator()(amqp_connection_state_t c) const noexcept;
};
using ConnectionPtr = std::unique_ptr<amqp_connection_state_t_, ConnectionDeleter>;

struct TlsOptions {
  std::string ca_file;    // empty: the system's CA bundle
  std::string cert_file;  // client certificate, optional
  std::string key_file;
  bool verify_peer = true;
  bool verify_hostname = true;
};

struct ConnectOptions {
  std::string url;                             // amqp://user:pass@host:port/vhost, or amqps://
  TlsOptions tls;                              // used for amqps:// URLs
  std::chrono::milliseconds heartbeat{30000};  // 0 disables
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds rpc_timeout{10000};  // every RPC reply after login
};

// Options for the config's broker, URL number `url_index` (of broker.urls).
ConnectOptions connect_options(const config::BrokerConfig& broker, size_t url_index = 0);

class Connection {
 public:
  // Opens the socket, logs in. Throws AmqpError; the message masks the password.
  static Connection open(const ConnectOptions& opts);

  Connection(Connection&&) noexcept = default;
  Connection& operator=(Connection&&) noexcept = default;
  ~Connection();

  amqp_connection_state_t get() const { return conn_.get(); }
  int fd() const { return amqp_get_sockfd(conn_.get()); }
  const std::string& peer() const { return peer_; }  // "host:port" (masked URL elsewhere)
  const std::string& server_version() const { return server_version_; }

  void open_channel(amqp_channel_t ch);
  // The highest channel number the broker agreed to.
  amqp_channel_t channel_max() const;
  // Graceful connection.close; errors are ignored (we are leaving anyway).
  void close() noexcept;
  // The peer is gone or stalled: free everything without waiting for it.
  void abandon() noexcept { closed_ = true; }

 private:
  Connection() = default;
  ConnectionPtr conn_;
  std::string peer_;
  std::string server_version_;
  bool closed_ = false;
};

// Answers the broker's channel.close / connection.close (the peer waits for
// it). The send's status is not checked: the link is being torn down anyway.
inline void reply_channel_close_ok(amqp_connection_state_t c, amqp_channel_t ch) {
  amqp_channel_close_ok_t ok{};
  amqp_send_method(c, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
}
inline void reply_connection_close_ok(amqp_connection_state_t c) {
  amqp_connection_close_ok_t ok{};
  amqp_send_method(c, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
}

inline amqp_bytes_t bytes(std::string_view s) {
  return amqp_bytes_t{s.size(), const_cast<char*>(s.data())};
}
inline std::string_view view(amqp_bytes_t b) {
  return {static_cast<const char*>(b.bytes), b.len};
}

}  // namespace er::amqp
